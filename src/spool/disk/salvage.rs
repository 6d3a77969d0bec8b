//! `spool check` and `spool salvage`: what a spool directory holds when it cannot be opened, and a new spool
//! rebuilt from every record that can still be read.
//!
//! # Reading without trusting
//! Nothing here writes to the files it reads. `spool.redb` is read from a copy (redb repairs a file that was
//! not closed cleanly as it opens it, and a truncated file is padded back to the length its header names, so
//! that every page before the cut can be read). redb answers some damage with a panic when it reads the page;
//! every read runs under `quiet_catch`, and a table whose walk fails is walked again from further on
//! (doubling the jump) so that one bad leaf costs only the entries on it. The intake log is read with
//! `intake_log::inspect`, which also finds the intact frames after damaged bytes.
//!
//! # Rebuilding
//! The new `spool.redb` holds the readable events with their ids (the intake log's events that redb lacked
//! included), the readable dedup entries, the readable dead letters, the limiter's states (so a salvage
//! never hands out a fresh burst) and counters recomputed from what it holds. Then, in this order: the old
//! `spool.redb` is linked into `damaged-<time>/`, the new one renamed over it (atomically), and the old
//! `intake.log` moved into `damaged-<time>/` too; a crash between the steps leaves either spool complete, and
//! the old intake log's events are all in the new file (its ids are at or below the new file's `seq`, so a
//! start-up in between skips them). Nothing is ever deleted.
//!
//! # Invariants
//! - The damaged files are never written; they end in `damaged-<time>/` under `spool.dir`, byte for byte.
//! - The rebuilt spool opens with the normal, checked start-up; salvaging a healthy spool is lossless.

use super::handle::{known_format, open_db, quiet_catch};
use super::intake_log::{self, IntakeRecord};
use super::schema::{DedupEntry, MetaKey, DEAD, DEDUP_LOG, EVENTS, FORMAT, META};
use crate::spool::{codec, DeadLetter};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const REDB: &str = "spool.redb";
const LOG: &str = "intake.log";

/// What was found in one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileReport {
    pub file: PathBuf,
    /// Absent, or empty: nothing to read.
    pub missing: bool,
    /// What cannot be read, for a person; empty when everything could.
    pub damage: Vec<String>,
}

/// Readable events of one account.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AccountReport {
    pub events: u64,
    /// Of those, records that are stored but no longer decode (the gateway dead-letters them as `corrupt`).
    pub undecodable: u64,
    /// Of those, only in the intake log (not yet moved into `spool.redb`).
    pub only_in_intake_log: u64,
}

/// `spool check`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub dir: PathBuf,
    pub files: Vec<FileReport>,
    pub accounts: BTreeMap<String, AccountReport>,
    pub dead_letters: u64,
    pub dedup_entries: u64,
    pub limiter_states: u64,
}

impl Report {
    pub fn damaged(&self) -> bool {
        self.files.iter().any(|f| !f.damage.is_empty())
    }

    /// The report for a person.
    pub fn text(&self) -> String {
        let mut out = format!("spool.dir {}\n", self.dir.display());
        for f in &self.files {
            let state = if f.missing {
                "absent".to_string()
            } else if f.damage.is_empty() {
                "readable".to_string()
            } else {
                format!("DAMAGED\n    {}", f.damage.join("\n    "))
            };
            out += &format!("{}: {state}\n", f.file.display());
        }
        out += "readable:\n";
        for (account, a) in &self.accounts {
            out += &format!(
                "  account {account}: {} events waiting ({} only in the intake log, {} undecodable)\n",
                a.events, a.only_in_intake_log, a.undecodable
            );
        }
        if self.accounts.is_empty() {
            out += "  no waiting events\n";
        }
        out += &format!(
            "  {} dead letters, {} dedup entries, {} rate budget states\n",
            self.dead_letters, self.dedup_entries, self.limiter_states
        );
        out
    }
}

/// Everything readable, gathered for the report and the rebuild.
#[derive(Default)]
struct Contents {
    /// (account, id) -> encoded record.
    events: BTreeMap<(String, u64), Vec<u8>>,
    from_log: BTreeSet<(String, u64)>,
    dedup: BTreeMap<u64, DedupEntry>,
    dead: BTreeMap<u64, Vec<u8>>,
    meta: BTreeMap<String, u64>,
    /// A file of a later format: rebuilding it with this version would lose what it does not understand.
    newer: bool,
    /// `spool.redb` did not read whole.
    redb_damaged: bool,
}

