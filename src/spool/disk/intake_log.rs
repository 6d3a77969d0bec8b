//! The intake log: where an appended event is made durable before it reaches the redb file.
//!
//! Why: a redb commit rewrites every B-tree page it touches and fsyncs; per group of ~20 events that was
//! ~14 page writes and ~10x the events' bytes on disk (measured: 105 MB/s written for 11 MB/s of events).
//! Here a group is one frame, written in place with `O_DSYNC` (one syscall); the storage thread moves what the log
//! holds into redb in large transactions, much less often.
//!
//! Layout: a 4 KiB header (magic, epoch, CRC) and then frames, each `epoch | length | count | CRC |
//! records`, the CRC covering everything before it and the records. A reset starts a new epoch at the
//! first frame again, overwriting blocks the file already has (no metadata to sync, unlike an append).
//! Invariants: frames are written only at the end of the valid ones, and only one at a time (each is
//! on disk before the next is written); reading stops at the first frame that is short, fails its CRC or carries
//! another epoch, so a torn last frame and the stale frames of an earlier epoch are never read back.
//! After a failed write or sync the log refuses frames until it is reset: what the failure left on disk
//! is then behind the new epoch. The owner resets only when everything logged is durable elsewhere.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"CGWINTK1";
/// Frames start here; the header has the first block to itself.
pub const HEADER_LEN: u64 = 4096;
const FRAME_HEAD: usize = 8 + 4 + 4 + 4;
/// A frame longer than this is not one of ours.
const MAX_FRAME: usize = 256 << 20;
/// A reset gives back the file's blocks beyond this (the log only grows this large while redb fails, or
/// with one unusually large group of appends). Part of the spool's reserve (`admission::RESERVE`).
pub const KEEP_BYTES: u64 = 4 << 20;

/// One event as the log keeps it: what the storage thread needs to put it into redb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntakeRecord {
    /// The event's id in its account's queue.
    pub seq: u64,
    /// Its entry in the dedup log.
    pub log_seq: u64,
    pub received_at_ms: i64,
    /// The full dedup key.
    pub key: [u8; 32],
    pub account: String,
    /// The encoded record (`codec`).
    pub bytes: Vec<u8>,
}

/// The open log.
pub struct IntakeLog {
    file: File,
    epoch: u64,
    /// Where the next frame goes.
    end: u64,
    /// A write or sync failed: no frame until `reset`.
    broken: bool,
    frame: Vec<u8>,
}

impl IntakeLog {
    /// Opens (or creates) the log at `path` and reads back the records of its current epoch. A log that
    /// lost bytes in the middle, that is not one, or that a newer version wrote is refused (`OpenError::Damaged`,
    /// nothing written): what it holds must not be overwritten by the first append.
    pub fn open(path: &Path) -> Result<(IntakeLog, Vec<IntakeRecord>), OpenError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // Each write returns once its data is on disk: one syscall per frame instead of write + fdatasync
            // (measured: ~7% more single-event POSTs per second).
            .custom_flags(libc::O_DSYNC)
            .open(path)?;
        let data = std::fs::read(path)?;
        let found = inspect(&data);
        if let Some(why) = found.damage {
            return Err(OpenError::Damaged(why));
        }
        let mut log = IntakeLog {
            file,
            epoch: 0,
            end: HEADER_LEN,
            broken: false,
            frame: Vec::new(),
        };
        match found.epoch {
            Some(epoch) => {
                if found.header != Header::Epoch(epoch) {
                    tracing::warn!(file = %path.display(), frames = found.records.len(), "the intake log's header is unreadable; its frames were read by their own epoch (the header is written again at the next reset)");
                }
                log.epoch = epoch;
                log.end = HEADER_LEN + found.readable_end as u64;
            }
            // New, or torn while a reset wrote it, with no frame after it: a reset writes the header only
            // when everything logged before is durable elsewhere, and no frame follows a header that did
            // not reach the disk.
            None => log.reset()?,
        }
        if !existed {
            // The file's name must survive a crash as well as its contents.
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok((log, found.records))
    }

