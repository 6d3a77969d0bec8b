//! Settings: compiled-in defaults, then a TOML file, then `GATEWAY_<SECTION>__<KEY>` environment variables.
//! This file holds the validated `Settings`, the defaults and `load`; `raw` holds the shape as written and
//! how each section of it is checked.
//!
//! Invariants: `load` returns a fully validated `Settings` or an error naming the offending key; nothing
//! starts half-configured. Secrets live in `Secret`, whose `Debug` and `Serialize` print `[REDACTED]`;
//! every secret may be given inline or as `<key>_file` (a path whose content, trimmed, is the secret).

mod raw;

pub use raw::is_account_name;
use raw::RawSettings;

use crate::conversion::{is_base36_id, AccountRules, Rules};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        key: key.into(),
        message: message.into(),
    })
}

/// A secret value. Never printed: `Debug` and `Serialize` show `[REDACTED]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[REDACTED]")
    }
}

fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

// ---------------------------------------------------------------------------------------------
// Effective, validated settings.

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub server: Server,
    pub spool: Spool,
    pub limiter: Limiter,
    pub redis: Redis,
    pub upstream: Upstream,
    pub delivery: Delivery,
    pub log: Log,
    pub privacy: Privacy,
    pub accounts: BTreeMap<String, Account>,
}

/// The opt-outs the gateway enforces itself (the last line when a backend forgets a flag).
#[derive(Debug, Clone, Serialize)]
pub struct Privacy {
    /// Hashed (or raw, hashed on load) emails and phone numbers of users who opted out, one per line.
    pub suppression_list_file: Option<PathBuf>,
    /// Suppress every event of a request sent with `Sec-GPC: 1`.
    pub honor_gpc: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Ingest keys for every account.
    pub api_keys: Vec<Secret>,
    /// Ingest keys, each for the accounts it names (`[[server.keys]]`).
    pub keys: Vec<IngestKey>,
    pub allow_unauthenticated: bool,
    /// Admin keys with role `write`.
    pub admin_api_keys: Vec<Secret>,
    /// Admin keys with their role (`[[server.admin_keys]]`).
    pub admin_keys: Vec<AdminKey>,
    pub max_body_bytes: usize,
    pub max_events_per_request: usize,
    /// One event's size in X's JSON at most; a larger one is rejected at ingest, naming the field.
    pub max_event_bytes: usize,
    /// Bytes of request bodies being read and parsed at once; a body beyond it is shed with a 503.
    pub max_inflight_body_bytes: usize,
    /// A request's headers must arrive within this.
    #[serde(serialize_with = "serialize_duration")]
    pub header_timeout: Duration,
    /// A request's body must arrive whole within this (from its headers).
    #[serde(serialize_with = "serialize_duration")]
    pub body_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    /// Open connections on the ingest listener at most; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Whether `/readyz` fails while the spool refuses events (a sidecar's readiness is its pod's).
    pub ready_requires_spool: bool,
    #[serde(serialize_with = "serialize_duration")]
    pub shutdown_timeout: Duration,
}

/// An ingest key and the accounts it may send events for (`None`: every account).
#[derive(Debug, Clone, Serialize)]
pub struct IngestKey {
    pub key: Secret,
    pub accounts: Option<Vec<String>>,
    /// Which `[[server.keys]]` entry it came from (errors name it).
    #[serde(skip)]
    pub entry: usize,
}

/// An admin key and what it may do.
#[derive(Debug, Clone, Serialize)]
pub struct AdminKey {
    pub key: Secret,
    pub role: AdminRole,
}

/// `read`: accounts, dead letters, activity; `write`: also replay and delete dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    Read,
    Write,
}

