//! What each answer means for a setup: pure judgements from what X (or the machine) answered to one line
//! of the checklist, passed, warned, failed or skipped, with what to do. No I/O: `doctor` asks, this says.
//!
//! # Invariants
//! - A failed line always says what to change, in the setup guide's terms and naming the configuration key.
//! - No line holds a secret: credentials are named by their key, never shown.

use super::ads_api::{CallError, ClockReading, Tag, UserAccess};
use crate::units::bytes;
use serde::Serialize;
use std::time::{Duration, SystemTime};

/// The permissions the Conversions API needs one of (the setup guide).
pub const NEEDED_PERMISSIONS: [&str; 2] = ["ACCOUNT_ADMIN", "AD_MANAGER"];

/// How far the clock may be from X's (OAuth timestamps).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Works, with something worth knowing; does not fail the run.
    Warn,
    Fail,
    /// Could not be checked, and says why; does not fail the run.
    Skip,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What is checked: `credentials`, `event purchase`, `pixel`, `clock`, `spool`, `redis`, ...
    pub check: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The tag an event line found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<Tag>,
}

impl Check {
    pub fn new(check: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            status,
            detail: detail.into(),
            fix: None,
            tag: None,
        }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
}

/// The credentials line, from `authenticated_user_access`'s answer.
pub fn access(
    account: &str,
    ad_account: &str,
    answer: &Result<UserAccess, CallError>,
    clock_is_off: bool,
) -> Check {
    let auth = format!("accounts.{account}.auth");
    match answer {
        Ok(user) => {
            let held: Vec<&str> = user.permissions.iter().map(String::as_str).collect();
            match NEEDED_PERMISSIONS.iter().find(|p| held.contains(p)) {
                Some(p) => Check::new(
                    "credentials",
                    Status::Pass,
                    format!("the token's user {} is {p} on ad account {ad_account}", user.user_id),
                ),
                None => Check::new(
                    "credentials",
                    Status::Fail,
                    format!(
                        "the token's user {} holds {} on ad account {ad_account}; the Conversions API needs AD_MANAGER or ACCOUNT_ADMIN",
                        user.user_id,
                        if held.is_empty() { "no permission".to_owned() } else { held.join(", ") }
                    ),
                )
                .fix(format!(
                    "an admin of the ad account gives user {} the Ad Manager or Account Administrator role (Ads Manager, account settings, multi-user login), or {auth} gets the access token of a user who has it",
                    user.user_id
                )),
            }
        }
        Err(CallError::Status { status: 401, errors }) => Check::new(
            "credentials",
            Status::Fail,
            format!("X refused the credentials (401{})", codes(errors)),
        )
        .fix(if clock_is_off {
            "this machine's clock is off (see the clock line): X refuses OAuth timestamps that far from its own; set the clock right first".to_owned()
        } else {
            format!("{auth}.consumer_key and consumer_secret must be the app's API key and secret, access_token and access_token_secret a token generated for that same app (developer portal, keys and tokens); regenerate the token if it was revoked")
        }),
        Err(CallError::Status { status: 403, errors }) => Check::new(
            "credentials",
            Status::Fail,
            format!(
                "the app these credentials belong to has no Ads API access (403{})",
                codes(errors)
            ),
        )
        .fix(format!(
            "apply for Ads API access for the app (developer portal), or set {auth} to the keys of an app that has it"
        )),
        Err(CallError::Status { status: 404, errors }) => {
            let no_access = errors
                .iter()
                .any(|e| e.message.contains("does not have access"));
            if no_access {
                Check::new(
                    "credentials",
                    Status::Fail,
                    format!("the token's user has no access to ad account {ad_account} (404: {})", messages(errors)),
                )
                .fix(format!(
                    "add the user to ad account {ad_account} with the Ad Manager role (Ads Manager, multi-user login), or set {auth} to the token of a user of that account"
                ))
            } else {
                Check::new(
                    "credentials",
                    Status::Fail,
                    format!("X knows no ad account {ad_account} (404{})", codes(errors)),
                )
                .fix(format!(
                    "accounts.{account}.ad_account_id must be the id Ads Manager shows for the account (as in ads.x.com/.../{{id}}/...)"
                ))
            }
        }
        Err(CallError::Status { status, errors }) => Check::new(
            "credentials",
            Status::Fail,
            format!("X answered {status}{} when asked who the token's user is", codes(errors)),
        )
        .fix("try again later; if it persists, X's status page or developer forums say more"),
        Err(CallError::Unreachable(why)) => Check::new(
            "credentials",
            Status::Fail,
            format!("X could not be asked who the token's user is: {why}"),
        )
        .fix("check upstream.base_url and that this machine reaches it (proxy, firewall, DNS)"),
    }
}