    /// Writes `records` as one frame, durably (`O_DSYNC`). Refused after a failure until `reset`.
    pub fn append<'r>(
        &mut self,
        records: impl IntoIterator<Item = &'r IntakeRecord>,
    ) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(
                "the intake log failed earlier and waits for a reset",
            ));
        }
        self.frame.clear();
        encode_frame(self.epoch, records, &mut self.frame);
        match self.file.write_all_at(&self.frame, self.end) {
            Ok(()) => {
                self.end += self.frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Starts a new epoch: every frame written so far is forgotten. Only when all of them are durable elsewhere.
    /// After a failure the log refuses frames until a reset succeeds: the header on disk may then name an epoch
    /// other than ours, and a frame written under ours could be skipped at the next start.
    pub fn reset(&mut self) -> io::Result<()> {
        let epoch = next_epoch(self.epoch);
        if let Err(e) = self.file.write_all_at(&header(epoch), 0) {
            self.broken = true;
            return Err(e);
        }
        self.epoch = epoch;
        self.end = HEADER_LEN;
        self.broken = false;
        if self.file.metadata().is_ok_and(|m| m.len() > KEEP_BYTES) {
            // Giving the space back is a nicety; the log is consistent either way.
            let _ = self
                .file
                .set_len(HEADER_LEN)
                .and_then(|()| self.file.sync_data());
        }
        Ok(())
    }

    /// Bytes of frames in the current epoch.
    pub fn len(&self) -> u64 {
        self.end - HEADER_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it refuses frames until a reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

/// A random epoch other than `current` (and never 0, which a zero-filled block would carry): the bytes left
/// behind the end of the log, which hold events' contents, can never pass for a frame of a later epoch.
fn next_epoch(current: u64) -> u64 {
    loop {
        let e: u64 = rand::random();
        if e != 0 && e != current {
            return e;
        }
    }
}

fn header(epoch: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// What the first bytes of the file are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// An intact header of this format, naming the current epoch.
    Epoch(u64),
    /// Nothing written yet (a new file, or a crash before its first header reached the disk), or a header of
    /// this format torn while a reset rewrote it. Nothing logged depends on it when no frame follows.
    Unwritten,
    /// The header of a later format of this log (a newer conversion-gateway wrote it).
    Newer(u8),
    /// Bytes that are not an intake log's header.
    Foreign,
}

/// The format's name: `MAGIC` without its version digit.
const MAGIC_NAME: &[u8; 7] = b"CGWINTK";

pub fn read_header(data: &[u8]) -> Header {
    let Some(h) = data.get(..20) else {
        return if data.iter().all(|b| *b == 0) || data.starts_with(&MAGIC[..data.len().min(8)]) {
            Header::Unwritten
        } else {
            Header::Foreign
        };
    };
    if h.iter().all(|b| *b == 0) {
        return Header::Unwritten;
    }
    if !h.starts_with(MAGIC_NAME) {
        return Header::Foreign;
    }
    if h[7] != MAGIC[7] {
        return match h[7] {
            v @ b'2'..=b'9' => Header::Newer(v - b'0'),
            _ => Header::Foreign,
        };
    }
    if crc32fast::hash(&h[..16]).to_le_bytes() != h[16..20] {
        return Header::Unwritten;
    }
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&h[8..16]);
    Header::Epoch(u64::from_le_bytes(epoch))
}

/// Where the intact frames of an epoch end in `data`, and where intact frames of the same epoch begin after
/// that. A log that a crash interrupted ends in at most one torn frame, with nothing of its epoch after it; an
/// intact frame further on means bytes in between were damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameScan {
    pub readable_end: usize,
    /// Offsets (in `data`) of the first intact frame of each run found after `readable_end`.
    pub later: Vec<usize>,
}

/// Scans `data` (the frames' part of the file) for the frames of `epoch`.
pub fn scan_frames(epoch: u64, data: &[u8]) -> FrameScan {
    let (_, readable_end) = decode_frames(epoch, data);
    let mut later = Vec::new();
    let tag = epoch.to_le_bytes();
    let mut at = readable_end + 1;
    while let Some(window) = data.get(at..) {
        let Some(found) = window.windows(8).position(|w| w == tag) else {
            break;
        };
        let start = at + found;
        let rest = data.get(start..).unwrap_or_default();
        let (_, used) = decode_frames(epoch, rest);
        if used > 0 {
            later.push(start);
            at = start + used;
        } else {
            at = start + 1;
        }
    }
    FrameScan {
        readable_end,
        later,
    }
}

/// Why a log could not be opened.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    /// What is wrong with it, for a person.
    Damaged(String),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(e) => e.fmt(f),
            OpenError::Damaged(why) => f.write_str(why),
        }
    }
}