#[derive(Debug, Clone, Serialize)]
pub struct Spool {
    /// Where events wait: this process's files, or Redis (shared by every replica).
    pub backend: SpoolBackend,
    pub dir: PathBuf,
    /// Bytes of waiting events the spool holds before ingest answers 503.
    pub max_bytes: u64,
    /// Dead letters kept; beyond, the oldest are evicted (and counted).
    pub max_dead_letters: u64,
    /// Appends are refused while the file system under `dir` has less free space than this.
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolBackend {
    Disk,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimiterBackend {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Serialize)]
pub struct Limiter {
    /// Whose budget a dispatcher draws on: this process's, or one per ad account for the whole fleet.
    pub backend: LimiterBackend,
}

/// The Redis the shared mode uses (`limiter.backend` or `spool.backend` = "redis").
#[derive(Debug, Clone, Serialize)]
pub struct Redis {
    /// `redis://` or `rediss://` (TLS); `None` when not configured. Printed with its password redacted.
    pub url: Option<RedisUrl>,
    /// Every key starts with it.
    pub key_prefix: String,
    /// This replica's name in the consumer groups (default: the host name, a pod's name).
    pub consumer: String,
    /// A replica's unacknowledged events idle this long are taken over by another.
    #[serde(serialize_with = "serialize_duration")]
    pub claim_idle: Duration,
}

/// A Redis URL: a secret when it holds a password, so `Debug` and `Serialize` show it redacted.
#[derive(Clone)]
pub struct RedisUrl(Secret);

impl RedisUrl {
    /// A URL not read from a configuration (tests, the benchmark).
    #[doc(hidden)]
    pub fn for_tests(url: &str) -> RedisUrl {
        RedisUrl(Secret::new(url))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with any password (and user name) replaced by `[REDACTED]`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(self.expose()) {
            Ok(mut u) => {
                if !u.password().unwrap_or_default().is_empty() {
                    let _ = u.set_password(Some("REDACTED"));
                }
                u.to_string().replace(":REDACTED@", ":[REDACTED]@")
            }
            Err(_) => "[REDACTED]".into(),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Upstream {
    pub base_url: String,
    pub api_version: String,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    pub sandbox: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub max_batch: usize,
    /// One request body to X at most (bytes of JSON): a batch is cut there whatever its count.
    pub max_batch_bytes: usize,
    #[serde(serialize_with = "serialize_duration")]
    pub linger: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_event_age: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub dedup_window: Duration,
    /// Backoff after transient failures: full jitter between 0 and min(cap, base·2^attempt).
    #[serde(serialize_with = "serialize_duration")]
    pub retry_base: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub retry_cap: Duration,
    /// Longest wait between probes of a paused account (bad credentials, unknown pixel).
    #[serde(serialize_with = "serialize_duration")]
    pub pause_cap: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub ad_account_id: String,
    pub pixel_id: String,
    pub default_phone_region: String,
    pub events: BTreeMap<String, String>,
    pub rate_limit: RateLimit,
    /// `None` only in sandbox mode, where nothing is sent.
    pub auth: Option<Auth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RateLimit {
    pub events: u64,
    #[serde(serialize_with = "serialize_duration")]
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Auth {
    Oauth1 {
        consumer_key: Secret,
        consumer_secret: Secret,
        access_token: Secret,
        access_token_secret: Secret,
    },
    PixelToken {
        token: Secret,
    },
}

impl Settings {
    /// What the pure mapping needs to know.
    pub fn mapping_rules(&self) -> Rules {
        let accounts = self
            .accounts
            .iter()
            .map(|(name, a)| {
                let rules = AccountRules {
                    pixel_id: a.pixel_id.clone(),
                    events: a.events.clone(),
                    default_phone_region: a
                        .default_phone_region
                        .parse()
                        .unwrap_or(phonenumber::country::Id::US),
                };
                (name.clone(), rules)
            })
            .collect();
        Rules {
            accounts,
            max_event_age: self.delivery.max_event_age,
            max_event_bytes: self.server.max_event_bytes,
        }
    }

    /// The effective configuration as TOML, every secret shown as `[REDACTED]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Compiled-in defaults, the lowest layer.
pub const DEFAULTS: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
api_keys = []
allow_unauthenticated = false
admin_api_keys = []
max_body_bytes = 1048576
max_events_per_request = 1000
max_event_bytes = "64KiB"
max_inflight_body_bytes = "64MiB"
header_timeout = "10s"
body_timeout = "30s"
idle_timeout = "60s"
max_connections = 4096
ready_requires_spool = false
shutdown_timeout = "20s"

[spool]
backend = "disk"
dir = "data"
max_bytes = "1GiB"
max_dead_letters = 100000
min_free_bytes = "16MiB"

[limiter]
backend = "embedded"

[redis]
key_prefix = "cg"
consumer = ""
claim_idle = "60s"

[upstream]
base_url = "https://ads-api.x.com"
api_version = "12"
timeout = "10s"
sandbox = false

[delivery]
max_batch = 500
max_batch_bytes = "1MiB"
linger = "1s"
max_event_age = "7d"
dedup_window = "48h"
retry_base = "1s"
retry_cap = "5m"
pause_cap = "5m"

[log]
format = "json"
level = "info"

[privacy]
honor_gpc = false
"#;

/// Loads defaults, then `file` (when given), then the `GATEWAY_*` variables of `env`.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
    if let Some(path) = file {
        if !path.exists() {
            return err(
                "--config",
                format!("file {} does not exist", path.display()),
            );
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    with_env(builder, env)
}

/// Loads defaults, then the TOML `text`, then the `GATEWAY_*` variables of `env` (`load` without a file
/// on disk: the fuzz target, and tests).
pub fn load_str(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let builder = config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    with_env(builder, env)
}

fn with_env(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("GATEWAY_") && k != "GATEWAY_CONFIG")
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("GATEWAY")
            .prefix_separator("_")
            .separator("__")
            .source(Some(vars)),
    );
    let merged = builder.build().map_err(|e| ConfigError {
        key: String::new(),
        message: e.to_string(),
    })?;
    let as_json: serde_json::Value = merged.try_deserialize().map_err(|e| ConfigError {
        key: String::new(),
        message: e.to_string(),
    })?;
    let raw: RawSettings = serde_path_to_error::deserialize(as_json).map_err(|e| ConfigError {
        key: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    raw.validate()
}

#[cfg(test)]
mod tests {
    use super::raw::size;
    use super::*;
    use std::io::Write;

    const GOOD: &str = r#"
[server]
api_keys = ["k1"]
[accounts.acme]
ad_account_id = "18ce552mlaq"
pixel_id = "o9d7n"
events = { purchase = "o9d2g", signup = "o9d2h" }
auth = { kind = "oauth1", consumer_key = "ck", consumer_secret = "cs-secret", access_token = "at-secret", access_token_secret = "ats-secret" }
"#;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let f = file(text);
        load(
            Some(f.path()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_and_file_merge() {
        let s = load_str(GOOD, &[]).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.server.max_body_bytes, 1_048_576);
        assert_eq!(s.delivery.max_batch, 500);
        assert_eq!(s.delivery.max_batch_bytes, 1 << 20);
        assert_eq!(s.server.max_event_bytes, 64 << 10);
        assert_eq!(s.server.max_inflight_body_bytes, 64 << 20);
        assert_eq!(s.server.header_timeout, Duration::from_secs(10));
        assert!(!s.server.ready_requires_spool);
        assert_eq!(s.spool.backend, SpoolBackend::Disk);
        assert_eq!(s.limiter.backend, LimiterBackend::Embedded);
        assert_eq!(s.redis.claim_idle, Duration::from_secs(60));
        assert_eq!(s.redis.key_prefix, "cg");
        assert!(s.redis.url.is_none());
        assert_eq!(s.delivery.max_event_age, Duration::from_secs(7 * 86400));
        assert_eq!(s.upstream.base_url, "https://ads-api.x.com");
        let a = &s.accounts["acme"];
        assert_eq!(a.rate_limit.events, 60_000);
        assert_eq!(a.rate_limit.window, Duration::from_secs(900));
        assert_eq!(a.default_phone_region, "US");
        assert_eq!(s.spool.max_bytes, 1 << 30);
        assert_eq!(s.spool.min_free_bytes, 16 << 20);
        assert_eq!(s.delivery.retry_cap, Duration::from_secs(300));
        assert_eq!(s.delivery.pause_cap, Duration::from_secs(300));
    }

    #[test]
    fn sizes() {
        assert_eq!(size("k", "1GiB").unwrap(), 1 << 30);
        assert_eq!(size("k", "512 MiB").unwrap(), 512 << 20);
        assert_eq!(size("k", "10MB").unwrap(), 10_000_000);
        assert_eq!(size("k", "4096").unwrap(), 4096);
        assert!(size("k", "lots").unwrap_err().to_string().starts_with("k:"));
        assert!(size("k", "1 parsec").is_err());
    }

    #[test]
    fn shared_ad_accounts_share_one_budget() {
        let text = format!(
            "{GOOD}\n[accounts.eu]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7x\"\nrate_limit = {{ events = 1000, window = \"1m\" }}\nauth = {{ kind = \"pixel_token\", token = \"t\" }}\n"
        );
        let e = load_str(&text, &[]).unwrap_err();
        assert_eq!(e.key, "accounts.eu.rate_limit", "{e}");
        assert!(load_str(
            &text.replace("rate_limit = { events = 1000, window = \"1m\" }\n", ""),
            &[]
        )
        .is_ok());
    }

    #[test]
    fn environment_overrides_file() {
        let s = load_str(
            GOOD,
            &[
                ("GATEWAY_UPSTREAM__BASE_URL", "http://127.0.0.1:18080/"),
                ("GATEWAY_ACCOUNTS__ACME__AUTH__CONSUMER_SECRET", "from-env"),
                ("GATEWAY_SERVER__API_KEYS", "a, b"),
                ("GATEWAY_SERVER__ADMIN_API_KEYS", "admin-1"),
                ("GATEWAY_SERVER__MAX_EVENTS_PER_REQUEST", "10"),
                ("GATEWAY_UPSTREAM__SANDBOX", "true"),
                ("GATEWAY_CONFIG", "ignored.toml"),
            ],
        )
        .unwrap();
        assert_eq!(s.upstream.base_url, "http://127.0.0.1:18080");
        assert!(s.upstream.sandbox);
        assert_eq!(s.server.max_events_per_request, 10);
        assert_eq!(
            s.server
                .api_keys
                .iter()
                .map(Secret::expose)
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            s.server
                .admin_api_keys
                .iter()
                .map(Secret::expose)
                .collect::<Vec<_>>(),
            ["admin-1"]
        );
        match &s.accounts["acme"].auth {
            Some(Auth::Oauth1 {
                consumer_secret, ..
            }) => assert_eq!(consumer_secret.expose(), "from-env"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secrets_from_files_and_redaction() {
        let secret = file("s3cr3t-from-file\n");
        let text = GOOD.replace(
            "consumer_secret = \"cs-secret\"",
            &format!(
                "consumer_secret_file = {:?}",
                secret.path().display().to_string()
            ),
        );
        let s = load_str(&text, &[]).unwrap();
        match &s.accounts["acme"].auth {
            Some(Auth::Oauth1 {
                consumer_secret, ..
            }) => assert_eq!(consumer_secret.expose(), "s3cr3t-from-file"),
            other => panic!("{other:?}"),
        }
        let shown = format!("{}\n{:?}", s.to_redacted_toml(), s);
        for canary in ["s3cr3t-from-file", "at-secret", "ats-secret", "k1\""] {
            assert!(!shown.contains(canary), "{canary} leaked:\n{shown}");
        }
        assert!(shown.contains("[REDACTED]"));
    }

    #[test]
    fn bad_configurations_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("", "[upstream]\ntimeout = \"ten\"\n", "upstream.timeout"),
            ("", "[delivery]\nmax_batch = 501\n", "delivery.max_batch"),
            (
                "",
                "[delivery]\nmax_batch_bytes = \"100\"\n",
                "delivery.max_batch_bytes",
            ),
            (
                "api_keys = [\"k1\"]",
                "api_keys = [\"k1\"]\nmax_event_bytes = \"2MiB\"",
                "server.max_event_bytes",
            ),
            (
                "api_keys = [\"k1\"]",
                "api_keys = [\"k1\"]\nmax_inflight_body_bytes = \"512KiB\"",
                "server.max_inflight_body_bytes",
            ),
            (
                "api_keys = [\"k1\"]",
                "api_keys = [\"k1\"]\nheader_timeout = \"0s\"",
                "server.header_timeout",
            ),
            ("", "[spool]\nmax_bytes = \"8MiB\"\n", "spool.max_bytes"),
            ("pixel_id = \"o9d7n\"", "", "accounts.acme.pixel_id"),
            (
                "pixel_id = \"o9d7n\"",
                "pixel_id = \"O9-D7N\"",
                "accounts.acme.pixel_id",
            ),
            (
                "signup = \"o9d2h\"",
                "signup = \"not a set\"",
                "accounts.acme.events.signup",
            ),
            (
                "consumer_secret = \"cs-secret\", ",
                "",
                "accounts.acme.auth.consumer_secret",
            ),
            ("api_keys = [\"k1\"]", "", "server.api_keys"),
            ("", "[server.extra]\n", "server"),
            (
                "kind = \"oauth1\"",
                "kind = \"basic\"",
                "accounts.acme.auth.kind",
            ),
            ("", "[log]\nformat = \"xml\"\n", "log.format"),
            ("[accounts.acme]", "[accounts.unknown]", "accounts.unknown"),
            ("", "[delivery]\nlinger = \"0s\"\n", "delivery.linger"),
            ("", "[spool]\nmax_bytes = \"huge\"\n", "spool.max_bytes"),
            (
                "",
                "[delivery]\nretry_base = \"10m\"\n",
                "delivery.retry_cap",
            ),
        ];
        for (from, to, key) in cases {
            let text = if from.is_empty() {
                format!("{GOOD}\n{to}")
            } else {
                GOOD.replace(from, to)
            };
            let e = load_str(&text, &[]).expect_err(key);
            assert!(e.to_string().contains(key), "expected {key} in {e}");
        }
    }

    #[test]
    fn scoped_ingest_keys_and_admin_roles() {
        let keys = file("shop-1\n# a comment\nshop-2\n");
        let text = format!(
            "{GOOD}\n[[server.keys]]\nkey_file = \"{}\"\naccounts = [\"acme\"]\n[[server.keys]]\nkey = \"all-k\"\n[[server.admin_keys]]\nkey = \"reader-k\"\nrole = \"read\"\n",
            keys.path().display()
        );
        let s = load_str(&text, &[]).unwrap();
        let scoped: Vec<(&str, Option<Vec<String>>)> = s
            .server
            .keys
            .iter()
            .map(|k| (k.key.expose(), k.accounts.clone()))
            .collect();
        let acme = Some(vec!["acme".to_string()]);
        assert_eq!(
            scoped,
            [("shop-1", acme.clone()), ("shop-2", acme), ("all-k", None)]
        );
        assert_eq!(s.server.admin_keys[0].role, AdminRole::Read);
        let dump = s.to_redacted_toml();
        for secret in ["shop-1", "all-k", "reader-k"] {
            assert!(!dump.contains(secret), "{secret} in {dump}");
        }
        // Scoped keys alone are enough keys.
        let only_scoped = GOOD.replace("api_keys = [\"k1\"]", "")
            + "\n[[server.keys]]\nkey = \"k\"\naccounts = [\"acme\"]\n";
        assert!(load_str(&only_scoped, &[]).is_ok());
    }

    #[test]
    fn bad_key_entries_are_named() {
        let cases = [
            ("[[server.keys]]\nkey = \"x\"\naccounts = [\"nope\"]\n", "server.keys[0].accounts", "\"nope\""),
            ("[[server.keys]]\nkey = \"x\"\naccounts = []\n", "server.keys[0].accounts", "is empty"),
            ("[[server.keys]]\naccounts = [\"acme\"]\n", "server.keys[0].key", "key_file"),
            ("[[server.keys]]\nkey = \"x\"\nkey_file = \"/k\"\n", "server.keys[0].key", "both"),
            ("[[server.keys]]\nkey = \"y\"\n[[server.keys]]\nkey = \"k1\"\n", "server.keys[1]", "server.api_keys"),
            ("[[server.admin_keys]]\nkey = \"a\"\nrole = \"owner\"\n", "server.admin_keys[0].role", ""),
            ("[[server.admin_keys]]\nkey = \"a\"\nrole = \"read\"\n[[server.admin_keys]]\nkey = \"a\"\nrole = \"write\"\n", "server.admin_keys[1]", "server.admin_keys[0]"),
        ];
        for (extra, key, says) in cases {
            let e = load_str(&format!("{GOOD}\n{extra}"), &[]).expect_err(key);
            assert!(e.key.starts_with(key), "expected {key}, got {e}");
            assert!(e.to_string().contains(says), "expected {says:?} in {e}");
            assert!(
                !e.to_string().contains("\"k1\"") && !e.to_string().contains(" x "),
                "{e}"
            );
        }
    }

    #[test]
    fn no_accounts_and_unauthenticated() {
        let e = load_str("[server]\nallow_unauthenticated = true\n", &[]).unwrap_err();
        assert_eq!(e.key, "accounts");
        let text = GOOD.replace("api_keys = [\"k1\"]", "allow_unauthenticated = true");
        assert!(load_str(&text, &[]).unwrap().server.api_keys.is_empty());
    }

    #[test]
    fn sandbox_runs_without_credentials_but_production_does_not() {
        let text = GOOD
            .lines()
            .filter(|l| !l.starts_with("auth"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(load_str(&text, &[]).unwrap_err().key, "accounts.acme.auth");
        let s = load_str(&format!("{text}\n[upstream]\nsandbox = true\n"), &[]).unwrap();
        assert!(s.accounts["acme"].auth.is_none());
    }

    #[test]
    fn the_shared_mode_needs_a_url_and_a_shared_budget() {
        let env = |pairs: &[(&'static str, &'static str)]| pairs.to_vec();
        let e = load_str(GOOD, &env(&[("GATEWAY_SPOOL__BACKEND", "redis")])).unwrap_err();
        assert_eq!(e.key, "spool.backend", "{e}");
        assert!(e.message.contains("redis.url"), "{e}");
        let e = load_str(GOOD, &env(&[("GATEWAY_LIMITER__BACKEND", "redis")])).unwrap_err();
        assert_eq!(e.key, "limiter.backend", "{e}");
        let url = ("GATEWAY_REDIS__URL", "redis://10.0.0.7:6379/2");
        let e = load_str(GOOD, &env(&[url, ("GATEWAY_SPOOL__BACKEND", "redis")])).unwrap_err();
        assert_eq!(
            e.key, "limiter.backend",
            "a shared queue needs the shared budget: {e}"
        );
        let s = load_str(
            GOOD,
            &env(&[
                url,
                ("GATEWAY_SPOOL__BACKEND", "redis"),
                ("GATEWAY_LIMITER__BACKEND", "redis"),
                ("GATEWAY_REDIS__CONSUMER", "shop-7d9f-x2"),
                ("GATEWAY_REDIS__CLAIM_IDLE", "90s"),
            ]),
        )
        .unwrap();
        assert_eq!(s.spool.backend, SpoolBackend::Redis);
        assert_eq!(s.limiter.backend, LimiterBackend::Redis);
        assert_eq!(s.redis.consumer, "shop-7d9f-x2");
        assert_eq!(s.redis.claim_idle, Duration::from_secs(90));
        // Without a consumer name, the host name.
        let s = load_str(GOOD, &env(&[url, ("GATEWAY_LIMITER__BACKEND", "redis")])).unwrap();
        assert!(!s.redis.consumer.is_empty());
        let e = load_str(GOOD, &env(&[("GATEWAY_SPOOL__BACKEND", "memcached")])).unwrap_err();
        assert_eq!(e.key, "spool.backend", "{e}");
    }

    #[test]
    fn a_redis_url_is_checked_and_its_password_never_shown() {
        let with_password = "redis://:CANARY-redis-password@10.0.0.7:6379/0";
        let s = load_str(GOOD, &[("GATEWAY_REDIS__URL", with_password)]).unwrap();
        let shown = s.to_redacted_toml();
        assert!(!shown.contains("CANARY"), "{shown}");
        assert!(
            shown.contains("redis://:[REDACTED]@10.0.0.7:6379/0"),
            "{shown}"
        );
        assert!(!format!("{:?}", s.redis).contains("CANARY"));
        for (bad, key) in [
            ("http://10.0.0.7:6379", "redis.url"),
            ("redis//:CANARY-redis-password@x", "redis.url"),
        ] {
            let e = load_str(GOOD, &[("GATEWAY_REDIS__URL", bad)]).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.to_string().contains("CANARY"), "{e}");
        }
        let e = load_str(GOOD, &[("GATEWAY_REDIS__CLAIM_IDLE", "100ms")]).unwrap_err();
        assert_eq!(e.key, "redis.claim_idle");
        let e = load_str(GOOD, &[("GATEWAY_REDIS__KEY_PREFIX", "{cg}")]).unwrap_err();
        assert_eq!(e.key, "redis.key_prefix");
        // From a file, like every secret.
        let f = file(&format!("{with_password}\n"));
        let path = f.path().to_str().unwrap().to_owned();
        let s = load(
            Some(file(GOOD).path()),
            [("GATEWAY_REDIS__URL_FILE".to_string(), path)],
        )
        .unwrap();
        assert_eq!(s.redis.url.unwrap().expose(), with_password);
    }
}