/// The line of one event: its SET id is a tag of the ad account. `event` is its configured name, `None`
/// for an id callers send as `event_id`.
pub fn event_tag(
    account: &str,
    ad_account: &str,
    event: Option<&str>,
    set_id: &str,
    tags: &[Tag],
) -> Check {
    let what = match event {
        Some(e) => format!("event {e}"),
        None => format!("event_id {set_id}"),
    };
    let (key, name) = match event {
        Some(e) => (format!("accounts.{account}.events.{e}"), e),
        None => ("the event_id callers send".to_owned(), "NAME"),
    };
    let Some(tag) = tags.iter().find(|t| t.is(set_id)) else {
        return Check::new(
            what,
            Status::Fail,
            format!(
                "{set_id} is not a Single Event Tag of ad account {ad_account} (X would answer 404 \"event_id ({set_id}) does not belong to provided account\")"
            ),
        )
        .fix(format!(
            "set {key} to the event's id in Events Manager (shown under the tag's title), or create one: conversion-gateway events create --account {account} --name {name} --type PURCHASE"
        ));
    };
    let shown = format!(
        "{set_id}: {} tag {:?}, {}{}",
        if tag.kind.is_empty() { "a" } else { &tag.kind },
        tag.name,
        if tag.status.is_empty() {
            "status not shown"
        } else {
            &tag.status
        },
        tag.last_tracked_at
            .as_deref()
            .map(|t| format!(", last tracked {t}"))
            .unwrap_or_else(|| ", never tracked".into())
    );
    let mut check = if tag.deleted {
        Check::new(what, Status::Fail, format!("{shown}; it is deleted")).fix(format!(
            "create a new tag (conversion-gateway events create --account {account} --name {name} --type {}) and set {key} to its id",
            if tag.kind.is_empty() { "PURCHASE" } else { &tag.kind }
        ))
    } else if tag.status == "TRACKING" {
        Check::new(what, Status::Pass, shown)
    } else {
        Check::new(
            what,
            Status::Pass,
            format!("{shown} (X shows TRACKING 12 to 24 hours after a tag's first events)"),
        )
    };
    check.tag = Some(tag.clone());
    check
}

/// The pixel line: X's answers name a pixel only inside the tags' embed code (`tw-{pixel}-{tag}`).
pub fn pixel(account: &str, pixel_id: &str, tags: &[Tag]) -> Check {
    let shown: Vec<&str> = tags.iter().filter_map(pixel_in_embed_code).collect();
    if shown.is_empty() {
        return Check::new(
            "pixel",
            Status::Skip,
            "cannot be checked: no Ads API answer maps a pixel id to its account, and no tag's code names one; the first delivery tells (X answers 404 for a pixel of another account and the gateway pauses the account, naming it)",
        );
    }
    if shown.contains(&pixel_id) {
        Check::new(
            "pixel",
            Status::Pass,
            format!("{pixel_id} is the pixel the account's tags report to"),
        )
    } else {
        let mut others: Vec<&str> = shown.clone();
        others.sort_unstable();
        others.dedup();
        Check::new(
            "pixel",
            Status::Fail,
            format!(
                "{pixel_id} is not the account's pixel: its tags report to {}",
                others.join(", ")
            ),
        )
        .fix(format!(
            "set accounts.{account}.pixel_id to the Universal Website Tag's id (Events Manager, under the tag's title)"
        ))
    }
}

/// `tw-{pixel}-{tag}` in a tag's embed code, as X's event snippets name the pixel and the event.
fn pixel_in_embed_code(tag: &Tag) -> Option<&str> {
    let code = tag.embed_code.as_deref()?;
    let start = code.find("tw-")? + 3;
    let rest = code.get(start..)?;
    let end = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .unwrap_or(rest.len());
    let (pixel, tag_id) = rest.get(..end)?.split_once('-')?;
    (!pixel.is_empty() && tag.is(tag_id)).then_some(pixel)
}