/// What a log's bytes hold, read without writing anything (for `open`, `spool check` and `spool salvage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub header: Header,
    /// The epoch its frames carry: the header's, or the first frame's when the header is unreadable.
    pub epoch: Option<u64>,
    /// Every intact frame's records, in order, including those after damaged bytes.
    pub records: Vec<IntakeRecord>,
    /// Bytes of frames (after the header) that read without a gap.
    pub readable_end: usize,
    /// What cannot be read, when something can't: a log that a crash interrupted has none.
    pub damage: Option<String>,
}

pub fn inspect(data: &[u8]) -> Inspection {
    let header = read_header(data);
    let body = data.get(HEADER_LEN as usize..).unwrap_or_default();
    let epoch = match header {
        Header::Epoch(e) => Some(e),
        Header::Unwritten | Header::Foreign => first_frame_epoch(body),
        Header::Newer(_) => None,
    };
    let mut found = Inspection {
        header,
        epoch,
        records: Vec::new(),
        readable_end: 0,
        damage: match header {
            Header::Newer(v) => Some(format!(
                "it was written by a newer conversion-gateway (intake log format {v}; this version reads format 1): run that version again, or move the spool aside"
            )),
            Header::Foreign if epoch.is_none() => Some(
                "it is not an intake log: its first bytes are not a conversion-gateway intake log header, and no intact frame follows".into(),
            ),
            _ => None,
        },
    };
    let Some(epoch) = epoch else {
        return found;
    };
    let scan = scan_frames(epoch, body);
    found.readable_end = scan.readable_end;
    found.records = decode_frames(epoch, body).0;
    for at in &scan.later {
        found
            .records
            .extend(decode_frames(epoch, body.get(*at..).unwrap_or_default()).0);
    }
    if let Some(first) = scan.later.first() {
        found.damage = Some(format!(
            "bytes {} to {} do not read as frames, yet intact frames follow ({} runs, the first at byte {}): part of the log was overwritten or zero-filled",
            HEADER_LEN as usize + scan.readable_end,
            HEADER_LEN as usize + first,
            scan.later.len(),
            HEADER_LEN as usize + first,
        ));
    }
    found
}

/// The epoch of the intact frame at the start of `data`, if one is there (for a log whose header is gone).
pub fn first_frame_epoch(data: &[u8]) -> Option<u64> {
    let epoch = u64::from_le_bytes(*data.first_chunk::<8>()?);
    (epoch != 0 && decode_frame(epoch, data).is_some()).then_some(epoch)
}

/// Appends one frame of `records` in `epoch` to `out`.
pub fn encode_frame<'r>(
    epoch: u64,
    records: impl IntoIterator<Item = &'r IntakeRecord>,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEAD]);
    let mut count: u32 = 0;
    for r in records {
        out.extend_from_slice(&r.seq.to_le_bytes());
        out.extend_from_slice(&r.log_seq.to_le_bytes());
        out.extend_from_slice(&r.received_at_ms.to_le_bytes());
        out.extend_from_slice(&r.key);
        out.extend_from_slice(&(r.account.len() as u16).to_le_bytes());
        out.extend_from_slice(r.account.as_bytes());
        out.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.bytes);
        count += 1;
    }
    let len = (out.len() - start - FRAME_HEAD) as u32;
    out[start..start + 8].copy_from_slice(&epoch.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
    out[start + 12..start + 16].copy_from_slice(&count.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 16]);
    crc.update(&out[start + FRAME_HEAD..]);
    let crc = crc.finalize();
    out[start + 16..start + FRAME_HEAD].copy_from_slice(&crc.to_le_bytes());
}

/// The records of the valid frames of `epoch` at the start of `data`, and how many bytes those frames take.
/// Never fails: whatever is not a whole, intact frame of this epoch ends the log.
pub fn decode_frames(epoch: u64, data: &[u8]) -> (Vec<IntakeRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((frame, used)) = decode_frame(epoch, &data[at..]) {
        records.extend(frame);
        at += used;
    }
    (records, at)
}

