//! Packs: how one queue entry holds the records of one ingest request for one account.
//!
//! # Why
//! Redis's cost is per command and per stream entry far more than per byte: queueing each record as
//! its own entry cost about twice the CPU per event of queueing a request's records as one (measured
//! with the append script on `redis-server` 7.0, 100 records of 400 bytes per call). So an entry is a
//! pack: field `r` the records' encoded bytes one after another, field `l` their lengths
//! (`"212,198"`). An entry without `l` (none is written so, but a damaged or foreign one may be)
//! holds one record; so does one whose lengths do not add up to `r`'s size or name more than 1,024. `pack.lua` reads packs by
//! the same rule.
//!
//! # Record ids
//! A record is named by its pack's stream id and its index in the pack:
//! `ms << 22 | seq << 10 | index` (`ms` < 2⁴², `seq` < 2¹², `index` < 2¹⁰). The order of ids is the
//! order of the queue: packs by stream id, records by index. The scripts keep every pack's sequence
//! number below 2¹² (a pack that would get a larger one is given the next millisecond), and packs hold
//! at most `MAX_RECORDS` records.
//!
//! # Partly done packs
//! The records of a pack leave one by one (a batch boundary, a bisection, a dead letter): the indices
//! already acked or dead-lettered are kept in the account's `done` hash (pack id → `"0,3,4"`) until the
//! whole pack leaves. A take skips them.

/// Records per pack at most (a request's records for one account are split into packs of this size).
pub const MAX_RECORDS: usize = 1000;

const INDEX_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;

/// A pack's stream id, as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId {
    pub ms: u64,
    pub seq: u64,
}

impl PackId {
    /// A stream id (`"1764600000000-3"`) this encoding can name records of.
    pub fn parse(id: &str) -> Option<PackId> {
        let (ms, seq) = id.split_once('-')?;
        let id = PackId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        };
        (id.ms < (1 << 42) && id.seq < (1 << SEQ_BITS)).then_some(id)
    }

    /// The id of the pack's record `index`.
    pub fn record(self, index: usize) -> Option<u64> {
        let index = u64::try_from(index)
            .ok()
            .filter(|i| *i < (1 << INDEX_BITS))?;
        Some((self.ms << (SEQ_BITS + INDEX_BITS)) | (self.seq << INDEX_BITS) | index)
    }

    /// The pack a record id belongs to, and the record's index in it.
    pub fn of(record: u64) -> (PackId, usize) {
        let pack = PackId {
            ms: record >> (SEQ_BITS + INDEX_BITS),
            seq: (record >> INDEX_BITS) & ((1 << SEQ_BITS) - 1),
        };
        (pack, (record & ((1 << INDEX_BITS) - 1)) as usize)
    }

    /// The pack's stream id.
    pub fn stream_id(self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }

    /// The stream id just below this pack's: a read "after" it starts with this pack.
    pub fn before(self) -> String {
        match (self.ms, self.seq) {
            (0, 0) => "0-0".to_owned(),
            (ms, 0) => format!("{}-{}", ms - 1, u64::MAX),
            (ms, seq) => format!("{ms}-{}", seq - 1),
        }
    }
}

/// A request's records for one account as a pack's two fields: their bytes, and their lengths.
pub fn encode<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, String) {
    let (mut bytes, mut lengths) = (Vec::new(), String::new());
    for r in records {
        if !lengths.is_empty() {
            lengths.push(',');
        }
        lengths.push_str(&r.len().to_string());
        bytes.extend_from_slice(r);
    }
    (bytes, lengths)
}

/// The records of a pack (its `r` and `l` fields), by the rule in the module doc.
pub fn split<'a>(bytes: &'a [u8], lengths: Option<&[u8]>) -> Vec<&'a [u8]> {
    let whole = vec![bytes];
    let Some(lengths) = lengths.and_then(|l| std::str::from_utf8(l).ok()) else {
        return whole;
    };
    let mut out = Vec::new();
    let mut rest = bytes;
    for len in lengths.split(',') {
        let digits = !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit());
        let Some(len) = len
            .parse::<usize>()
            .ok()
            .filter(|n| digits && *n <= rest.len())
        else {
            return whole;
        };
        let (record, tail) = rest.split_at(len);
        out.push(record);
        rest = tail;
    }
    if out.is_empty() || out.len() > 1 << INDEX_BITS || !rest.is_empty() {
        return whole;
    }
    out
}

