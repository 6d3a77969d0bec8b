//! `conversion-gateway doctor`: asks X and the machine what a setup needs, and reports it line by line
//! (`judge` says what each answer means).
//!
//! # What is asked
//! Per account with OAuth credentials: `authenticated_user_access` (the token's user and permissions), then
//! every page of `web_event_tags` (each configured SET id and each `--event-id`, and the pixel where a tag's
//! code names it). For the gateway: the clock against X's `Date` (from any answer, or a plain `GET` of
//! `upstream.base_url` when no account could be asked), the spool directory (a file written, synced and
//! removed; the free space), and Redis when the shared mode uses it (`PING`, then its persistence).
//!
//! # What is not
//! A pixel token authenticates only the conversions endpoint, and sandbox mode sends nothing: their X
//! lines are skipped, each saying why. Nothing is sent to the conversions endpoint (X has no test mode:
//! an event sent is counted) and nothing in the spool is opened (a running gateway holds it).

use super::ads_api::{oauth_credentials, AdsApi, Answer, CallError, ClockReading, Tag, UserAccess};
use super::judge::{self, Check, Status};
use crate::config::{Account, Auth, LimiterBackend, Settings, SpoolBackend};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The run's report: one list of lines per account, one for the gateway.
#[derive(Debug, Serialize)]
pub struct Report {
    /// No line failed.
    pub ok: bool,
    pub sandbox: bool,
    pub accounts: Vec<AccountReport>,
    pub gateway: Vec<Check>,
    pub summary: Summary,
}

#[derive(Debug, Serialize)]
pub struct AccountReport {
    pub name: String,
    pub ad_account_id: String,
    pub pixel_id: String,
    pub checks: Vec<Check>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub warned: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// What the caller adds to the configuration.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// SET ids callers send as `event_id` (checked on every account with OAuth credentials).
    pub event_ids: Vec<String>,
    /// Tags asked for per page (the default 1000 is X's maximum).
    pub page_size: Option<u32>,
}

pub async fn run(settings: &Settings, options: &Options) -> Report {
    let sandbox = settings.upstream.sandbox;
    let mut clock: Option<ClockReading> = None;
    let mut asked = Vec::new();
    for (name, account) in &settings.accounts {
        let answers = ask_x(settings, account, options).await;
        if clock.is_none() {
            clock = answers.as_ref().and_then(|a| a.clock);
        }
        asked.push((name, account, answers));
    }
    if clock.is_none() && !sandbox {
        clock = plain_clock(settings).await;
    }
    let clock_is_off = judge::clock_is_off(clock);
    let accounts = asked
        .into_iter()
        .map(|(name, account, answers)| AccountReport {
            name: name.clone(),
            ad_account_id: account.ad_account_id.clone(),
            pixel_id: account.pixel_id.clone(),
            checks: account_lines(name, account, options, answers, sandbox, clock_is_off),
        })
        .collect::<Vec<_>>();
    let mut gateway = vec![configuration(settings)];
    gateway.push(if sandbox {
        Check::new("clock", Status::Skip, SANDBOX)
    } else {
        judge::clock(clock)
    });
    gateway.push(spool(settings));
    gateway.push(redis(settings).await);
    let mut summary = Summary::default();
    for c in accounts.iter().flat_map(|a| &a.checks).chain(&gateway) {
        match c.status {
            Status::Pass => summary.passed += 1,
            Status::Warn => summary.warned += 1,
            Status::Fail => summary.failed += 1,
            Status::Skip => summary.skipped += 1,
        }
    }
    Report {
        ok: summary.failed == 0,
        sandbox,
        accounts,
        gateway,
        summary,
    }
}

/// The report of a configuration that does not load: one failed line naming the key, nothing asked.
pub fn invalid_configuration(error: &crate::config::ConfigError) -> Report {
    let line = Check::new(
        "configuration",
        Status::Fail,
        format!("invalid: {}: {}", error.key, error.message),
    )
    .fix(format!(
        "correct {} (conversion-gateway check-config shows the effective configuration)",
        error.key
    ));
    Report {
        ok: false,
        sandbox: false,
        accounts: Vec::new(),
        gateway: vec![line],
        summary: Summary {
            failed: 1,
            ..Summary::default()
        },
    }
}

const SANDBOX: &str =
    "not asked: upstream.sandbox is on, so nothing is sent to X and nothing of X's is needed";
const PIXEL_TOKEN: &str = "not asked: a pixel token (X-Pixel-Token) authenticates only the conversions endpoint, not the Ads API calls that show a user's access and an account's tags; X judges it on the first delivery (a 401 or 404 pauses the account, naming why)";

/// What X answered for one account with OAuth credentials.
struct XAnswers {
    access: Result<UserAccess, CallError>,
    /// `None`: not asked, the credentials did not work.
    tags: Option<Result<Vec<Tag>, CallError>>,
    clock: Option<ClockReading>,
}

