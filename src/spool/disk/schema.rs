//! What the redb file holds: its tables, the keys of its `meta` table, and the checked encoding of a
//! dedup log entry. Every value read back is checked for its length: a short or long one is an error
//! naming the table, never a panic.

use super::super::SpoolError;
use redb::TableDefinition;

/// Waiting events: (account, id) -> encoded record (`spool::codec`).
pub const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// Dedup log: sequence -> 32-byte key ‖ received time (epoch ms, little endian), in arrival order.
pub const DEDUP_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_log");
/// Dead letters: id -> JSON of `spool::DeadLetter`.
pub const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Counters and cursors, keyed by `MetaKey::name`.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A key of the `meta` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaKey<'a> {
    /// The last event id handed out.
    Seq,
    /// The next dedup log sequence.
    DedupNext,
    /// The last dead letter id handed out.
    DeadSeq,
    /// Dead letters evicted to stay within the bound, since the spool was made.
    DeadEvicted,
    /// Bytes the dead letters store (absent in spools made before it was kept: counted at start-up).
    DeadBytes,
    /// Waiting events of an account.
    Events(&'a str),
    /// Bytes of an account's waiting events.
    Bytes(&'a str),
    /// The limiter's theoretical arrival time of a budget key (nanoseconds since the epoch).
    Tat(&'a str),
    /// The layout of this file (`FORMAT`; absent in spools made before it was kept: format 1).
    Format,
}

/// The layout this version writes and reads. A file of a later one is refused, never read half-understood.
pub const FORMAT: u64 = 1;

impl<'a> MetaKey<'a> {
    /// Every key without a parameter.
    pub const FIXED: [MetaKey<'static>; 6] = [
        MetaKey::Format,
        MetaKey::Seq,
        MetaKey::DedupNext,
        MetaKey::DeadSeq,
        MetaKey::DeadEvicted,
        MetaKey::DeadBytes,
    ];

    pub fn name(&self) -> String {
        match self {
            MetaKey::Format => "format".into(),
            MetaKey::Seq => "seq".into(),
            MetaKey::DedupNext => "dedup_next".into(),
            MetaKey::DeadSeq => "dead_seq".into(),
            MetaKey::DeadEvicted => "dead_evicted".into(),
            MetaKey::DeadBytes => "dead_bytes".into(),
            MetaKey::Events(a) => format!("events:{a}"),
            MetaKey::Bytes(a) => format!("bytes:{a}"),
            MetaKey::Tat(k) => format!("tat:{k}"),
        }
    }

    /// The key a stored name stands for; `None` for a name this version does not know.
    pub fn parse(name: &'a str) -> Option<MetaKey<'a>> {
        if let Some(fixed) = Self::FIXED.into_iter().find(|k| k.name() == name) {
            return Some(fixed);
        }
        let (kind, arg) = name.split_once(':')?;
        match kind {
            "events" => Some(MetaKey::Events(arg)),
            "bytes" => Some(MetaKey::Bytes(arg)),
            "tat" => Some(MetaKey::Tat(arg)),
            _ => None,
        }
    }
}

/// One entry of the dedup log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupEntry {
    pub key: [u8; 32],
    pub received_at_ms: i64,
}

pub const DEDUP_ENTRY_LEN: usize = 40;

impl DedupEntry {
    pub fn encode(&self) -> [u8; DEDUP_ENTRY_LEN] {
        let mut entry = [0u8; DEDUP_ENTRY_LEN];
        entry[..32].copy_from_slice(&self.key);
        entry[32..].copy_from_slice(&(self.received_at_ms.max(0) as u64).to_le_bytes());
        entry
    }

    /// The entry stored under `seq`, checked for its length.
    pub fn decode(seq: u64, bytes: &[u8]) -> Result<Self, SpoolError> {
        let wrong = || {
            SpoolError::Unavailable(format!(
                "table dedup_log: entry {seq} is {} bytes, expected {DEDUP_ENTRY_LEN}",
                bytes.len()
            ))
        };
        let (key, time) = bytes
            .split_first_chunk::<32>()
            .filter(|(_, rest)| rest.len() == 8)
            .ok_or_else(wrong)?;
        let time: [u8; 8] = time.try_into().map_err(|_| wrong())?;
        Ok(DedupEntry {
            key: *key,
            received_at_ms: i64::try_from(u64::from_le_bytes(time)).unwrap_or(i64::MAX),
        })
    }
}

/// The fingerprint the in-memory table keeps for a dedup key: its first 8 bytes.
pub fn fingerprint(key: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn meta_keys_round_trip_and_unknown_names_are_none() {
        for key in MetaKey::FIXED.into_iter().chain([
            MetaKey::Events("acme"),
            MetaKey::Bytes("b"),
            MetaKey::Tat("18ce552mlaq"),
        ]) {
            let name = key.name();
            assert_eq!(MetaKey::parse(&name), Some(key));
        }
        assert_eq!(MetaKey::parse("whatever"), None);
        assert_eq!(MetaKey::parse("other:x"), None);
    }

    #[test]
    fn a_dedup_entry_of_the_wrong_length_is_an_error_naming_the_table() {
        let e = DedupEntry {
            key: [7; 32],
            received_at_ms: 1_700_000_000_000,
        };
        assert_eq!(DedupEntry::decode(3, &e.encode()), Ok(e));
        for len in [0, 8, 31, 32, 39, 41, 80] {
            let bytes = vec![1u8; len];
            match DedupEntry::decode(9, &bytes) {
                Err(SpoolError::Unavailable(why)) => {
                    assert!(
                        why.contains("dedup_log") && why.contains("entry 9"),
                        "{why}"
                    )
                }
                other => panic!("{len}: {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let decoded = DedupEntry::decode(0, &bytes);
            prop_assert_eq!(decoded.is_ok(), bytes.len() == DEDUP_ENTRY_LEN);
        }
    }
}
