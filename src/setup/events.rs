//! `conversion-gateway events create` and `events list`: an account's Single Event Tags through the Ads API,
//! and the configuration line that maps an event name to a new tag's id.
//!
//! # Invariants
//! - A tag's parameters are checked (`tag_spec`) before anything is sent: a typo costs no call.
//! - What is printed names the configuration key to set, never a credential.

use super::ads_api::{oauth_credentials, AdsApi, CallError, Tag};
use super::tag_spec::TagSpec;
use crate::config::{Account, Settings};

/// Why a command did nothing.
#[derive(Debug)]
pub enum EventsError {
    /// The command line or the configuration cannot be used (exit 2).
    Unusable(String),
    /// X refused or could not be asked (exit 1).
    X(CallError),
}

impl std::fmt::Display for EventsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventsError::Unusable(why) => f.write_str(why),
            EventsError::X(e) => write!(f, "{e}"),
        }
    }
}

/// The account `name` and a client signing with its credentials.
fn api_for<'a>(settings: &'a Settings, name: &str) -> Result<(&'a Account, AdsApi), EventsError> {
    let Some(account) = settings.accounts.get(name) else {
        let known: Vec<&str> = settings.accounts.keys().map(String::as_str).collect();
        return Err(EventsError::Unusable(format!(
            "--account {name:?} is not a configured account; configured: {}",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    if settings.upstream.sandbox {
        return Err(EventsError::Unusable(
            "upstream.sandbox is on: nothing is sent to X; run with the configuration that holds the account's credentials".into(),
        ));
    }
    let Some(credentials) = oauth_credentials(account) else {
        return Err(EventsError::Unusable(format!(
            "accounts.{name}.auth is not OAuth 1.0a: managing tags takes the user credentials of the Ads API (a pixel token authenticates only the conversions endpoint)"
        )));
    };
    let api = AdsApi::new(&settings.upstream, credentials).map_err(EventsError::Unusable)?;
    Ok((account, api))
}

/// Creates the tag `spec` on the account `name`.
pub async fn create(settings: &Settings, name: &str, spec: &TagSpec) -> Result<Tag, EventsError> {
    let (account, api) = api_for(settings, name)?;
    let click = spec.click_window.to_string();
    let view = spec.view_through_window.to_string();
    let params = [
        ("name", spec.name.as_str()),
        ("type", spec.kind.as_str()),
        ("click_window", click.as_str()),
        ("view_through_window", view.as_str()),
    ];
    api.create_tag(&account.ad_account_id, &params)
        .await
        .result
        .map_err(EventsError::X)
}

/// Every tag of the account `name`.
pub async fn list(settings: &Settings, name: &str) -> Result<Vec<Tag>, EventsError> {
    let (account, api) = api_for(settings, name)?;
    api.tags(&account.ad_account_id)
        .await
        .result
        .map_err(EventsError::X)
}

/// What `events create` prints: the new id, and the configuration line that uses it.
pub fn created_text(settings: &Settings, account: &str, spec: &TagSpec, tag: &Tag) -> String {
    let set_id = tag.website_tag_id.as_deref().unwrap_or(&tag.id);
    let key = toml_key(&spec.name);
    let mut out = format!(
        "created Single Event Tag {:?} ({}, click window {} d, view-through window {} d): id {set_id}\n\nadd this line under accounts.{account}.events (in a [accounts.{account}.events] table, or inside its events = {{ ... }}):\n\n{key} = \"{set_id}\"\n",
        spec.name, spec.kind, spec.click_window, spec.view_through_window
    );
    // Variables are read lower-cased, and a `-` cannot be in their names.
    let env_safe = spec
        .name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if env_safe {
        out.push_str(&format!(
            "\n(or, in the environment: GATEWAY_ACCOUNTS__{}__EVENTS__{}={set_id})\n",
            account.to_ascii_uppercase(),
            spec.name.to_ascii_uppercase()
        ));
    }
    if let Some(old) = settings
        .accounts
        .get(account)
        .and_then(|a| a.events.get(&spec.name))
    {
        out.push_str(&format!(
            "\n(accounts.{account}.events.{key} is {old:?} now: the line above replaces it)\n"
        ));
    }
    out.push_str("\nX shows the tag TRACKING 12 to 24 hours after its first events.\n");
    out
}

/// What `events list` prints: a table of the tags, with the configured event name of each.
pub fn list_text(account: &str, settings_account: &Account, tags: &[Tag]) -> String {
    let configured = |t: &Tag| -> String {
        let names: Vec<&str> = settings_account
            .events
            .iter()
            .filter(|(_, set)| t.is(set))
            .map(|(e, _)| e.as_str())
            .collect();
        if names.is_empty() {
            "-".into()
        } else {
            names.join(", ")
        }
    };
    let rows: Vec<[String; 6]> = tags
        .iter()
        .map(|t| {
            [
                t.website_tag_id.clone().unwrap_or_else(|| t.id.clone()),
                t.name.clone(),
                t.kind.clone(),
                if t.deleted {
                    "DELETED".into()
                } else {
                    t.status.clone()
                },
                t.last_tracked_at.clone().unwrap_or_else(|| "never".into()),
                configured(t),
            ]
        })
        .collect();
    let header = [
        "ID",
        "NAME",
        "TYPE",
        "STATUS",
        "LAST TRACKED",
        "CONFIGURED AS",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "ad account {} (account {account}): {} Single Event Tag{}\n",
        settings_account.ad_account_id,
        tags.len(),
        if tags.len() == 1 { "" } else { "s" }
    );
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let missing: Vec<String> = settings_account
        .events
        .iter()
        .filter(|(_, set)| !tags.iter().any(|t| t.is(set)))
        .map(|(e, set)| format!("{e} ({set})"))
        .collect();
    if !missing.is_empty() {
        out.push_str(&format!(
            "configured but not a tag of this ad account: {}\n",
            missing.join(", ")
        ));
    }
    out
}

/// `name` as a TOML key: bare when it can be, quoted otherwise.
fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        name.to_owned()
    } else {
        serde_json::Value::String(name.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_becomes_a_key_toml_reads_back() {
        for name in ["purchase", "sign-up", "Add to cart", "a\"b", "é"] {
            let line = format!("{} = \"x\"", toml_key(name));
            let table: toml::Table = toml::from_str(&line).unwrap();
            assert_eq!(
                table.keys().next().map(String::as_str),
                Some(name),
                "{line}"
            );
        }
        assert_eq!(toml_key("purchase"), "purchase");
    }
}