/// Reads what `dir` holds without writing to it.
pub fn check(dir: &Path) -> Result<Report, String> {
    Ok(read(dir)?.0)
}

fn read(dir: &Path) -> Result<(Report, Contents), String> {
    let mut contents = Contents::default();
    let redb_report = read_redb(dir, &mut contents)?;
    let log_report = read_log(&dir.join(LOG), &mut contents)?;
    let mut accounts: BTreeMap<String, AccountReport> = BTreeMap::new();
    for ((account, id), bytes) in &contents.events {
        let a = accounts.entry(account.clone()).or_default();
        a.events += 1;
        if codec::decode(account, bytes).is_err() {
            a.undecodable += 1;
        }
        if contents.from_log.contains(&(account.clone(), *id)) {
            a.only_in_intake_log += 1;
        }
    }
    let limiter_states = contents
        .meta
        .keys()
        .filter(|k| matches!(MetaKey::parse(k), Some(MetaKey::Tat(_))))
        .count() as u64;
    let report = Report {
        dir: dir.to_path_buf(),
        files: vec![redb_report, log_report],
        accounts,
        dead_letters: contents.dead.len() as u64,
        dedup_entries: contents.dedup.len() as u64,
        limiter_states,
    };
    Ok((report, contents))
}

fn missing(path: &Path) -> bool {
    std::fs::metadata(path).map_or(true, |m| m.len() == 0)
}

fn read_log(path: &Path, contents: &mut Contents) -> Result<FileReport, String> {
    let mut report = FileReport {
        file: path.to_path_buf(),
        missing: missing(path),
        damage: Vec::new(),
    };
    if report.missing {
        return Ok(report);
    }
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) => {
            report.damage.push(format!("cannot be read: {e}"));
            return Ok(report);
        }
    };
    let found = intake_log::inspect(&data);
    report.damage.extend(found.damage);
    contents.newer |= matches!(found.header, intake_log::Header::Newer(_));
    // Which logged events spool.redb already took is its `seq`. Without it (its counters were lost to the
    // damage) every logged event is kept: some may have been sent or dead-lettered since and go out again
    // (X drops a repeated conversion_id within 48 h), but none that waited is lost.
    let last = match contents.meta.get(&MetaKey::Seq.name()) {
        Some(seq) => *seq,
        None => {
            if contents.redb_damaged && !found.records.is_empty() {
                report.damage.push(format!(
                    "spool.redb's counters are lost, so which of these {} logged events it had already taken (and since sent or dead-lettered) is unknown: all are kept, and those already sent go out again (X drops a repeated conversion_id within 48 h)",
                    found.records.len()
                ));
            }
            0
        }
    };
    for r in found.records {
        add_logged(contents, r, last);
    }
    Ok(report)
}

/// A logged event that `spool.redb` lacks (an id above its last one, as start-up decides).
fn add_logged(contents: &mut Contents, r: IntakeRecord, redb_seq: u64) {
    if r.seq <= redb_seq {
        return;
    }
    let key = (r.account.clone(), r.seq);
    contents.dedup.entry(r.log_seq).or_insert(DedupEntry {
        key: r.key,
        received_at_ms: r.received_at_ms,
    });
    if !contents.events.contains_key(&key) {
        contents.from_log.insert(key.clone());
        contents.events.insert(key, r.bytes);
    }
}

