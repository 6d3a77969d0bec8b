//! The opt-outs the gateway enforces itself: a suppression list of users who opted out, and the
//! browser's Global Privacy Control (`Sec-GPC: 1`) when the backend forwards it.
//!
//! # The list
//! `privacy.suppression_list_file`: one email or phone number per line, either as the SHA-256 X gets
//! (64 hex digits) or raw — an email (has an `@`) or a phone number in E.164 (starts with `+`: the list
//! serves every account, so there is no default region) — normalized and hashed on load exactly as
//! ingest does. Blank lines and `#` comments are skipped. Only digests are kept in memory; no line's
//! content ever reaches a log or an error (an error names the line's number).
//!
//! # Invariants
//! - An event any of whose hashed identifiers is on the list is suppressed: never stored, never sent,
//!   counted and answered as `suppressed`.
//! - The list is replaced whole (on `SIGHUP` and when the file changes): an event is judged against the
//!   old list or the new one. A file that does not load changes nothing.

use crate::conversion::identifiers::{as_sha256_digest, hashed_email, hashed_phone};
use crate::conversion::{Conversion, Identifier};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// Digests of opted-out identifiers.
#[derive(Debug, Default)]
pub struct SuppressionList(HashSet<[u8; 32]>);

impl SuppressionList {
    /// Parses a list's text; `Err` names the first line that is neither a digest, an email nor an
    /// E.164 phone number (never its content).
    pub fn parse(text: &str) -> Result<SuppressionList, String> {
        let mut set = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let digest = match as_sha256_digest(line) {
                Some(d) => Ok(d),
                None if line.contains('@') => hashed_email(line),
                None if line.starts_with('+') => hashed_phone(line, phonenumber::country::Id::US),
                None => Err("is neither a SHA-256 digest, an email, nor a phone number in E.164 (+ and the country code)"),
            }
            .map_err(|why| format!("line {}: {why}", n + 1))?;
            set.insert(decode(&digest).ok_or_else(|| format!("line {}: not a digest", n + 1))?);
        }
        Ok(SuppressionList(set))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any hashed email or phone number of `c` is on the list.
    pub fn matches(&self, c: &Conversion) -> bool {
        !self.0.is_empty()
            && c.identifiers.iter().any(|i| {
                let hex = match i {
                    Identifier::HashedEmail { hashed_email } => hashed_email,
                    Identifier::HashedPhoneNumber {
                        hashed_phone_number,
                    } => hashed_phone_number,
                    _ => return false,
                };
                decode(hex).is_some_and(|d| self.0.contains(&d))
            })
    }
}

fn decode(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut out).ok()?;
    Some(out)
}

/// What ingest consults: the list (replaceable) and whether GPC is honoured.
pub struct Privacy {
    list: RwLock<Arc<SuppressionList>>,
    honor_gpc: AtomicBool,
    file: Option<PathBuf>,
    /// The file's modification time when it was last loaded.
    loaded: Mutex<Option<SystemTime>>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read(path: &Path) -> Result<SuppressionList, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "privacy.suppression_list_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    SuppressionList::parse(&text).map_err(|e| {
        format!(
            "privacy.suppression_list_file: {}: {e}; fix the line (nothing else of the file is shown)",
            path.display()
        )
    })
}

impl Privacy {
    /// Nothing suppressed, GPC not honoured.
    pub fn off() -> Privacy {
        Privacy {
            list: RwLock::default(),
            honor_gpc: AtomicBool::new(false),
            file: None,
            loaded: Mutex::new(None),
        }
    }

    /// Loads the configured list; `Err` (naming the key and the line) when it does not load.
    pub fn load(settings: &crate::config::Privacy) -> Result<Privacy, String> {
        let p = Privacy {
            honor_gpc: AtomicBool::new(settings.honor_gpc),
            file: settings.suppression_list_file.clone(),
            ..Privacy::off()
        };
        if let Some(path) = &p.file {
            let stamp = modified(path);
            let list = read(path)?;
            tracing::info!(entries = list.len(), "suppression list loaded");
            p.set(list, stamp);
        }
        Ok(p)
    }

    fn set(&self, list: SuppressionList, stamp: Option<SystemTime>) {
        *self.list.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(list);
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
    }