async fn ask_x(settings: &Settings, account: &Account, options: &Options) -> Option<XAnswers> {
    if settings.upstream.sandbox {
        return None;
    }
    let credentials = oauth_credentials(account)?;
    let mut api = match AdsApi::new(&settings.upstream, credentials) {
        Ok(a) => a,
        Err(why) => {
            return Some(XAnswers {
                access: Err(CallError::Unreachable(why)),
                tags: None,
                clock: None,
            })
        }
    };
    if let Some(n) = options.page_size {
        api.page_size = n;
    }
    let Answer {
        result: access,
        clock,
    } = api.user_access(&account.ad_account_id).await;
    let tags = if access.is_ok() {
        let answer = api.tags(&account.ad_account_id).await;
        Some(answer.result)
    } else {
        None
    };
    Some(XAnswers {
        access,
        tags,
        clock,
    })
}

fn account_lines(
    name: &str,
    account: &Account,
    options: &Options,
    answers: Option<XAnswers>,
    sandbox: bool,
    clock_is_off: bool,
) -> Vec<Check> {
    // (configured name or None for a caller's event_id, SET id)
    let mut events: Vec<(Option<&str>, &str)> = account
        .events
        .iter()
        .map(|(event, set)| (Some(event.as_str()), set.as_str()))
        .collect();
    for id in &options.event_ids {
        if !account.events.values().any(|s| s == id) {
            events.push((None, id.as_str()));
        }
    }
    let what = |(event, set): &(Option<&str>, &str)| match event {
        Some(e) => format!("event {e}"),
        None => format!("event_id {set}"),
    };
    let Some(answers) = answers else {
        // The whole reason on the credentials line, a short one on the others.
        let (why, short) = if sandbox {
            (SANDBOX, "not asked: sandbox mode")
        } else {
            match &account.auth {
                Some(Auth::PixelToken { .. }) => (
                    PIXEL_TOKEN,
                    "not asked: a pixel token cannot ask the Ads API (see the credentials line)",
                ),
                _ => (
                    "not asked: the account has no credentials",
                    "not asked: no credentials",
                ),
            }
        };
        let mut lines = vec![Check::new("credentials", Status::Skip, why)];
        lines.extend(
            events
                .iter()
                .map(|e| Check::new(what(e), Status::Skip, short)),
        );
        lines.push(Check::new("pixel", Status::Skip, short));
        return lines;
    };
    let mut lines = vec![judge::access(
        name,
        &account.ad_account_id,
        &answers.access,
        clock_is_off,
    )];
    match &answers.tags {
        Some(Ok(tags)) => {
            for (event, set) in &events {
                lines.push(judge::event_tag(
                    name,
                    &account.ad_account_id,
                    *event,
                    set,
                    tags,
                ));
            }
            if events.is_empty() {
                lines.push(
                    Check::new(
                        "events",
                        Status::Warn,
                        format!(
                            "no event names configured: callers must send event_id; the account has {} tags",
                            tags.len()
                        ),
                    )
                    .fix(format!(
                        "map event names to SET ids under [accounts.{name}.events] (conversion-gateway events list --account {name} shows the tags)"
                    )),
                );
            }
            lines.push(judge::pixel(name, &account.pixel_id, tags));
        }
        Some(Err(e)) => {
            let why = format!("X could not list the account's tags: {e}");
            lines.extend(
                events
                    .iter()
                    .map(|e| Check::new(what(e), Status::Fail, why.clone())),
            );
            lines.push(Check::new("pixel", Status::Skip, why));
        }
        None => {
            let why = "not asked: the credentials do not work (see the credentials line)";
            lines.extend(
                events
                    .iter()
                    .map(|e| Check::new(what(e), Status::Skip, why)),
            );
            lines.push(Check::new("pixel", Status::Skip, why));
        }
    }
    lines
}

/// X's clock from any answer of its host: for setups where no account could be asked.
async fn plain_clock(settings: &Settings) -> Option<ClockReading> {
    let http = reqwest::Client::builder()
        .timeout(settings.upstream.timeout)
        .build()
        .ok()?;
    let sent = SystemTime::now();
    let response = http.get(&settings.upstream.base_url).send().await.ok()?;
    ClockReading::of(response.headers(), sent, SystemTime::now())
}

fn configuration(settings: &Settings) -> Check {
    let n = settings.accounts.len();
    if n == 0 {
        return Check::new(
            "configuration",
            Status::Fail,
            "valid, but no account is configured: every event would be rejected",
        )
        .fix("add an [accounts.NAME] table (README: Configuration)");
    }
    Check::new(
        "configuration",
        Status::Pass,
        format!(
            "valid: {n} account{}, upstream {} (version {}){}",
            if n == 1 { "" } else { "s" },
            settings.upstream.base_url,
            settings.upstream.api_version,
            if settings.upstream.sandbox {
                ", sandbox mode"
            } else {
                ""
            }
        ),
    )
}

