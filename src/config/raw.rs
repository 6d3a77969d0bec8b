//! The configuration's raw shape, as written (strings where validation must name the key itself), and
//! how it becomes `Settings`: every value checked, every error naming its key.

use super::*;
use crate::conversion::BATCH_ENVELOPE;
use serde::de::{self, Deserializer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    server: RawServer,
    spool: RawSpool,
    limiter: RawLimiter,
    redis: RawRedis,
    upstream: RawUpstream,
    delivery: RawDelivery,
    log: RawLog,
    privacy: RawPrivacy,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    suppression_list_file: Option<PathBuf>,
    #[serde(deserialize_with = "flag")]
    honor_gpc: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(deserialize_with = "text")]
    listen: String,
    #[serde(deserialize_with = "text")]
    admin_listen: String,
    #[serde(deserialize_with = "text_list")]
    api_keys: Vec<String>,
    api_keys_file: Option<PathBuf>,
    #[serde(deserialize_with = "flag")]
    allow_unauthenticated: bool,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(deserialize_with = "text_list")]
    admin_api_keys: Vec<String>,
    admin_api_keys_file: Option<PathBuf>,
    #[serde(default)]
    admin_keys: Vec<RawAdminKey>,
    #[serde(deserialize_with = "count")]
    max_body_bytes: u64,
    #[serde(deserialize_with = "count")]
    max_events_per_request: u64,
    #[serde(deserialize_with = "text")]
    max_event_bytes: String,
    #[serde(deserialize_with = "text")]
    max_inflight_body_bytes: String,
    #[serde(deserialize_with = "text")]
    header_timeout: String,
    #[serde(deserialize_with = "text")]
    body_timeout: String,
    #[serde(deserialize_with = "text")]
    idle_timeout: String,
    #[serde(deserialize_with = "count")]
    max_connections: u64,
    #[serde(deserialize_with = "flag")]
    ready_requires_spool: bool,
    #[serde(deserialize_with = "text")]
    shutdown_timeout: String,
}

/// `[[server.keys]]`: an ingest key (inline or in a file of keys, one per line) and its accounts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(default, deserialize_with = "opt_text")]
    key: Option<String>,
    key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_text_list")]
    accounts: Option<Vec<String>>,
}

/// `[[server.admin_keys]]`: an admin key and its role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminKey {
    #[serde(default, deserialize_with = "opt_text")]
    key: Option<String>,
    key_file: Option<PathBuf>,
    role: AdminRole,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    backend: SpoolBackend,
    dir: PathBuf,
    #[serde(deserialize_with = "text")]
    max_bytes: String,
    #[serde(deserialize_with = "count")]
    max_dead_letters: u64,
    #[serde(deserialize_with = "text")]
    min_free_bytes: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimiter {
    backend: LimiterBackend,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    #[serde(default, deserialize_with = "opt_text")]
    url: Option<String>,
    url_file: Option<PathBuf>,
    #[serde(deserialize_with = "text")]
    key_prefix: String,
    #[serde(deserialize_with = "text")]
    consumer: String,
    #[serde(deserialize_with = "text")]
    claim_idle: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(deserialize_with = "text")]
    base_url: String,
    #[serde(deserialize_with = "text")]
    api_version: String,
    #[serde(deserialize_with = "text")]
    timeout: String,
    #[serde(deserialize_with = "flag")]
    sandbox: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    #[serde(deserialize_with = "count")]
    max_batch: u64,
    #[serde(deserialize_with = "text")]
    max_batch_bytes: String,
    #[serde(deserialize_with = "text")]
    linger: String,
    #[serde(deserialize_with = "text")]
    max_event_age: String,
    #[serde(deserialize_with = "text")]
    dedup_window: String,
    #[serde(deserialize_with = "text")]
    retry_base: String,
    #[serde(deserialize_with = "text")]
    retry_cap: String,
    #[serde(deserialize_with = "text")]
    pause_cap: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: LogFormat,
    #[serde(deserialize_with = "text")]
    level: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    #[serde(default, deserialize_with = "opt_text")]
    ad_account_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    pixel_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    default_phone_region: Option<String>,
    #[serde(default)]
    events: BTreeMap<String, serde_json::Value>,
    rate_limit: Option<RawRateLimit>,
    auth: Option<RawAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    #[serde(default, deserialize_with = "opt_count")]
    events: Option<u64>,
    #[serde(default, deserialize_with = "opt_text")]
    window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default, deserialize_with = "opt_text")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    consumer_key: Option<String>,
    consumer_key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_text")]
    consumer_secret: Option<String>,
    consumer_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_text")]
    access_token: Option<String>,
    access_token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_text")]
    access_token_secret: Option<String>,
    access_token_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_text")]
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// Environment variables are always text; numbers and booleans in TOML are not. Accept both.
fn scalar_text(v: serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    scalar_text(serde_json::Value::deserialize(d)?)
        .ok_or_else(|| de::Error::custom("expected a string"))
}

fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v => scalar_text(v)
            .map(Some)
            .ok_or_else(|| de::Error::custom("expected a string")),
    }
}

/// A list, or (from the environment) one comma-separated string.
fn text_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| scalar_text(v).ok_or_else(|| de::Error::custom("expected a list of strings")))
            .collect(),
        serde_json::Value::String(s) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()),
        serde_json::Value::Null => Ok(Vec::new()),
        _ => Err(de::Error::custom("expected a list of strings")),
    }
}

fn opt_text_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| scalar_text(v).ok_or_else(|| de::Error::custom("expected a list of strings")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        _ => Err(de::Error::custom("expected a list of strings")),
    }
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => Ok(b),
        serde_json::Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        serde_json::Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(de::Error::custom("expected true or false")),
    }
}

fn parse_count(v: serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().replace('_', "").parse().ok(),
        _ => None,
    }
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse_count(serde_json::Value::deserialize(d)?)
        .ok_or_else(|| de::Error::custom("expected a whole number of 0 or more"))
}

fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v => parse_count(v)
            .map(Some)
            .ok_or_else(|| de::Error::custom("expected a whole number of 0 or more")),
    }
}

fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => err(key, "must be longer than zero"),
        Err(_) => err(key, format!("{text:?} is not a duration; write a number and a unit, e.g. \"500ms\", \"10s\", \"15m\", \"7d\"")),
    }
}

/// A size: a whole number of bytes, or a number with a unit (`512KiB`, `64MiB`, `1GiB`, `10MB`).
pub(super) fn size(key: &str, text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        "tib" => 1 << 40,
        _ => return err(key, format!("{text:?} is not a size; write bytes or a number with a unit, e.g. \"512MiB\", \"1GiB\"")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .map_or_else(|| err(key, format!("{text:?} is not a size; write bytes or a number with a unit, e.g. \"512MiB\", \"1GiB\"")), Ok)
}

fn socket(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().or_else(|_| {
        err(
            key,
            format!("{text:?} is not an address; write host:port, e.g. \"127.0.0.1:8080\""),
        )
    })
}

/// A secret given inline or as `<name>_file`; exactly one of the two.
fn secret(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => err(key, format!("give either {key} or {key}_file, not both")),
        (Some(v), None) if v.trim().is_empty() => err(key, "is empty"),
        (Some(v), None) => Ok(Some(Secret(v))),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(v) if v.trim().is_empty() => err(
                format!("{key}_file"),
                format!("{} is empty", path.display()),
            ),
            Ok(v) => Ok(Some(Secret(v.trim().to_owned()))),
            Err(e) => err(
                format!("{key}_file"),
                format!("cannot read {}: {e}", path.display()),
            ),
        },
        (None, None) => Ok(None),
    }
}