/// The clock line, from X's `Date` header.
pub fn clock(reading: Option<ClockReading>) -> Check {
    let Some(r) = reading else {
        return Check::new(
            "clock",
            Status::Skip,
            "cannot be checked: no answer from X carried a Date header",
        );
    };
    let skew = skew_secs(&r);
    let (dir, by) = if skew >= 0.0 {
        ("behind", skew)
    } else {
        ("ahead of", -skew)
    };
    if by <= MAX_CLOCK_SKEW.as_secs_f64() {
        Check::new(
            "clock",
            Status::Pass,
            format!(
                "this machine's clock is within {} s of X's",
                by.ceil().max(1.0)
            ),
        )
    } else {
        Check::new(
            "clock",
            Status::Fail,
            format!("this machine's clock is {by:.0} s {dir} X's (its Date header); X refuses OAuth timestamps far from its own clock with 401"),
        )
        .fix("keep the clock synchronized (NTP: chrony or systemd-timesyncd on the host; a container takes the host's clock)")
    }
}

/// Whether X's clock is more than `MAX_CLOCK_SKEW` from ours.
pub fn clock_is_off(reading: Option<ClockReading>) -> bool {
    reading.is_some_and(|r| skew_secs(&r).abs() > MAX_CLOCK_SKEW.as_secs_f64())
}

/// X's clock minus ours at the call's midpoint, in seconds. X's `Date` has whole seconds, truncated, so
/// half a second is added to it.
fn skew_secs(r: &ClockReading) -> f64 {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let mid = (secs(r.sent) + secs(r.received)) / 2.0;
    secs(r.x_date) + 0.5 - mid
}

/// The spool's room: the disk must have more free than `min_free` (below it the gateway refuses events).
pub fn spool_room(dir: &str, free: u64, min_free: u64, max_bytes: u64, used: u64) -> Check {
    let room = format!(
        "{dir} is writable, {} free (spool.max_bytes {}, {} in use)",
        bytes(free),
        bytes(max_bytes),
        bytes(used)
    );
    if free <= min_free {
        Check::new(
            "spool",
            Status::Fail,
            format!(
                "{room}: below spool.min_free_bytes ({}), so every event would be refused",
                bytes(min_free)
            ),
        )
        .fix("free space on that disk or give spool.dir a larger volume")
    } else if free.saturating_add(used) < max_bytes.saturating_add(min_free) {
        Check::new(
            "spool",
            Status::Warn,
            format!(
                "{room}: the disk fills before the spool reaches spool.max_bytes; events are refused once {} is left",
                bytes(min_free)
            ),
        )
        .fix("a larger volume, or a lower spool.max_bytes, makes the spool's limit the one that holds")
    } else {
        Check::new("spool", Status::Pass, room)
    }
}

fn codes(errors: &[super::ads_api::XError]) -> String {
    let codes: Vec<&str> = errors
        .iter()
        .map(|e| e.code.as_str())
        .filter(|c| !c.is_empty())
        .collect();
    if codes.is_empty() {
        String::new()
    } else {
        format!(" {}", codes.join(", "))
    }
}