/// The indices of a `done` hash value (`"0,3,4"`); what does not parse is ignored.
pub fn done_indices(value: &[u8]) -> Vec<usize> {
    String::from_utf8_lossy(value)
        .split(',')
        .filter_map(|i| i.parse().ok())
        .collect()
}

/// Indices as an ack or dead-letter script takes them: `*` for every record of a pack of `n`,
/// otherwise `"0,3,4"`.
pub fn indices_arg(indices: &[usize], n: usize) -> String {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if n > 0 && sorted.len() == n && sorted.last() == Some(&(n - 1)) {
        return "*".to_owned();
    }
    sorted
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn record_ids_round_trip_and_keep_the_queue_order(
            a in (0u64..(1 << 42), 0u64..(1 << 12), 0usize..1024),
            b in (0u64..(1 << 42), 0u64..(1 << 12), 0usize..1024),
        ) {
            let (pa, pb) = (PackId { ms: a.0, seq: a.1 }, PackId { ms: b.0, seq: b.1 });
            let (ia, ib) = (pa.record(a.2).unwrap(), pb.record(b.2).unwrap());
            prop_assert_eq!(PackId::of(ia), (pa, a.2));
            prop_assert_eq!(PackId::parse(&pa.stream_id()), Some(pa));
            prop_assert_eq!((pa, a.2).cmp(&(pb, b.2)), ia.cmp(&ib));
        }

        #[test]
        fn packs_split_into_the_records_they_were_made_of(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..50), 1..20),
        ) {
            let (bytes, lengths) = encode(records.iter().map(Vec::as_slice));
            let got: Vec<Vec<u8>> = split(&bytes, Some(lengths.as_bytes())).into_iter().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(got, records);
        }

        #[test]
        fn any_lengths_split_without_losing_a_byte(bytes in proptest::collection::vec(any::<u8>(), 0..64), lengths in "[0-9,]{0,12}") {
            let parts = split(&bytes, Some(lengths.as_bytes()));
            prop_assert_eq!(parts.concat(), bytes);
        }
    }

    #[test]
    fn the_stream_id_before_a_pack_is_just_below_it() {
        assert_eq!(PackId { ms: 5, seq: 3 }.before(), "5-2");
        assert_eq!(PackId { ms: 5, seq: 0 }.before(), "4-18446744073709551615");
        assert_eq!(PackId { ms: 0, seq: 0 }.before(), "0-0");
    }

    #[test]
    fn ids_that_do_not_fit_are_refused() {
        assert_eq!(PackId::parse("1-4096"), None);
        assert_eq!(PackId::parse(&format!("{}-0", 1u64 << 42)), None);
        assert_eq!(PackId::parse("x-1"), None);
        assert_eq!(PackId { ms: 1, seq: 1 }.record(1024), None);
    }

    #[test]
    fn a_pack_whose_lengths_do_not_add_up_is_one_record() {
        assert_eq!(split(b"abcdef", Some(b"2,4")), [b"ab".as_slice(), b"cdef"]);
        assert_eq!(split(b"abcdef", Some(b"2,3")), [b"abcdef".as_slice()]);
        assert_eq!(split(b"abcdef", Some(b"2,9")), [b"abcdef".as_slice()]);
        assert_eq!(split(b"abcdef", Some(b"x")), [b"abcdef".as_slice()]);
        assert_eq!(split(b"abcdef", Some(b"+2,4")), [b"abcdef".as_slice()]);
        assert_eq!(split(b"abcdef", None), [b"abcdef".as_slice()]);
    }

    #[test]
    fn indices_are_all_or_listed() {
        assert_eq!(indices_arg(&[2, 0, 1], 3), "*");
        assert_eq!(indices_arg(&[2, 0], 3), "0,2");
        assert_eq!(indices_arg(&[0, 0], 2), "0");
        assert_eq!(done_indices(b"0,3,x,4"), [0, 3, 4]);
    }
}