/// A scratch directory under `spool.dir` (the same file system, so renames are atomic), removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(dir: &Path, what: &str) -> Result<Self, String> {
        let path = dir.join(format!(
            ".{what}-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        ));
        std::fs::create_dir(&path)
            .map_err(|e| format!("cannot make a working directory {}: {e}", path.display()))?;
        Ok(WorkDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of `spool.redb` to read from, under `work`, padded back to its stored length when truncated.
fn working_copy(path: &Path, work: &Path) -> Result<PathBuf, String> {
    let copy = work.join(REDB);
    std::fs::copy(path, &copy).map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
    Ok(copy)
}

fn open_copy(copy: &Path) -> Result<Database, String> {
    let attempt = || {
        quiet_catch(|| Database::builder().create(copy))
            .map_err(|p| format!("a page does not read back: {p}"))?
            .map_err(|e| e.to_string())
    };
    match attempt() {
        Ok(db) => Ok(db),
        Err(why) => {
            // "File truncated below stored layout: file_len=…, layout_len=N": pad it back, and what was
            // before the cut reads again.
            let stored = why.split("layout_len=").nth(1).and_then(|n| {
                n.trim_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u64>()
                    .ok()
            });
            match stored {
                Some(len) => {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(copy)
                        .and_then(|f| f.set_len(len))
                        .map_err(|e| format!("{why}; padding a copy failed: {e}"))?;
                    attempt().map_err(|again| format!("{why}; padded back: {again}"))
                }
                None => Err(why),
            }
        }
    }
}

fn read_redb(dir: &Path, contents: &mut Contents) -> Result<FileReport, String> {
    let path = dir.join(REDB);
    let mut report = FileReport {
        file: path.clone(),
        missing: missing(&path),
        damage: Vec::new(),
    };
    if report.missing {
        return Ok(report);
    }
    let work = WorkDir::new(dir, "check")?;
    let copy = match working_copy(&path, work.path()) {
        Ok(c) => c,
        Err(why) => {
            report.damage.push(why);
            contents.redb_damaged = true;
            return Ok(report);
        }
    };
    // The integrity check first: it tells whether anything is wrong (and repairs what an interrupted
    // commit left in the copy).
    let checked = quiet_catch(|| -> Result<bool, String> {
        let mut db = open_copy(&copy)?;
        db.check_integrity().map_err(|e| e.to_string())
    });
    match checked {
        Ok(Ok(_)) => {}
        Ok(Err(why)) => report.damage.push(format!("it is damaged ({why})")),
        Err(panic) => report.damage.push(format!(
            "it is damaged (a page does not read back: {panic})"
        )),
    }
    let db = match open_copy(&copy) {
        Ok(db) => db,
        Err(why) => {
            if report.damage.is_empty() {
                report.damage.push(format!("it is damaged ({why})"));
            }
            report.damage.push("no record could be read from it".into());
            contents.redb_damaged = true;
            return Ok(report);
        }
    };
    let mut damage = Vec::new();
    let mut meta = Vec::new();
    let ran = quiet_catch(|| -> Result<(), String> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(META).map_err(|e| e.to_string())?;
        for item in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = item.map_err(|e| e.to_string())?;
            meta.push((k.value().to_owned(), v.value()));
        }
        Ok(())
    });
    if let Ok(Err(why)) | Err(why) = ran {
        damage.push(format!(
            "table meta: a part cannot be read ({why}); counters are recomputed, but rate budget states on it are lost"
        ));
    }
    contents.meta.extend(meta);
    let format = contents
        .meta
        .get(&MetaKey::Format.name())
        .copied()
        .unwrap_or(1);
    if let Err(why) = known_format(format) {
        report.damage.push(why);
        contents.newer = true;
    }
    for account in accounts_in(&db, &contents.meta, &mut damage) {
        let rows = walk_ids(&db, "events", &mut damage, |txn, from, out| {
            let t = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
            for item in t
                .range((account.as_str(), from)..=(account.as_str(), u64::MAX))
                .map_err(|e| e.to_string())?
            {
                let (k, v) = item.map_err(|e| e.to_string())?;
                out.push((k.value().1, v.value().to_vec()));
            }
            Ok(())
        });
        for (id, bytes) in rows {
            contents.events.insert((account.clone(), id), bytes);
        }
    }
    for (seq, bytes) in walk_ids(&db, "dedup_log", &mut damage, |txn, from, out| {
        u64_rows(txn, DEDUP_LOG, from, out)
    }) {
        match DedupEntry::decode(seq, &bytes) {
            Ok(e) => {
                contents.dedup.insert(seq, e);
            }
            Err(e) => damage.push(e.to_string()),
        }
    }
    for (id, bytes) in walk_ids(&db, "dead_letters", &mut damage, |txn, from, out| {
        u64_rows(txn, DEAD, from, out)
    }) {
        match serde_json::from_slice::<DeadLetter>(&bytes) {
            Ok(_) => {
                contents.dead.insert(id, bytes);
            }
            Err(e) => damage.push(format!(
                "table dead_letters: entry {id} does not decode: {e}"
            )),
        }
    }
    report.damage.extend(damage);
    contents.redb_damaged = !report.damage.is_empty();
    Ok(report)
}

fn u64_rows(
    txn: &redb::ReadTransaction,
    table: redb::TableDefinition<u64, &[u8]>,
    from: u64,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<(), String> {
    let t = txn.open_table(table).map_err(|e| e.to_string())?;
    for item in t.range(from..).map_err(|e| e.to_string())? {
        let (k, v) = item.map_err(|e| e.to_string())?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(())
}

/// The accounts that have events: those the counters name, and those a walk of the events' keys finds.
fn accounts_in(
    db: &Database,
    meta: &BTreeMap<String, u64>,
    damage: &mut Vec<String>,
) -> Vec<String> {
    let mut names: BTreeSet<String> = meta
        .keys()
        .filter_map(|k| match MetaKey::parse(k) {
            Some(MetaKey::Events(a)) => Some(a.to_owned()),
            _ => None,
        })
        .collect();
    // Walk account by account: after each, jump to the next name.
    let mut from: Option<String> = None;
    loop {
        let next = quiet_catch(|| -> Result<Option<String>, String> {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let t = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
            let mut range = match &from {
                Some(a) => t.range((a.as_str(), u64::MAX)..),
                None => t.range::<(&str, u64)>(..),
            }
            .map_err(|e| e.to_string())?;
            loop {
                match range.next() {
                    None => return Ok(None),
                    Some(item) => {
                        let (k, _) = item.map_err(|e| e.to_string())?;
                        let a = k.value().0.to_owned();
                        if from.as_deref() != Some(a.as_str()) {
                            return Ok(Some(a));
                        }
                    }
                }
            }
        });
        match next {
            Ok(Ok(Some(a))) => {
                names.insert(a.clone());
                from = Some(a);
            }
            Ok(Ok(None)) => break,
            Ok(Err(why)) | Err(why) => {
                damage.push(format!("table events: the accounts could not all be listed ({why}); those the counters name were read"));
                break;
            }
        }
    }
    names.into_iter().collect()
}

/// Walks a table keyed by ids with `read(txn, from)`, which answers the rows from `from` on or fails part
/// way. After a failure the walk starts again past the last id read, jumping further each time it fails
/// again, so that one unreadable page loses only the rows on it.
fn walk_ids(
    db: &Database,
    table: &str,
    damage: &mut Vec<String>,
    read: impl Fn(&redb::ReadTransaction, u64, &mut Vec<(u64, Vec<u8>)>) -> Result<(), String>,
) -> Vec<(u64, Vec<u8>)> {
    let mut rows = Vec::new();
    let mut from = 0u64;
    let mut jump = 1u64;
    let mut failures = 0;
    loop {
        let mut got = Vec::new();
        let ran = quiet_catch(|| -> Result<(), String> {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            // Rows arrive one by one into `got`, so a failure part way keeps what came before it.
            read(&txn, from, &mut got)
        });
        let last = got.last().map(|(id, _)| *id);
        rows.append(&mut got);
        match ran {
            Ok(Ok(())) => break,
            Ok(Err(why)) | Err(why) => {
                failures += 1;
                if failures == 1 {
                    damage.push(format!(
                        "table {table}: a part cannot be read ({why}); the rows around it were read"
                    ));
                }
                let base = last.map_or(from, |l| l.saturating_add(1));
                from = base.saturating_add(jump);
                jump = jump.saturating_mul(2);
                if from == u64::MAX || failures > 64 {
                    break;
                }
            }
        }
    }
    rows.sort_by_key(|(id, _)| *id);
    rows.dedup_by_key(|(id, _)| *id);
    rows
}

/// What `salvage` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Salvaged {
    pub before: Report,
    /// Where the old files went.
    pub moved_to: PathBuf,
    pub events: u64,
    pub dead_letters: u64,
    pub dedup_entries: u64,
}

/// Moves `dir`'s spool files aside and rebuilds the spool from every readable record (module doc).
/// Refused while another process has the spool open.
pub fn salvage(dir: &Path) -> Result<Salvaged, String> {
    let path = dir.join(REDB);
    let _lock = lock(&path)?;
    let (before, contents) = read(dir)?;
    if contents.newer {
        return Err(format!(
            "{}: a newer conversion-gateway wrote this spool; salvaging it with this version would lose what it does not understand. Run the newer version (nothing was changed)",
            dir.display()
        ));
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = dir.join(format!("damaged-{stamp}"));
    let work = WorkDir::new(dir, "salvage")?;
    let fresh = work.path().join(REDB);
    write_spool(&fresh, &contents)?;
    std::fs::create_dir(&aside).map_err(|e| format!("cannot create {}: {e}", aside.display()))?;
    let sync_dir = |d: &Path| {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", d.display()))
    };
    if path.exists() {
        std::fs::hard_link(&path, aside.join(REDB))
            .map_err(|e| format!("cannot keep {} in {}: {e}", path.display(), aside.display()))?;
    }
    sync_dir(&aside)?;
    std::fs::rename(&fresh, &path)
        .map_err(|e| format!("cannot put the rebuilt spool in place: {e}"))?;
    sync_dir(dir)?;
    let log = dir.join(LOG);
    if log.exists() {
        std::fs::rename(&log, aside.join(LOG))
            .map_err(|e| format!("cannot move {} aside: {e}", log.display()))?;
    }
    sync_dir(&aside)?;
    sync_dir(dir)?;
    Ok(Salvaged {
        before,
        moved_to: aside,
        events: contents.events.len() as u64,
        dead_letters: contents.dead.len() as u64,
        dedup_entries: contents.dedup.len() as u64,
    })
}

/// The lock a running gateway holds on the file (redb's `flock`), taken for the salvage.
fn lock(path: &Path) -> Result<Option<std::fs::File>, String> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(None);
    };
    match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
        Ok(true) => Ok(Some(file)),
        Ok(false) => Err(format!(
            "{} is open in another process: stop the gateway using this spool.dir first",
            path.display()
        )),
        Err(e) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

fn write_spool(path: &Path, c: &Contents) -> Result<(), String> {
    let db = open_db(path, 16 << 20).map_err(|e| e.to_string())?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let e = |e: redb::Error| e.to_string();
        let mut events = txn.open_table(EVENTS).map_err(|x| e(x.into()))?;
        let mut log = txn.open_table(DEDUP_LOG).map_err(|x| e(x.into()))?;
        let mut dead = txn.open_table(DEAD).map_err(|x| e(x.into()))?;
        let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        let mut counts: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for ((account, id), bytes) in &c.events {
            events
                .insert((account.as_str(), *id), bytes.as_slice())
                .map_err(|x| e(x.into()))?;
            let n = counts.entry(account).or_default();
            n.0 += 1;
            n.1 += bytes.len() as u64;
        }
        for (seq, entry) in &c.dedup {
            log.insert(*seq, entry.encode().as_slice())
                .map_err(|x| e(x.into()))?;
        }
        let mut dead_bytes = 0;
        for (id, bytes) in &c.dead {
            dead.insert(*id, bytes.as_slice())
                .map_err(|x| e(x.into()))?;
            dead_bytes += bytes.len() as u64;
        }
        // Kept as they were: the limiter's states and the eviction count. Recomputed: the rest.
        let mut set = |k: MetaKey<'_>, v: u64| {
            meta.insert(k.name().as_str(), v)
                .map(|_| ())
                .map_err(|x| e(x.into()))
        };
        for (name, v) in &c.meta {
            if let Some(k @ (MetaKey::Tat(_) | MetaKey::DeadEvicted)) = MetaKey::parse(name) {
                set(k, *v)?;
            }
        }
        let stored = |k: MetaKey<'_>| c.meta.get(&k.name()).copied().unwrap_or(0);
        let last_id = c.events.keys().map(|(_, id)| *id).max().unwrap_or(0);
        set(MetaKey::Seq, stored(MetaKey::Seq).max(last_id))?;
        let next_log = c.dedup.keys().next_back().map_or(0, |s| s + 1);
        set(MetaKey::DedupNext, stored(MetaKey::DedupNext).max(next_log))?;
        let last_dead = c.dead.keys().next_back().copied().unwrap_or(0);
        set(MetaKey::DeadSeq, stored(MetaKey::DeadSeq).max(last_dead))?;
        set(MetaKey::DeadBytes, dead_bytes)?;
        set(MetaKey::Format, FORMAT)?;
        for (account, (n, bytes)) in counts {
            set(MetaKey::Events(account), n)?;
            set(MetaKey::Bytes(account), bytes)?;
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    drop(db);
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))
}