fn messages(errors: &[super::ads_api::XError]) -> String {
    errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::ads_api::XError;

    fn tag(id: &str, status: &str, embed: Option<&str>) -> Tag {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": "Purchase", "type": "PURCHASE", "status": status, "embed_code": embed
        }))
        .unwrap()
    }

    fn user(perms: &[&str]) -> Result<UserAccess, CallError> {
        Ok(UserAccess {
            user_id: "7562".into(),
            permissions: perms.iter().map(|p| p.to_string()).collect(),
        })
    }

    fn status(status: u16, code: &str, message: &str) -> Result<UserAccess, CallError> {
        Err(CallError::Status {
            status,
            errors: vec![XError {
                code: code.into(),
                message: message.into(),
                parameter: None,
            }],
        })
    }

    #[test]
    fn credentials_pass_only_with_a_permission_the_conversions_api_needs() {
        assert_eq!(
            access("shop", "18ce", &user(&["AD_MANAGER"]), false).status,
            Status::Pass
        );
        assert_eq!(
            access(
                "shop",
                "18ce",
                &user(&["TWEET_COMPOSER", "ACCOUNT_ADMIN"]),
                false
            )
            .status,
            Status::Pass
        );
        let c = access(
            "shop",
            "18ce",
            &user(&["CAMPAIGN_ANALYST", "TWEET_COMPOSER"]),
            false,
        );
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.contains("holds CAMPAIGN_ANALYST, TWEET_COMPOSER"),
            "{}",
            c.detail
        );
        assert!(access("shop", "18ce", &user(&[]), false)
            .detail
            .contains("no permission"));
    }

    #[test]
    fn xs_refusals_are_explained_in_the_setup_guides_terms() {
        let c = access(
            "shop",
            "18ce",
            &status(401, "UNAUTHORIZED_ACCESS", "x"),
            false,
        );
        assert!(c.fix.unwrap().contains("accounts.shop.auth.consumer_key"));
        let c = access(
            "shop",
            "18ce",
            &status(401, "UNAUTHORIZED_ACCESS", "x"),
            true,
        );
        assert!(c.fix.unwrap().contains("clock"));
        let c = access(
            "shop",
            "18ce",
            &status(403, "UNAUTHORIZED_CLIENT", "x"),
            false,
        );
        assert!(c.detail.contains("no Ads API access"));
        let c = access(
            "shop",
            "18ce",
            &status(
                404,
                "NOT_FOUND",
                "User 1 does not have access to account 18ce",
            ),
            false,
        );
        assert!(
            c.detail.contains("no access to ad account 18ce"),
            "{}",
            c.detail
        );
        let c = access(
            "shop",
            "18ce",
            &status(404, "NOT_FOUND", "Account 18ce was not found"),
            false,
        );
        assert!(c.fix.unwrap().contains("accounts.shop.ad_account_id"));
        let c = access(
            "shop",
            "18ce",
            &Err(CallError::Unreachable("cannot connect".into())),
            false,
        );
        assert_eq!(c.status, Status::Fail);
    }

    #[test]
    fn an_event_passes_when_its_set_id_is_a_live_tag() {
        let tags = [
            tag("o9d2g", "TRACKING", None),
            tag("o9d2h", "UNVERIFIED", None),
        ];
        let c = event_tag("shop", "18ce", Some("purchase"), "o9d2g", &tags);
        assert_eq!((c.status, c.tag.is_some()), (Status::Pass, true));
        let c = event_tag("shop", "18ce", Some("signup"), "o9d2h", &tags);
        assert!(c.status == Status::Pass && c.detail.contains("UNVERIFIED"));
        let c = event_tag("shop", "18ce", Some("lead"), "zzzzz", &tags);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("accounts.shop.events.lead"));
        let mut gone = tag("o9d2g", "TRACKING", None);
        gone.deleted = true;
        assert_eq!(
            event_tag("shop", "18ce", None, "o9d2g", &[gone]).status,
            Status::Fail
        );
    }

    #[test]
    fn the_pixel_is_judged_only_where_a_tags_code_names_it() {
        let code = |p: &str| {
            Some(format!(
                "<script>twq('event','tw-{p}-o9d2g',{{}});</script>"
            ))
        };
        let named = [tag("o9d2g", "TRACKING", code("o9d7n").as_deref())];
        assert_eq!(pixel("shop", "o9d7n", &named).status, Status::Pass);
        let c = pixel("shop", "abcde", &named);
        assert!(c.status == Status::Fail && c.detail.contains("o9d7n"));
        assert_eq!(
            pixel("shop", "o9d7n", &[tag("o9d2g", "TRACKING", None)]).status,
            Status::Skip
        );
        // A code naming another tag says nothing of this one's pixel.
        let other = [tag("o9d2h", "TRACKING", code("o9d7n").as_deref())];
        assert_eq!(pixel("shop", "abcde", &other).status, Status::Skip);
    }

    #[test]
    fn the_clock_may_be_a_minute_off() {
        let now = SystemTime::now();
        let at = |offset: i64| ClockReading {
            x_date: if offset >= 0 {
                now + Duration::from_secs(offset as u64)
            } else {
                now - Duration::from_secs((-offset) as u64)
            },
            sent: now,
            received: now,
        };
        assert_eq!(clock(Some(at(0))).status, Status::Pass);
        assert_eq!(clock(Some(at(-59))).status, Status::Pass);
        assert_eq!(clock(Some(at(90))).status, Status::Fail);
        assert!(clock(Some(at(-90))).detail.contains("ahead of"));
        assert!(clock_is_off(Some(at(120))) && !clock_is_off(Some(at(3))) && !clock_is_off(None));
        assert_eq!(clock(None).status, Status::Skip);
    }

    #[test]
    fn the_spool_needs_more_than_its_free_floor() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            spool_room("/s", 10_000 * MIB, 16 * MIB, 1024 * MIB, 0).status,
            Status::Pass
        );
        assert_eq!(
            spool_room("/s", 16 * MIB, 16 * MIB, 1024 * MIB, 0).status,
            Status::Fail
        );
        assert_eq!(
            spool_room("/s", 500 * MIB, 16 * MIB, 1024 * MIB, 0).status,
            Status::Warn
        );
    }
}