fn spool(settings: &Settings) -> Check {
    if settings.spool.backend == SpoolBackend::Redis {
        return Check::new(
            "spool",
            Status::Pass,
            "events wait in Redis (spool.backend = \"redis\"; see the redis line)",
        );
    }
    let dir = &settings.spool.dir;
    let shown = dir.display().to_string();
    if let Err(why) = probe_write(dir) {
        return Check::new(
            "spool",
            Status::Fail,
            format!("{shown} is not writable: {why}"),
        )
        .fix("make spool.dir a directory the gateway's user can write (in a container, a volume mounted there)");
    }
    let free = match fs4::available_space(dir) {
        Ok(f) => f,
        Err(e) => {
            return Check::new(
                "spool",
                Status::Fail,
                format!("{shown}: cannot tell the free space: {e}"),
            )
        }
    };
    let used: u64 = ["spool.redb", "intake.log"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    judge::spool_room(
        &shown,
        free,
        settings.spool.min_free_bytes,
        settings.spool.max_bytes,
        used,
    )
}

/// Creates `dir` if missing, then writes, syncs and removes a file in it.
fn probe_write(dir: &Path) -> Result<(), String> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let probe = dir.join(format!(".doctor-probe-{}", std::process::id()));
    let written = std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"doctor").and_then(|()| f.sync_all()));
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| e.to_string())?;
    removed.map_err(|e| format!("wrote a file but cannot remove it: {e}"))
}

async fn redis(settings: &Settings) -> Check {
    let used = settings.spool.backend == SpoolBackend::Redis
        || settings.limiter.backend == LimiterBackend::Redis;
    let Some(url) = settings.redis.url.as_ref().filter(|_| used) else {
        return Check::new(
            "redis",
            Status::Skip,
            "not used: spool.backend and limiter.backend are local",
        );
    };
    let store = match crate::redis_store::Store::open(url, &settings.redis.key_prefix) {
        Ok(s) => s,
        Err(why) => return Check::new("redis", Status::Fail, why).fix("check redis.url"),
    };
    let pinged = tokio::time::timeout(Duration::from_secs(5), store.ping()).await;
    match pinged {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            return Check::new(
                "redis",
                Status::Fail,
                format!("{} does not answer: {why}", url.redacted()),
            )
            .fix("check redis.url (host, port, password, rediss:// for TLS) and that Redis runs");
        }
        Err(_) => {
            return Check::new(
                "redis",
                Status::Fail,
                format!("{} did not answer PING within 5 s", url.redacted()),
            )
            .fix("check redis.url and that this machine reaches it");
        }
    }
    use crate::redis_store::durability::{probe, Durability};
    match probe(&store).await {
        Durability::Durable => Check::new(
            "redis",
            Status::Pass,
            format!(
                "{} answers; appendonly yes, appendfsync always: a 202 means on Redis's disk",
                url.redacted()
            ),
        ),
        Durability::NotDurable(why) => Check::new(
            "redis",
            Status::Fail,
            format!(
                "{} answers, but an accepted event can be lost: {why}",
                url.redacted()
            ),
        )
        .fix("in redis.conf (or CONFIG SET): appendonly yes, appendfsync always"),
        Durability::Unknown(why) => Check::new(
            "redis",
            Status::Warn,
            format!(
                "{} answers; its persistence cannot be read ({why})",
                url.redacted()
            ),
        )
        .fix("make sure the provider runs it with an fsync-always append-only file"),
    }
}

impl Report {
    /// The report for people: one line per check, a fix under each failure, a summary at the end.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let width = self
            .accounts
            .iter()
            .flat_map(|a| &a.checks)
            .chain(&self.gateway)
            .map(|c| c.check.len())
            .max()
            .unwrap_or(0);
        let lines = |out: &mut String, checks: &[Check]| {
            for c in checks {
                out.push_str(&format!(
                    "  {:<4}  {:<width$}  {}\n",
                    c.status.label(),
                    c.check,
                    c.detail
                ));
                if let Some(fix) = &c.fix {
                    out.push_str(&format!("        {:<width$}  fix: {fix}\n", ""));
                }
            }
        };
        for a in &self.accounts {
            out.push_str(&format!(
                "account {} (ad account {}, pixel {})\n",
                a.name, a.ad_account_id, a.pixel_id
            ));
            lines(&mut out, &a.checks);
            out.push('\n');
        }
        out.push_str("gateway\n");
        lines(&mut out, &self.gateway);
        let s = &self.summary;
        out.push_str(&format!(
            "\n{} failed, {} warned, {} passed, {} skipped\n",
            s.failed, s.warned, s.passed, s.skipped
        ));
        out
    }
}