    /// The list as it is now.
    pub fn list(&self) -> Arc<SuppressionList> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn honors_gpc(&self) -> bool {
        self.honor_gpc.load(Ordering::Relaxed)
    }

    /// Reads the list again (when `force`, or when the file changed since it was loaded) and takes
    /// `honor_gpc` from `settings` when given. `Ok(Some(entries))` when a new list was taken,
    /// `Ok(None)` when nothing changed; `Err` keeps the current list.
    pub fn reload(
        &self,
        force: bool,
        settings: Option<&crate::config::Privacy>,
    ) -> Result<Option<usize>, String> {
        if let Some(s) = settings {
            self.honor_gpc.store(s.honor_gpc, Ordering::Relaxed);
        }
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let stamp = modified(path);
        let unchanged = *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) == stamp;
        if unchanged && !force {
            return Ok(None);
        }
        let list = read(path)?;
        let n = list.len();
        self.set(list, stamp);
        Ok(Some(n))
    }

    /// Reloads the list whenever its file changes (looked at every `every`), until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: crate::shutdown::Shutdown,
    ) {
        if self.file.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_ref() => return,
            }
            match self.reload(false, None) {
                Ok(Some(n)) => tracing::info!(entries = n, "suppression list changed: reloaded"),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "suppression list changed but does not load: keeping the current one")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::identifiers::sha256_hex;

    fn conversion(email: &str) -> Conversion {
        let mut c = Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", "t", "c1");
        c.identifiers.push(Identifier::HashedEmail {
            hashed_email: sha256_hex(email),
        });
        c
    }

    #[test]
    fn digests_raw_emails_and_phones_all_match_what_ingest_hashes() {
        let text = format!(
            "# opted out\n\n{}\n  Opted.Out@Example.COM \n+1 650-253-0000\n",
            sha256_hex("hashed@example.com").to_uppercase()
        );
        let list = SuppressionList::parse(&text).unwrap();
        assert_eq!(list.len(), 3);
        assert!(list.matches(&conversion("hashed@example.com")));
        assert!(list.matches(&conversion("opted.out@example.com")));
        assert!(!list.matches(&conversion("someone@example.com")));
        let mut phone = Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", "t", "c2");
        phone.identifiers.push(Identifier::HashedPhoneNumber {
            hashed_phone_number: sha256_hex("+16502530000"),
        });
        assert!(list.matches(&phone));
    }

    #[test]
    fn a_bad_line_is_named_by_number_never_shown() {
        for (text, line) in [
            ("a@example.com\n650-253-0000\n", "line 2"),
            ("\n\nnot-an-identifier\n", "line 3"),
            ("@\n", "line 1"),
        ] {
            let e = SuppressionList::parse(text).unwrap_err();
            assert!(e.starts_with(line), "{e}");
            assert!(!e.contains("650") && !e.contains("not-an"), "{e}");
        }
    }

    #[test]
    fn a_changed_file_is_taken_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list");
        std::fs::write(&path, "a@example.com\n").unwrap();
        let settings = crate::config::Privacy {
            suppression_list_file: Some(path.clone()),
            honor_gpc: false,
        };
        let p = Privacy::load(&settings).unwrap();
        assert!(p.list().matches(&conversion("a@example.com")));
        assert_eq!(p.reload(false, None), Ok(None), "unchanged");
        // Rewritten, with a modification time that differs whatever the file system's resolution.
        let rewrite = |text: &str, secs| {
            std::fs::write(&path, text).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(SystemTime::now() + std::time::Duration::from_secs(secs))
                .unwrap();
        };
        rewrite("b@example.com\n", 10);
        assert_eq!(p.reload(false, None), Ok(Some(1)));
        assert!(p.list().matches(&conversion("b@example.com")));
        assert!(!p.list().matches(&conversion("a@example.com")));
        rewrite("garbage\n", 20);
        let e = p.reload(false, None).unwrap_err();
        assert!(e.contains("line 1") && !e.contains("garbage"), "{e}");
        assert!(
            p.list().matches(&conversion("b@example.com")),
            "the list before stays"
        );
        // Loading a broken list at start-up fails, naming the key.
        let e = Privacy::load(&settings).err().unwrap();
        assert!(e.starts_with("privacy.suppression_list_file"), "{e}");
    }
}