fn required_secret(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Secret, ConfigError> {
    secret(key, inline, file)?
        .map_or_else(|| err(key, format!("missing; set {key} or {key}_file")), Ok)
}

fn keys(key: &str, inline: Vec<String>, file: Option<PathBuf>) -> Result<Vec<Secret>, ConfigError> {
    let mut out: Vec<Secret> = inline.into_iter().map(Secret).collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path).or_else(|e| {
            err(
                format!("{key}_file"),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| Secret(l.to_owned())),
        );
    }
    if out.iter().any(|k| k.0.trim().is_empty()) {
        return err(key, "contains an empty key");
    }
    Ok(out)
}

/// A duration that must be above 0.
fn positive_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    match duration(key, text)? {
        d if d.is_zero() => err(key, "must be greater than 0"),
        d => Ok(d),
    }
}

/// A count or size that must be above 0 and fit this machine's `usize`.
fn positive_usize(key: &str, n: u64) -> Result<usize, ConfigError> {
    match n {
        0 => err(key, "must be greater than 0"),
        n => usize::try_from(n).or_else(|_| err(key, "is too large")),
    }
}

impl RawSettings {
    pub(super) fn validate(self) -> Result<Settings, ConfigError> {
        // Section by section, in this order: the first error found is the one reported.
        let server = self.server.validate()?;
        if server.max_inflight_body_bytes < server.max_body_bytes {
            return err(
                "server.max_inflight_body_bytes",
                format!(
                    "is {}; it must hold at least one body of server.max_body_bytes ({})",
                    server.max_inflight_body_bytes, server.max_body_bytes
                ),
            );
        }
        let upstream = self.upstream.validate()?;
        let delivery = self.delivery.validate()?;
        if server.max_event_bytes + BATCH_ENVELOPE > delivery.max_batch_bytes {
            return err(
                "server.max_event_bytes",
                format!(
                    "is {}; an event must fit in one batch: at most delivery.max_batch_bytes ({}) less {BATCH_ENVELOPE}",
                    server.max_event_bytes, delivery.max_batch_bytes
                ),
            );
        }
        let log = self.log.validate()?;
        let accounts = validate_accounts(self.accounts, &delivery, upstream.sandbox)?;
        for k in &server.keys {
            let i = k.entry;
            for a in k.accounts.iter().flatten() {
                if !accounts.contains_key(a) {
                    let known: Vec<&str> = accounts.keys().map(String::as_str).collect();
                    return err(
                        format!("server.keys[{i}].accounts"),
                        format!(
                            "names {a:?}, which is not a configured account; the accounts are: {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        let spool = self.spool.validate()?;
        let limiter = Limiter {
            backend: self.limiter.backend,
        };
        let redis = self.redis.validate()?;
        if redis.url.is_none() {
            for (key, wanted) in [
                ("spool.backend", spool.backend == SpoolBackend::Redis),
                ("limiter.backend", limiter.backend == LimiterBackend::Redis),
            ] {
                if wanted {
                    return err(key, "is \"redis\" but [redis] has no url; set redis.url (or redis.url_file), e.g. \"redis://127.0.0.1:6379/0\"");
                }
            }
        }
        if spool.backend == SpoolBackend::Redis && limiter.backend != LimiterBackend::Redis {
            return err(
                "limiter.backend",
                "must be \"redis\" when spool.backend is \"redis\": every replica delivers from the shared queue, so they must draw on one shared budget (else each sends the account's whole rate)",
            );
        }
        Ok(Settings {
            server,
            spool,
            limiter,
            redis,
            upstream,
            delivery,
            log,
            privacy: Privacy {
                suppression_list_file: self.privacy.suppression_list_file,
                honor_gpc: self.privacy.honor_gpc,
            },
            accounts,
        })
    }
}

/// The keys of one `[[server.keys]]` / `[[server.admin_keys]]` entry: `key` or `key_file`, not both.
fn entry_keys(
    at: &str,
    key: Option<String>,
    file: Option<PathBuf>,
) -> Result<Vec<Secret>, ConfigError> {
    if key.is_some() && file.is_some() {
        return err(format!("{at}.key"), "and key_file are both set; keep one");
    }
    let found = keys(&format!("{at}.key"), key.into_iter().collect(), file)?;
    if found.is_empty() {
        return err(
            format!("{at}.key"),
            "is missing; set key, or key_file (a file of keys, one per line)",
        );
    }
    Ok(found)
}

/// Every key once, across the lists that grant it: a key granted twice would have two meanings.
fn no_key_twice<'a>(
    list: &str,
    places: impl IntoIterator<Item = (String, &'a Secret)>,
) -> Result<(), ConfigError> {
    let mut seen: Vec<(String, &Secret)> = Vec::new();
    for (place, key) in places {
        if let Some((first, _)) = seen.iter().find(|(_, k)| *k == key) {
            return err(
                place,
                format!("holds a key already given in {first}; each {list} key may appear once"),
            );
        }
        seen.push((place, key));
    }
    Ok(())
}

impl RawServer {
    fn validate(self) -> Result<Server, ConfigError> {
        let s = self;
        let api_keys = keys("server.api_keys", s.api_keys, s.api_keys_file)?;
        let mut scoped = Vec::new();
        for (i, k) in s.keys.into_iter().enumerate() {
            let at = format!("server.keys[{i}]");
            if k.accounts.as_ref().is_some_and(Vec::is_empty) {
                return err(
                    format!("{at}.accounts"),
                    "is empty; name the accounts this key may send events for, or omit it for every account",
                );
            }
            for key in entry_keys(&at, k.key, k.key_file)? {
                scoped.push((
                    at.clone(),
                    IngestKey {
                        key,
                        accounts: k.accounts.clone(),
                        entry: i,
                    },
                ));
            }
        }
        if api_keys.is_empty() && scoped.is_empty() && !s.allow_unauthenticated {
            return err("server.api_keys", "is empty; add at least one key (here or in [[server.keys]]), or set server.allow_unauthenticated = true to accept anyone");
        }
        no_key_twice(
            "ingest",
            api_keys
                .iter()
                .map(|k| ("server.api_keys".to_owned(), k))
                .chain(scoped.iter().map(|(at, k)| (at.clone(), &k.key))),
        )?;
        let admin_api_keys = keys(
            "server.admin_api_keys",
            s.admin_api_keys,
            s.admin_api_keys_file,
        )?;
        let mut admin_keys = Vec::new();
        for (i, k) in s.admin_keys.into_iter().enumerate() {
            let at = format!("server.admin_keys[{i}]");
            for key in entry_keys(&at, k.key, k.key_file)? {
                admin_keys.push((at.clone(), AdminKey { key, role: k.role }));
            }
        }
        no_key_twice(
            "admin",
            admin_api_keys
                .iter()
                .map(|k| ("server.admin_api_keys".to_owned(), k))
                .chain(admin_keys.iter().map(|(at, k)| (at.clone(), &k.key))),
        )?;
        Ok(Server {
            listen: socket("server.listen", &s.listen)?,
            admin_listen: socket("server.admin_listen", &s.admin_listen)?,
            api_keys,
            keys: scoped.into_iter().map(|(_, k)| k).collect(),
            allow_unauthenticated: s.allow_unauthenticated,
            admin_api_keys,
            admin_keys: admin_keys.into_iter().map(|(_, k)| k).collect(),
            max_body_bytes: positive_usize("server.max_body_bytes", s.max_body_bytes)?,
            max_events_per_request: positive_usize(
                "server.max_events_per_request",
                s.max_events_per_request,
            )?,
            max_event_bytes: positive_usize(
                "server.max_event_bytes",
                size("server.max_event_bytes", &s.max_event_bytes)?,
            )?,
            max_inflight_body_bytes: positive_usize(
                "server.max_inflight_body_bytes",
                size("server.max_inflight_body_bytes", &s.max_inflight_body_bytes)?,
            )?,
            header_timeout: match duration("server.header_timeout", &s.header_timeout)? {
                d if d.is_zero() => return err("server.header_timeout", "must be greater than 0"),
                d => d,
            },
            body_timeout: positive_duration("server.body_timeout", &s.body_timeout)?,
            idle_timeout: positive_duration("server.idle_timeout", &s.idle_timeout)?,
            max_connections: positive_usize("server.max_connections", s.max_connections)?,
            ready_requires_spool: s.ready_requires_spool,
            shutdown_timeout: duration("server.shutdown_timeout", &s.shutdown_timeout)?,
        })
    }
}

impl RawUpstream {
    fn validate(self) -> Result<Upstream, ConfigError> {
        let u = self;
        let base_url = u.base_url.trim().trim_end_matches('/').to_owned();
        match url::Url::parse(&base_url) {
            Ok(parsed)
                if matches!(parsed.scheme(), "http" | "https")
                    && parsed.has_host()
                    && parsed.query().is_none() => {}
            _ => {
                return err(
                    "upstream.base_url",
                    format!(
                        "{:?} is not an http(s) URL such as \"https://ads-api.x.com\"",
                        u.base_url
                    ),
                )
            }
        }
        let api_version = u.api_version.trim().to_owned();
        if api_version.is_empty() || !api_version.bytes().all(|b| b.is_ascii_digit()) {
            return err(
                "upstream.api_version",
                format!(
                    "{:?} is not an API version number such as \"12\"",
                    u.api_version
                ),
            );
        }
        Ok(Upstream {
            base_url,
            api_version,
            timeout: duration("upstream.timeout", &u.timeout)?,
            sandbox: u.sandbox,
        })
    }
}

impl RawDelivery {
    fn validate(self) -> Result<Delivery, ConfigError> {
        let d = self;
        if !(1..=500).contains(&d.max_batch) {
            return err("delivery.max_batch", format!("is {}; it must be between 1 and 500 (X accepts at most 500 conversions per request)", d.max_batch));
        }
        let delivery = Delivery {
            max_batch: d.max_batch as usize,
            max_batch_bytes: match size("delivery.max_batch_bytes", &d.max_batch_bytes)? {
                n if n < 1024 => {
                    return err(
                        "delivery.max_batch_bytes",
                        "must be at least 1KiB (one conversion and the request around it)",
                    )
                }
                n => usize::try_from(n)
                    .or_else(|_| err("delivery.max_batch_bytes", "is too large"))?,
            },
            linger: duration("delivery.linger", &d.linger)?,
            max_event_age: duration("delivery.max_event_age", &d.max_event_age)?,
            dedup_window: duration("delivery.dedup_window", &d.dedup_window)?,
            retry_base: duration("delivery.retry_base", &d.retry_base)?,
            retry_cap: duration("delivery.retry_cap", &d.retry_cap)?,
            pause_cap: duration("delivery.pause_cap", &d.pause_cap)?,
        };
        if delivery.retry_cap < delivery.retry_base {
            return err(
                "delivery.retry_cap",
                "must not be shorter than delivery.retry_base",
            );
        }
        Ok(delivery)
    }
}

impl RawLog {
    fn validate(self) -> Result<Log, ConfigError> {
        let level = self.level.trim().to_owned();
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return err("log.level", format!("{level:?} is not a level filter such as \"info\" or \"conversion_gateway=debug,warn\""));
        }
        Ok(Log {
            format: self.format,
            level,
        })
    }
}

impl RawRedis {
    fn validate(self) -> Result<Redis, ConfigError> {
        let url = match secret("redis.url", self.url, self.url_file)? {
            None => None,
            Some(url) => {
                let key = "redis.url";
                match url::Url::parse(url.expose()) {
                    Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host().is_some() => {}
                    Ok(u) => {
                        return err(
                            key,
                            format!(
                                "has scheme {:?}; use redis://host:port/db (or rediss:// for TLS)",
                                u.scheme()
                            ),
                        )
                    }
                    // The parser's message never quotes the URL, which may hold a password.
                    Err(e) => {
                        return err(
                            key,
                            format!(
                            "is not a URL ({e}); use redis://host:port/db (or rediss:// for TLS)"
                        ),
                        )
                    }
                }
                Some(RedisUrl(url))
            }
        };
        let prefix = self.key_prefix.trim();
        if prefix.is_empty()
            || prefix.contains(['{', '}'])
            || prefix.chars().any(char::is_whitespace)
        {
            return err(
                "redis.key_prefix",
                "must be non-empty, without spaces or braces (the gateway adds the hash tags itself)",
            );
        }
        let consumer = match self.consumer.trim() {
            "" => host_name(),
            c => c.to_owned(),
        };
        if consumer.is_empty() {
            return err(
                "redis.consumer",
                "is empty and this machine has no host name; set redis.consumer to this replica's name",
            );
        }
        let claim_idle = match duration("redis.claim_idle", &self.claim_idle)? {
            d if d < Duration::from_secs(1) => {
                return err("redis.claim_idle", "must be at least 1s")
            }
            d => d,
        };
        Ok(Redis {
            url,
            key_prefix: prefix.to_owned(),
            consumer,
            claim_idle,
        })
    }
}

/// The host name (a pod's name in Kubernetes), or "" when there is none.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

impl RawSpool {
    fn validate(self) -> Result<Spool, ConfigError> {
        Ok(Spool {
            backend: self.backend,
            dir: self.dir,
            max_bytes: match size("spool.max_bytes", &self.max_bytes)? {
                n if n < crate::spool::disk::MIN_MAX_BYTES => {
                    return err(
                        "spool.max_bytes",
                        format!(
                            "is {n}; the spool's files need at least {} bytes (16MiB)",
                            crate::spool::disk::MIN_MAX_BYTES
                        ),
                    )
                }
                n => n,
            },
            max_dead_letters: self.max_dead_letters,
            min_free_bytes: size("spool.min_free_bytes", &self.min_free_bytes)?,
        })
    }
}

/// Every account, checked on its own, and accounts of one ad account against each other.
fn validate_accounts(
    raw: BTreeMap<String, RawAccount>,
    delivery: &Delivery,
    sandbox: bool,
) -> Result<BTreeMap<String, Account>, ConfigError> {
    if raw.is_empty() {
        return err(
            "accounts",
            "no account is configured; add an [accounts.<name>] section",
        );
    }
    let mut accounts: BTreeMap<String, Account> = BTreeMap::new();
    for (name, a) in raw {
        let account = validate_account(&name, a, delivery, sandbox)?;
        // Accounts that share an ad account share its budget: they must agree on it.
        if let Some((other, o)) = accounts
            .iter()
            .find(|(_, o)| o.ad_account_id == account.ad_account_id)
        {
            if (o.rate_limit.events, o.rate_limit.window)
                != (account.rate_limit.events, account.rate_limit.window)
            {
                return err(
                    format!("accounts.{name}.rate_limit"),
                    format!("differs from accounts.{other}.rate_limit, which has the same ad_account_id; accounts of one ad account share one budget"),
                );
            }
        }
        accounts.insert(name, account);
    }
    Ok(accounts)
}

/// Whether `name` can name an account: a-z, 0-9 and `_`, not empty (names appear in metric labels and in
/// `GATEWAY_ACCOUNTS__<NAME>__...` variables).
pub fn is_account_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn validate_account(
    name: &str,
    a: RawAccount,
    delivery: &Delivery,
    sandbox: bool,
) -> Result<Account, ConfigError> {
    let p = format!("accounts.{name}");
    if !is_account_name(name) {
        return err(&p, "account names use only a-z, 0-9 and _ (they appear in metrics and in GATEWAY_ACCOUNTS__<NAME>__... variables)");
    }
    if name == crate::metrics::UNKNOWN_ACCOUNT {
        return err(&p, "\"unknown\" is reserved: metrics count rejected events of no configured account under it; choose another name");
    }
    let base36 = |key: &str, v: Option<String>, example: &str| -> Result<String, ConfigError> {
        let full = format!("{p}.{key}");
        match v.map(|v| v.trim().to_owned()) {
            None => err(
                full,
                format!("missing; set it to the id from Events Manager, e.g. {example:?}"),
            ),
            Some(v) if is_base36_id(&v) => Ok(v),
            Some(v) => err(
                full,
                format!(
                    "{v:?} is not a base-36 id (lower-case letters and digits, e.g. {example:?})"
                ),
            ),
        }
    };
    let ad_account_id = base36("ad_account_id", a.ad_account_id, "18ce552mlaq")?;
    let pixel_id = base36("pixel_id", a.pixel_id, "o9d7n")?;
    let region = a
        .default_phone_region
        .unwrap_or_else(|| "US".into())
        .trim()
        .to_ascii_uppercase();
    if region.parse::<phonenumber::country::Id>().is_err() {
        return err(
            format!("{p}.default_phone_region"),
            format!("{region:?} is not an ISO 3166 region code such as \"US\" or \"GB\""),
        );
    }
    let mut events = BTreeMap::new();
    for (event, set) in a.events {
        let key = format!("{p}.events.{event}");
        let set = scalar_text(set).map(|s| s.trim().to_owned());
        match set {
            Some(set) if is_base36_id(&set) => {
                events.insert(event, set);
            }
            _ => {
                return err(
                    key,
                    "is not a Single Event Tag id (base-36, e.g. \"o9d2g\")",
                )
            }
        }
    }
    let rl = a.rate_limit.unwrap_or(RawRateLimit {
        events: None,
        window: None,
    });
    let rate_limit = RateLimit {
        events: rl.events.unwrap_or(60_000),
        window: duration(
            &format!("{p}.rate_limit.window"),
            rl.window.as_deref().unwrap_or("15m"),
        )?,
    };
    if rate_limit.events <= delivery.max_batch as u64 {
        return err(
            format!("{p}.rate_limit.events"),
            format!(
                "is {}; it must be larger than delivery.max_batch ({})",
                rate_limit.events, delivery.max_batch
            ),
        );
    }
    let auth = match a.auth {
        None if sandbox => None,
        None => return err(format!("{p}.auth"), "missing; set auth = { kind = \"oauth1\", ... } or { kind = \"pixel_token\", token = \"...\" } (only upstream.sandbox = true runs without)"),
        Some(auth) => Some(validate_auth(&format!("{p}.auth"), auth)?),
    };
    Ok(Account {
        ad_account_id,
        pixel_id,
        default_phone_region: region,
        events,
        rate_limit,
        auth,
    })
}

fn validate_auth(p: &str, a: RawAuth) -> Result<Auth, ConfigError> {
    let k = |field: &str| format!("{p}.{field}");
    match a.kind.as_deref().map(str::trim) {
        Some("oauth1") => {
            if a.token.is_some() || a.token_file.is_some() {
                return err(k("token"), "belongs to kind = \"pixel_token\", not oauth1");
            }
            Ok(Auth::Oauth1 {
                consumer_key: required_secret(
                    &k("consumer_key"),
                    a.consumer_key,
                    a.consumer_key_file,
                )?,
                consumer_secret: required_secret(
                    &k("consumer_secret"),
                    a.consumer_secret,
                    a.consumer_secret_file,
                )?,
                access_token: required_secret(
                    &k("access_token"),
                    a.access_token,
                    a.access_token_file,
                )?,
                access_token_secret: required_secret(
                    &k("access_token_secret"),
                    a.access_token_secret,
                    a.access_token_secret_file,
                )?,
            })
        }
        Some("pixel_token") => Ok(Auth::PixelToken {
            token: required_secret(&k("token"), a.token, a.token_file)?,
        }),
        Some(other) => err(
            k("kind"),
            format!("{other:?} is not an auth kind; use \"oauth1\" or \"pixel_token\""),
        ),
        None => err(k("kind"), "missing; use \"oauth1\" or \"pixel_token\""),
    }
}