fn decode_frame(epoch: u64, data: &[u8]) -> Option<(Vec<IntakeRecord>, usize)> {
    let head = data.get(..FRAME_HEAD)?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if u64::from_le_bytes(head[..8].try_into().ok()?) != epoch {
        return None;
    }
    let (len, count) = (word(8) as usize, word(12) as usize);
    if len > MAX_FRAME {
        return None;
    }
    let body = data.get(FRAME_HEAD..FRAME_HEAD + len)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..16]);
    crc.update(body);
    if crc.finalize() != word(16) {
        return None;
    }
    let mut r = Reader(body);
    let mut out = Vec::with_capacity(count.min(len / 60));
    for _ in 0..count {
        out.push(IntakeRecord {
            seq: r.u64()?,
            log_seq: r.u64()?,
            received_at_ms: r.u64()? as i64,
            key: r.take(32)?.try_into().ok()?,
            account: {
                let n = r.u16()? as usize;
                String::from_utf8(r.take(n)?.to_vec()).ok()?
            },
            bytes: {
                let n = r.u32()? as usize;
                r.take(n)?.to_vec()
            },
        });
    }
    r.0.is_empty().then_some((out, FRAME_HEAD + len))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(seq: u64, account: &str, bytes: &[u8]) -> IntakeRecord {
        IntakeRecord {
            seq,
            log_seq: seq.wrapping_mul(3),
            received_at_ms: 1_764_000_000_000_i64.wrapping_add(seq as i64),
            key: [seq as u8; 32],
            account: account.into(),
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn what_was_appended_is_read_back_after_reopening_and_gone_after_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("intake.log");
        let (mut log, found) = IntakeLog::open(&path).unwrap();
        assert!(found.is_empty() && log.is_empty());
        let (a, b, c) = (
            rec(1, "acme", b"one"),
            rec(2, "acme", b"two"),
            rec(3, "b", b""),
        );
        log.append([&a, &b]).unwrap();
        log.append([&c]).unwrap();
        drop(log);
        let (mut log, found) = IntakeLog::open(&path).unwrap();
        assert_eq!(found, [a.clone(), b, c]);
        log.reset().unwrap();
        let d = rec(4, "acme", b"four");
        log.append([&d]).unwrap();
        drop(log);
        // The new epoch's frame overwrote part of the old ones; what is left of them is not read.
        let (_, found) = IntakeLog::open(&path).unwrap();
        assert_eq!(found, [d]);
    }

    #[test]
    fn a_torn_last_frame_ends_the_log_and_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("intake.log");
        let (mut log, _) = IntakeLog::open(&path).unwrap();
        let (a, b) = (rec(1, "acme", &[7; 300]), rec(2, "acme", &[8; 300]));
        log.append([&a]).unwrap();
        log.append([&b]).unwrap();
        drop(log);
        // The crash came in the middle of writing b's frame.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 100).unwrap();
        let (mut log, found) = IntakeLog::open(&path).unwrap();
        assert_eq!(found, std::slice::from_ref(&a));
        let c = rec(3, "acme", b"c");
        log.append([&c]).unwrap();
        drop(log);
        assert_eq!(IntakeLog::open(&path).unwrap().1, [a, c]);
    }

    #[test]
    fn a_torn_header_with_frames_after_it_is_read_by_the_frames_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("intake.log");
        let (mut log, _) = IntakeLog::open(&path).unwrap();
        log.append([&rec(1, "acme", b"x")]).unwrap();
        drop(log);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 4], 10).unwrap();
        // Torn while a reset wrote it (then the frames are durable elsewhere and recovery skips them) or
        // damaged (then they are the current ones): either way reading them loses nothing.
        let (mut log, found) = IntakeLog::open(&path).unwrap();
        assert_eq!(found, [rec(1, "acme", b"x")]);
        log.append([&rec(2, "acme", b"y")]).unwrap();
        drop(log);
        assert_eq!(
            IntakeLog::open(&path).unwrap().1,
            [rec(1, "acme", b"x"), rec(2, "acme", b"y")]
        );
        // A torn header with nothing after it is a new log.
        let empty = dir.path().join("empty.log");
        std::fs::write(&empty, &header(5)[..11]).unwrap();
        let (mut log, found) = IntakeLog::open(&empty).unwrap();
        assert!(found.is_empty());
        log.append([&rec(3, "acme", b"z")]).unwrap();
        drop(log);
        assert_eq!(IntakeLog::open(&empty).unwrap().1, [rec(3, "acme", b"z")]);
    }

    fn log_of(frames: &[&[IntakeRecord]]) -> (tempfile::TempDir, std::path::PathBuf, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("intake.log");
        let (mut log, _) = IntakeLog::open(&path).unwrap();
        let mut ends = Vec::new();
        for f in frames {
            log.append(f.iter()).unwrap();
            ends.push(log.end);
        }
        (dir, path, ends)
    }

    #[test]
    fn bytes_lost_before_intact_frames_are_damage_and_open_writes_nothing() {
        let (a, b, c) = (
            rec(1, "acme", &[1; 200]),
            rec(2, "acme", &[2; 200]),
            rec(3, "b", &[3; 200]),
        );
        let (_dir, path, ends) =
            log_of(&[std::slice::from_ref(&a), &[b], std::slice::from_ref(&c)]);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0; 100], ends[0] + 10).unwrap();
        let before = std::fs::read(&path).unwrap();
        match IntakeLog::open(&path) {
            Err(OpenError::Damaged(why)) => assert!(why.contains("zero-filled"), "{why}"),
            other => panic!("{:?}", other.map(|o| o.1)),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
        let found = inspect(&before);
        assert_eq!(
            found.records,
            [a, c],
            "the readable part on both sides of the damage"
        );
        assert_eq!(found.readable_end as u64, ends[0] - HEADER_LEN);
    }

    #[test]
    fn a_newer_format_or_foreign_bytes_are_refused() {
        let (_dir, path, _) = log_of(&[&[rec(1, "acme", b"x")]]);
        let mut data = std::fs::read(&path).unwrap();
        data[7] = b'2';
        std::fs::write(&path, &data).unwrap();
        match IntakeLog::open(&path) {
            Err(OpenError::Damaged(why)) => {
                assert!(why.contains("newer conversion-gateway"), "{why}")
            }
            other => panic!("{:?}", other.map(|o| o.1)),
        }
        std::fs::write(&path, vec![0x5a; 9000]).unwrap();
        match IntakeLog::open(&path) {
            Err(OpenError::Damaged(why)) => assert!(why.contains("not an intake log"), "{why}"),
            other => panic!("{:?}", other.map(|o| o.1)),
        }
        // A zero-filled header before intact frames: read by the frames' epoch.
        let (_dir, path, _) = log_of(&[&[rec(1, "acme", b"x")]]);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0; 20], 0).unwrap();
        assert_eq!(IntakeLog::open(&path).unwrap().1, [rec(1, "acme", b"x")]);
    }

    #[test]
    fn epochs_are_random_and_never_zero() {
        let mut seen = std::collections::HashSet::new();
        let mut e = 1;
        for _ in 0..100 {
            e = next_epoch(e);
            assert_ne!(e, 0);
            seen.insert(e);
        }
        assert!(seen.len() > 95);
    }

    proptest! {
        /// Whatever the records, frames decode to them; a cut or a flipped byte anywhere loses at most the frame
        /// it hits and those after it, never makes up a record, and never panics.
        #[test]
        fn frames_round_trip_and_damage_only_shortens_the_log(
            frames in prop::collection::vec(
                prop::collection::vec((any::<u64>(), "[a-z_]{0,12}", prop::collection::vec(any::<u8>(), 0..64)), 0..5),
                1..5),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut data = Vec::new();
            let mut ends = Vec::new();
            let mut all = Vec::new();
            for f in &frames {
                let recs: Vec<IntakeRecord> = f.iter().map(|(s, a, b)| rec(*s, a, b)).collect();
                encode_frame(9, &recs, &mut data);
                ends.push((data.len(), all.len() + recs.len()));
                all.extend(recs);
            }
            let (got, used) = decode_frames(9, &data);
            prop_assert_eq!(&got, &all);
            prop_assert_eq!(used, data.len());
            prop_assert!(decode_frames(8, &data).0.is_empty(), "another epoch's frames are not read");

            let at = cut.index(data.len());
            let (got, _) = decode_frames(9, &data[..at]);
            let whole = ends.iter().rfind(|(end, _)| *end <= at).map_or(0, |e| e.1);
            prop_assert_eq!(&got[..], &all[..whole]);

            let mut bad = data.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 0x5a;
            let (got, _) = decode_frames(9, &bad);
            let before = ends.iter().rfind(|(end, _)| *end <= i).map_or(0, |e| e.1);
            prop_assert_eq!(&got[..], &all[..before]);
        }
    }
}
