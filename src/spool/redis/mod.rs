//! The fleet's queue: every replica's accepted events in Redis streams, delivered by any replica.
//!
//! # Layout
//! Per gateway account, under one hash tag (`redis_store`): a stream `q` whose entries are packs, the
//! records one ingest request queued for the account (`pack`: the spool codec's bytes, hashes only,
//! never PII), with one consumer group, `dispatch`, in which each replica is a consumer
//! (`redis.consumer`); a hash `done` of the records already gone from packs partly delivered; a
//! stream `dead` of dead letters (one record each, with reason, X's message, when); counters of waiting
//! records, of their bytes, of dead-letter bytes and of evictions; one dedup key per `(SET id,
//! conversion_id)`, holding when it was queued, expiring after `dedup_window`.
//!
//! # Why packs
//! Redis's cost is per command and per entry: one entry per record cost about as much Redis CPU per
//! event as the whole gateway, and twice what packs cost (`pack`). The unit of hand-out between
//! replicas is therefore a request's records, not one record; each record still leaves on its own.
//!
//! # How the contract of `super` is kept
//! - **Append**: one script call per ingest request (`append.lua`) checks every record's dedup key and
//!   adds the new ones as packs, all or nothing (a script runs alone, and Redis refuses a writing
//!   script before it starts when out of memory). `Ok` only after Redis answered; with `appendfsync
//!   always` that answer comes after the fsync (`redis_store::durability`).
//! - **Ids** name a record by its pack's stream id and its place in it (`pack`): they grow per account,
//!   with time. Queued records' ids are unique only together with the account (two accounts' streams
//!   may give the same id in one millisecond). Dead letters' ids are their stream ids, chosen by the
//!   script so that their sequence number ends in the account's slot (its place among the configured
//!   accounts): unique across accounts, so the list of every account's letters pages by id without
//!   skipping one.
//! - **Peek** is a take (`take`: one pipelined round trip of stream reads, no script; a second round
//!   when the packs read held fewer records than wanted) that hands this replica first what other
//!   replicas left idle longer than `claim_idle` (a replica that died; these may be older than the
//!   cursor; looked for at most once a second per account, the scan being the take's costliest part),
//!   then its own unacknowledged packs from the cursor's, then new ones, skipping records already
//!   done; all of them are pending under this consumer until wholly acked or dead-lettered. A second
//!   peek gives the same records again: nothing is removed. With one replica this is exactly the
//!   contract's peek.
//! - **Claims stay fresh** while a batch is in hand (retried, backed off, waiting for budget): every
//!   `claim_idle / 4` a task claims this consumer's pending packs again (`refresh.lua`), so only a
//!   replica that stopped (killed, partitioned) has its packs taken over, after `claim_idle`. A clean
//!   stop hands them back at once (`release`: what is not done queued again at the end).
//! - **Ack and dead-letter** act on packs still pending in the group (every pack a peek handed out
//!   is), and on each record once (`done`), so that when two replicas act on one pack (one took it
//!   over) each record leaves once and its bytes are subtracted once. An ack of whole packs passes
//!   their sizes, remembered from the peek, so that Redis does not read packs back.
//! - **Counts** come from the scripts' answers (each answers the account's records, bytes and
//!   entries) and from a poll every `POLL` of every account (`stats.lua`), which also wakes an
//!   account's dispatcher when another replica queued for it. `backlog` is the account's whole shared
//!   queue; `held_here` the records of the packs this replica holds that are not done.
//! - **The byte bound** counts waiting records and dead letters (their encoded bytes) of every account,
//!   as last read: shared by the fleet, and checked before each write (`bound`). Redis's own
//!   `maxmemory` (with `noeviction`) is the hard limit behind it: a write it refuses is a 503.
//! - **Dead letters** are kept per account, at most `max_dead_letters` each, the oldest evicted and
//!   counted.
//!
//! # Failures
//! Redis unreachable or refusing writes: every call answers `Unavailable` with Redis's reason, `health`
//! says so (ingest answers 503, never 202), and everything resumes by itself when Redis answers again.

use super::bound::{ByteBound, Refused};
use super::codec;
use super::{
    AccountBacklog, Admission, BoundUsage, DeadLetter, DeadLetterCounts, DeadLetterQuery,
    DeadLetterStore, Entry, Peek, Queue, Record, SpoolError, SpoolStats, Undecodable,
};
use crate::reasons::DeadLetterReason;
use crate::redis_store::{stream_id_to_u64, u64_to_stream_id, Store};
use pack::PackId;

mod pack;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redis::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;

const GROUP: &str = "dispatch";
/// How often every account's shared state is read (and other replicas' appends noticed).
const POLL: Duration = Duration::from_millis(250);

struct Scripts {
    append: redis::Script,
    ack: redis::Script,
    dead_letter: redis::Script,
    replay: redis::Script,
    delete_dead: redis::Script,
    stats: redis::Script,
    refresh: redis::Script,
    release: redis::Script,
}

/// A queue script with `pack.lua`'s functions after its first (`#!lua`) line.
fn with_packs(source: &str) -> redis::Script {
    let (shebang, body) = source.split_once('\n').unwrap_or((source, ""));
    redis::Script::new(&format!("{shebang}\n{}\n{body}", include_str!("pack.lua")))
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            append: with_packs(include_str!("append.lua")),
            ack: with_packs(include_str!("ack.lua")),
            dead_letter: with_packs(include_str!("dead_letter.lua")),
            replay: with_packs(include_str!("replay.lua")),
            delete_dead: redis::Script::new(include_str!("delete_dead.lua")),
            stats: with_packs(include_str!("stats.lua")),
            refresh: redis::Script::new(include_str!("refresh.lua")),
            release: with_packs(include_str!("release.lua")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisSpoolOptions {
    /// The gateway accounts whose queues this spool serves (listing and polling go over them).
    pub accounts: Vec<String>,
    /// This replica's name in the consumer groups.
    pub consumer: String,
    pub claim_idle: Duration,
    pub dedup_window: Duration,
    pub max_bytes: u64,
    pub max_dead_letters: u64,
}

/// What was last read of one account's shared state.
#[derive(Debug, Clone, Copy, Default)]
struct Known {
    /// Waiting records.
    events: u64,
    bytes: u64,
    dead: u64,
    dead_bytes: u64,
    evicted: u64,
    /// Entries (packs) in the queue.
    packs: u64,
    /// Packs every replica together holds unacknowledged.
    held: u64,
}

impl Known {
    /// Records per pack, as last read (at least 1).
    fn records_per_pack(&self) -> u64 {
        (self.events / self.packs.max(1)).max(1)
    }
}

/// A pack this replica took and has not wholly acked or dead-lettered.
#[derive(Debug, Clone)]
struct Taken {
    /// Each record's stored size (an ack passes them, so that Redis need not read packs back).
    sizes: Vec<u64>,
    /// Per record, whether it is neither acked nor dead-lettered (here or, as last read, elsewhere).
    open: Vec<bool>,
    /// How many are.
    open_count: usize,
    at: std::time::Instant,
}

impl Taken {
    fn close(&mut self, index: usize) {
        if let Some(open) = self.open.get_mut(index) {
            if *open {
                *open = false;
                self.open_count -= 1;
            }
        }
    }
}

#[derive(Default)]
struct State {
    known: HashMap<String, Known>,
    refused: Refused,
    notifiers: HashMap<String, Arc<Notify>>,
    /// Per account, the packs this replica holds (what `held_here` counts).
    taken: HashMap<String, HashMap<PackId, Taken>>,
    /// Per account, when a take last looked for idle entries of other replicas.
    claim_checked: HashMap<String, std::time::Instant>,
}

/// Packs acked per script call at most.
const ACK_CHUNK: usize = 1000;

/// How often a take looks for other replicas' idle entries, per account.
const CLAIM_CHECK: Duration = Duration::from_secs(1);

/// Rounds of reads one peek makes at most to gather `max` records (packs differ in size).
const TAKE_ROUNDS: usize = 4;

pub struct RedisSpool {
    store: Store,
    scripts: Scripts,
    opts: RedisSpoolOptions,
    bound: ByteBound,
    state: Mutex<State>,
}

/// What one account's keys are called.
struct Keys {
    q: String,
    bytes: String,
    /// Waiting records beyond one per pack (the stream's length counts packs; see `pack.lua`).
    surplus: String,
    /// Per pack partly done, its done indices.
    done: String,
    dead: String,
    dead_bytes: String,
    evicted: String,
    tag: String,
}

fn unavailable(why: String) -> SpoolError {
    SpoolError::Unavailable(why)
}

fn int(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

fn blob(v: Option<&Value>) -> &[u8] {
    match v {
        Some(Value::BulkString(b)) => b,
        _ => &[],
    }
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

impl RedisSpool {
    /// A spool over `store`; reads every account's state once (Redis may be down: then it says so and
    /// tries again every `POLL`), then keeps it fresh and the claims of this replica alive.
    pub async fn open(store: Store, opts: RedisSpoolOptions) -> Arc<RedisSpool> {
        let spool = Arc::new(RedisSpool {
            store,
            scripts: Scripts::new(),
            bound: ByteBound::new(opts.max_bytes),
            opts,
            state: Mutex::default(),
        });
        spool.poll().await;
        let weak = Arc::downgrade(&spool);
        tokio::spawn(Self::keep_fresh(weak));
        spool
    }

    async fn keep_fresh(weak: Weak<RedisSpool>) {
        let mut since_refresh = Duration::ZERO;
        loop {
            tokio::time::sleep(POLL).await;
            let Some(spool) = weak.upgrade() else { return };
            spool.poll().await;
            since_refresh += POLL;
            if since_refresh >= spool.opts.claim_idle / 4 {
                since_refresh = Duration::ZERO;
                spool.refresh_claims().await;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keys(&self, account: &str) -> Keys {
        let tag = self.store.queue_tag(account);
        Keys {
            q: format!("{tag}:q"),
            bytes: format!("{tag}:bytes"),
            surplus: format!("{tag}:surplus"),
            done: format!("{tag}:done"),
            dead: format!("{tag}:dead"),
            dead_bytes: format!("{tag}:dead_bytes"),
            evicted: format!("{tag}:evicted"),
            tag,
        }
    }

    /// The dedup key of a record: a digest, so that no caller-chosen id appears in a key name.
    fn dedup_key(&self, tag: &str, r: &Record) -> String {
        let mut h = Sha256::new();
        h.update(r.conversion.event_id.as_bytes());
        h.update([0]);
        h.update(r.conversion.conversion_id.as_bytes());
        format!("{tag}:seen:{}", hex::encode(&h.finalize()[..16]))
    }

    /// Every account's state, read again; wakes an account whose queue grew.
    async fn poll(&self) {
        for account in self.opts.accounts.clone() {
            if let Ok((known, _)) = self.stats(&account).await {
                let grew = {
                    let mut st = self.lock();
                    let before = st.known.insert(account.clone(), known).unwrap_or_default();
                    known.packs > before.packs
                        || (known.packs > known.held && before.packs <= before.held)
                };
                if grew {
                    self.notifier(&account).notify_one();
                }
            }
        }
    }

    /// Claims this consumer's packs again (see `refresh.lua`), and forgets those it no longer holds
    /// (another replica took them over while this one stalled).
    async fn refresh_claims(&self) {
        for account in &self.opts.accounts {
            let started = std::time::Instant::now();
            let got: redis::RedisResult<Vec<String>> = self
                .scripts
                .refresh
                .key(self.keys(account).q)
                .arg(GROUP)
                .arg(&self.opts.consumer)
                .invoke_async(&mut self.store.conn())
                .await;
            let Ok(held) = self.store.track("claim refresh", got) else {
                continue;
            };
            let held: std::collections::HashSet<PackId> =
                held.iter().filter_map(|id| PackId::parse(id)).collect();
            if let Some(taken) = self.lock().taken.get_mut(account) {
                taken.retain(|id, t| t.at >= started || held.contains(id));
            }
        }
    }

    /// Runs `script` (KEYS: the queue, the done hash; ARGV: group, consumer) on every account's
    /// queue; the sum of what it answered where it succeeded.
    async fn for_this_consumer(&self, script: &redis::Script, what: &str) -> u64 {
        let mut n = 0;
        for account in &self.opts.accounts {
            let k = self.keys(account);
            let got: redis::RedisResult<u64> = script
                .key(k.q)
                .key(k.done)
                .arg(GROUP)
                .arg(&self.opts.consumer)
                .invoke_async(&mut self.store.conn())
                .await;
            n += self.store.track(what, got).unwrap_or(0);
        }
        n
    }

    /// One account's state, and its oldest waiting record's acceptance time.
    async fn stats(&self, account: &str) -> Result<(Known, Option<i64>), SpoolError> {
        let k = self.keys(account);
        let got: redis::RedisResult<Value> = self
            .scripts
            .stats
            .key(&k.q)
            .key(&k.bytes)
            .key(&k.surplus)
            .key(&k.dead)
            .key(&k.dead_bytes)
            .key(&k.evicted)
            .key(&k.done)
            .arg(GROUP)
            .invoke_async(&mut self.store.conn())
            .await;
        let v = array(self.store.track("state read", got).map_err(unavailable)?);
        let known = Known {
            events: int(v.first()),
            bytes: int(v.get(1)),
            dead: int(v.get(2)),
            dead_bytes: int(v.get(3)),
            evicted: int(v.get(4)),
            held: int(v.get(5)),
            packs: int(v.get(7)),
        };
        let oldest = match blob(v.get(6)) {
            [] => None,
            raw => codec::decode(account, raw).ok().map(|r| r.received_at_ms),
        };
        Ok((known, oldest))
    }

    fn notifier(&self, account: &str) -> Arc<Notify> {
        self.lock()
            .notifiers
            .entry(account.to_owned())
            .or_default()
            .clone()
    }

    /// Every account's bytes (waiting and dead letters), as last read.
    fn total_bytes(st: &State) -> u64 {
        st.known.values().map(|k| k.bytes + k.dead_bytes).sum()
    }

    /// Takes a write of `bytes` under the bound, or refuses it (`bound`).
    fn admit(&self, bytes: u64) -> Result<(), SpoolError> {
        let mut st = self.lock();
        let total = Self::total_bytes(&st);
        self.bound.admit(total, bytes, &mut st.refused)
    }

    fn update(&self, account: &str, f: impl FnOnce(&mut Known)) {
        let mut st = self.lock();
        f(st.known.entry(account.to_owned()).or_default());
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.opts.dedup_window.as_millis()).unwrap_or(i64::MAX)
    }

    /// On a clean stop (after the dispatchers finished): hands what this replica holds back to the
    /// shared queue, so that the other replicas deliver it now rather than after `claim_idle`. Answers
    /// how many events it handed back; what it could not (Redis down) is taken over after `claim_idle`.
    pub async fn release(&self) -> u64 {
        let n = self
            .for_this_consumer(&self.scripts.release, "release")
            .await;
        // Forget what was handed back (what was not is still this consumer's in Redis).
        self.refresh_claims().await;
        n
    }

    /// One round trip, no script (reads need no atomicity, and a script would pass every record through
    /// Lua twice): idle packs of other replicas claimed (when `idle` > 0), this consumer's own pending
    /// packs after the stream id `from`, up to `count` new ones, which join its pending packs (those
    /// beyond what one peek gives are found among them by the next), and the done indices of packs
    /// partly done.
    async fn take(
        &self,
        k: &Keys,
        from: &str,
        count: usize,
        idle: u64,
    ) -> redis::RedisResult<Vec<Value>> {
        let consumer = &self.opts.consumer;
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&k.done);
        if idle > 0 {
            pipe.cmd("XAUTOCLAIM")
                .arg(&k.q)
                .arg(GROUP)
                .arg(consumer)
                .arg(idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(count);
        }
        for from in [from, ">"] {
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(&k.q)
                .arg(from);
        }
        pipe.query_async(&mut self.store.conn()).await
    }

    /// The consumer group of a queue (Redis lost it, or the queue is new).
    async fn create_group(&self, q: &str) -> Result<(), SpoolError> {
        let got: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(q)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.store.conn())
            .await;
        match got {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => self.store.track("group create", other).map_err(unavailable),
        }
    }

    /// The account's place among the configured accounts (sorted, so the same on every replica of one
    /// configuration): the low bits of its dead letters' ids, which keeps them apart from other accounts'.
    fn slot(&self, account: &str) -> u64 {
        let mut names: Vec<&String> = self.opts.accounts.iter().collect();
        names.sort();
        names
            .iter()
            .position(|a| *a == account)
            .map_or(1023, |i| (i % 1024) as u64)
    }

    /// Whether this take should look for entries other replicas left idle (and note that it did).
    fn claim_check_due(&self, account: &str) -> bool {
        let now = std::time::Instant::now();
        let mut st = self.lock();
        match st.claim_checked.get(account) {
            Some(at) if now.duration_since(*at) < CLAIM_CHECK => false,
            _ => {
                st.claim_checked.insert(account.to_owned(), now);
                true
            }
        }
    }

    /// What this replica holds unacknowledged, per account (the admin API and metrics show it).
    pub fn held_here(&self, account: &str) -> u64 {
        self.lock()
            .taken
            .get(account)
            .map_or(0, |t| t.values().map(|t| t.open_count as u64).sum())
    }

    /// Whether Redis answered the last command.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// A pack as a stream read answers it: its `r` and `l` fields (`None` for an entry deleted while
/// pending).
type PackFields<'a> = Option<(&'a [u8], Option<&'a [u8]>)>;

/// The entries of an XREADGROUP or XAUTOCLAIM answer: each id and its fields.
fn stream_entries(reply: &Value) -> Vec<(&[u8], PackFields<'_>)> {
    let entries: &[Value] = match reply {
        // XREADGROUP: [[stream, entries]] (or nil when there is nothing).
        Value::Array(streams) if matches!(streams.first(), Some(Value::Array(_))) => {
            match streams.first() {
                Some(Value::Array(stream)) => match stream.get(1) {
                    Some(Value::Array(e)) => e,
                    _ => &[],
                },
                _ => &[],
            }
        }
        // XAUTOCLAIM: [cursor, entries, deleted ids].
        Value::Array(parts) => match parts.get(1) {
            Some(Value::Array(e)) => e,
            _ => &[],
        },
        _ => &[],
    };
    entries
        .iter()
        .filter_map(|e| match e {
            Value::Array(kv) => {
                let id = match kv.first() {
                    Some(Value::BulkString(id)) => id.as_slice(),
                    _ => return None,
                };
                let fields = match kv.get(1) {
                    Some(Value::Array(fields)) => {
                        let field = |name: &[u8]| {
                            fields.chunks(2).find_map(|f| match f {
                                [Value::BulkString(k), Value::BulkString(v)] if k == name => {
                                    Some(v.as_slice())
                                }
                                _ => None,
                            })
                        };
                        Some((field(b"r").unwrap_or_default(), field(b"l")))
                    }
                    _ => None,
                };
                Some((id, fields))
            }
            _ => None,
        })
        .collect()
}

fn cannot_use(id: &[u8]) -> SpoolError {
    SpoolError::Unavailable(format!(
        "Redis answered a stream id this gateway cannot use: {}",
        String::from_utf8_lossy(id)
    ))
}

/// A dead letter's id (dead letters are one record each, named by their stream id).
fn parse_id(id: &[u8]) -> Result<u64, SpoolError> {
    std::str::from_utf8(id)
        .ok()
        .and_then(stream_id_to_u64)
        .ok_or_else(|| cannot_use(id))
}

fn parse_pack(id: &[u8]) -> Result<PackId, SpoolError> {
    std::str::from_utf8(id)
        .ok()
        .and_then(PackId::parse)
        .ok_or_else(|| cannot_use(id))
}

/// The `done` hash as HGETALL answers it: per pack partly done, its done indices.
fn done_of(reply: Option<&Value>) -> HashMap<PackId, Vec<usize>> {
    let mut done = HashMap::new();
    if let Some(Value::Array(kv)) = reply {
        for pair in kv.chunks(2) {
            if let [Value::BulkString(id), Value::BulkString(list)] = pair {
                if let Ok(id) = parse_pack(id) {
                    done.insert(id, pack::done_indices(list));
                }
            }
        }
    }
    done
}

/// Record ids grouped by pack, in order.
fn by_pack(ids: &[u64]) -> Vec<(PackId, Vec<usize>)> {
    let mut packs = std::collections::BTreeMap::<PackId, Vec<usize>>::new();
    for id in ids {
        let (pack, index) = PackId::of(*id);
        packs.entry(pack).or_default().push(index);
    }
    packs.into_iter().collect()
}

impl RedisSpool {
    /// Where a take's read of this consumer's own packs starts for a cursor: at the cursor's pack,
    /// unless the cursor is its last record.
    fn history_start(&self, account: &str, cursor: u64) -> String {
        if cursor == 0 {
            return "0-0".to_owned();
        }
        let (pack, index) = PackId::of(cursor);
        let whole = self
            .lock()
            .taken
            .get(account)
            .and_then(|t| t.get(&pack))
            .is_some_and(|t| t.sizes.len() == index + 1);
        if whole {
            pack.stream_id()
        } else {
            pack.before()
        }
    }

    /// One round of a peek: up to `need` records with ids above `cursor`, and whether more may wait.
    async fn take_round(
        &self,
        account: &str,
        k: &Keys,
        cursor: u64,
        need: usize,
        idle: u64,
        peek: &mut Peek,
    ) -> Result<bool, SpoolError> {
        let per_pack = self
            .lock()
            .known
            .get(account)
            .map_or(1, Known::records_per_pack);
        let per_pack = usize::try_from(per_pack).unwrap_or(usize::MAX);
        // As many packs as should hold `need` records: packs larger than the average hand this replica
        // more than it needs (its own to deliver next), smaller ones are made up by another round.
        let count = need.div_ceil(per_pack).max(1);
        let from = self.history_start(account, cursor);
        let replies = match self.take(k, &from, count, idle).await {
            // A pipeline's error carries the failing command's code in its text.
            Err(e) if e.to_string().contains("NOGROUP") => {
                self.create_group(&k.q).await?;
                self.take(k, &from, count, idle).await
            }
            other => other,
        };
        let replies = self
            .store
            .track("queue read", replies)
            .map_err(unavailable)?;
        let done = done_of(replies.first());
        let mut more = false;
        // In order: taken over (if looked for), own after the cursor, new; each pack once.
        let mut packs = std::collections::BTreeMap::new();
        let mut deleted = Vec::new();
        for reply in replies.iter().skip(1) {
            let entries = stream_entries(reply);
            more |= entries.len() >= count;
            for (id, fields) in entries {
                let id = parse_pack(id)?;
                match fields {
                    Some(f) => {
                        packs.entry(id).or_insert(f);
                    }
                    None => deleted.push(id),
                }
            }
        }
        if !deleted.is_empty() {
            // Packs deleted while pending (a race with another replica's ack): let them go.
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&k.q).arg(GROUP);
            for id in deleted {
                cmd.arg(id.stream_id());
            }
            let acked: redis::RedisResult<u64> = cmd.query_async(&mut self.store.conn()).await;
            let _ = self.store.track("ack of deleted entries", acked);
        }
        let mut records: Vec<(u64, &[u8])> = Vec::new();
        {
            let now = std::time::Instant::now();
            let mut st = self.lock();
            let taken = st.taken.entry(account.to_owned()).or_default();
            for (id, (bytes, lengths)) in &packs {
                let parts = pack::split(bytes, *lengths);
                let t = taken.entry(*id).or_insert_with(|| Taken {
                    sizes: parts.iter().map(|p| p.len() as u64).collect(),
                    open: vec![true; parts.len()],
                    open_count: parts.len(),
                    at: now,
                });
                t.at = now;
                for i in done.get(id).map(Vec::as_slice).unwrap_or_default() {
                    t.close(*i);
                }
                for (i, part) in parts.iter().enumerate() {
                    if !t.open.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    let rid = id
                        .record(i)
                        .ok_or_else(|| cannot_use(id.stream_id().as_bytes()))?;
                    if rid > cursor {
                        records.push((rid, part));
                    }
                }
            }
        }
        records.sort_by_key(|(id, _)| *id);
        more |= records.len() > need;
        records.truncate(need);
        for (id, raw) in records {
            match codec::decode(account, raw) {
                Ok(record) => peek.entries.push(Entry { id, record }),
                Err(error) => peek.undecodable.push(Undecodable {
                    id,
                    raw_bytes: raw.len() as u64,
                    error,
                }),
            }
        }
        Ok(more)
    }

    /// Forgets records of packs this replica took, once acked or dead-lettered.
    fn close(&self, account: &str, packs: &[(PackId, Vec<usize>)]) {
        let mut st = self.lock();
        if let Some(taken) = st.taken.get_mut(account) {
            for (id, indices) in packs {
                if let Some(t) = taken.get_mut(id) {
                    for i in indices {
                        t.close(*i);
                    }
                    if t.open_count == 0 {
                        taken.remove(id);
                    }
                }
            }
        }
    }
}

impl Queue for RedisSpool {
    fn append(&self, records: Vec<Record>) -> BoxFuture<'_, Result<Vec<Admission>, SpoolError>> {
        async move {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            // Per account touched, in order of first appearance, its records' places in the request.
            let mut accounts: Vec<(String, Vec<usize>)> = Vec::new();
            let mut encoded = Vec::with_capacity(records.len());
            for (place, r) in records.iter().enumerate() {
                match accounts.iter_mut().find(|(a, _)| *a == r.account) {
                    Some((_, places)) => places.push(place),
                    None => accounts.push((r.account.clone(), vec![place])),
                }
                encoded.push(codec::encode(r).map_err(unavailable)?);
            }
            let need: u64 = encoded.iter().map(|b| b.len() as u64).sum();
            self.admit(need)?;
            let mut call = self.scripts.append.prepare_invoke();
            for (a, _) in &accounts {
                let k = self.keys(a);
                call.key(k.q).key(k.bytes).key(k.surplus);
            }
            // Packs in account order; the dedup keys and received_at times in the same order.
            let packs: Vec<(usize, &[usize])> = accounts
                .iter()
                .enumerate()
                .flat_map(|(i, (_, places))| places.chunks(pack::MAX_RECORDS).map(move |c| (i, c)))
                .collect();
            let order: Vec<usize> = packs.iter().flat_map(|(_, c)| c.iter().copied()).collect();
            for &place in &order {
                let r = &records[place];
                call.key(self.dedup_key(&self.keys(&r.account).tag, r));
            }
            call.arg(self.window_ms())
                .arg(accounts.len())
                .arg(packs.len());
            for (i, places) in &packs {
                let (bytes, lengths) = pack::encode(places.iter().map(|p| encoded[*p].as_slice()));
                call.arg(i + 1).arg(places.len()).arg(lengths).arg(bytes);
            }
            for &place in &order {
                call.arg(records[place].received_at_ms);
            }
            let got: redis::RedisResult<Value> = call.invoke_async(&mut self.store.conn()).await;
            let v = array(self.store.track("queue write", got).map_err(unavailable)?);
            for (i, (a, _)) in accounts.iter().enumerate() {
                let (events, bytes, packs) = (
                    int(v.get(3 * i)),
                    int(v.get(3 * i + 1)),
                    int(v.get(3 * i + 2)),
                );
                self.update(a, |k| {
                    k.events = events;
                    k.bytes = bytes;
                    k.packs = packs;
                });
            }
            let answers = v.get(3 * accounts.len()..).unwrap_or_default();
            let mut admissions = vec![Admission::Duplicate; records.len()];
            for (place, answer) in order.iter().zip(answers) {
                if matches!(answer, Value::Int(1)) {
                    admissions[*place] = Admission::Queued;
                }
            }
            for (a, _) in &accounts {
                self.notifier(a).notify_one();
            }
            Ok(admissions)
        }
        .boxed()
    }

    fn peek_after<'a>(
        &'a self,
        account: &'a str,
        after: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Peek, SpoolError>> {
        async move {
            let k = self.keys(account);
            // Idle packs are looked for at most once a `CLAIM_CHECK` per account: the scan of the
            // group's pending entries is the take's costliest part, and a takeover needs no more.
            let mut idle = if self.claim_check_due(account) {
                u64::try_from(self.opts.claim_idle.as_millis()).unwrap_or(u64::MAX)
            } else {
                0
            };
            let mut peek = Peek::default();
            let mut cursor = after;
            for _ in 0..TAKE_ROUNDS {
                let got = peek.entries.len() + peek.undecodable.len();
                if got >= max {
                    break;
                }
                let more = self
                    .take_round(account, &k, cursor, max - got, idle, &mut peek)
                    .await?;
                idle = 0;
                match peek.last_id() {
                    Some(last) if more && last > cursor => cursor = last,
                    _ => break,
                }
            }
            Ok(peek)
        }
        .boxed()
    }

    fn ack<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        async move {
            if ids.is_empty() {
                return Ok(());
            }
            let k = self.keys(account);
            let packs = by_pack(ids);
            // Lua passes at most a few thousand values to one command.
            for chunk in packs.chunks(ACK_CHUNK) {
                let mut call = self.scripts.ack.key(&k.q);
                call.key(&k.bytes)
                    .key(&k.surplus)
                    .key(&k.done)
                    .arg(GROUP)
                    .arg(&self.opts.consumer);
                {
                    let st = self.lock();
                    let taken = st.taken.get(account);
                    for (id, indices) in chunk {
                        let t = taken.and_then(|t| t.get(id));
                        let n = t.map_or(-1, |t| t.sizes.len() as i64);
                        let size = t
                            .and_then(|t| {
                                indices.iter().map(|i| t.sizes.get(*i)).sum::<Option<u64>>()
                            })
                            .map_or(-1, |s| s as i64);
                        let which = pack::indices_arg(indices, usize::try_from(n).unwrap_or(0));
                        call.arg(id.stream_id()).arg(n).arg(which).arg(size);
                    }
                }
                let got: redis::RedisResult<(u64, u64, u64)> =
                    call.invoke_async(&mut self.store.conn()).await;
                let (events, bytes, packs) = self.store.track("ack", got).map_err(unavailable)?;
                self.update(account, |k| {
                    k.events = events;
                    k.bytes = bytes;
                    k.packs = packs;
                });
                self.close(account, chunk);
            }
            Ok(())
        }
        .boxed()
    }

    fn backlog(&self, account: &str) -> usize {
        self.lock()
            .known
            .get(account)
            .map_or(0, |k| usize::try_from(k.events).unwrap_or(usize::MAX))
    }

    fn changed(&self, account: &str) -> Arc<Notify> {
        self.notifier(account)
    }
}

/// A dead letter as `dead_letter.lua` stores it: fields `r`, `reason`, `message`, `at`, `from`.
fn dead_letter_of(account: &str, id: u64, fields: &[Value]) -> Option<DeadLetter> {
    let mut field = HashMap::new();
    for kv in fields.chunks(2) {
        if let [Value::BulkString(k), Value::BulkString(v)] = kv {
            field.insert(k.as_slice(), v.as_slice());
        }
    }
    let text = |name: &str| {
        field
            .get(name.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let raw = field.get(b"r".as_slice()).copied().unwrap_or_default();
    let reason = DeadLetterReason::from_label(&text("reason")?)?;
    let at = text("at").and_then(|t| t.parse().ok()).unwrap_or(0);
    let decoded = codec::decode(account, raw).ok();
    Some(DeadLetter {
        id,
        account: account.to_owned(),
        reason,
        message: text("message").unwrap_or_default(),
        dead_lettered_at_ms: at,
        received_at_ms: decoded.as_ref().map_or(0, |r| r.received_at_ms),
        event_name: decoded.as_ref().and_then(|r| r.event_name.clone()),
        raw_bytes: decoded.is_none().then_some(raw.len() as u64),
        conversion: decoded.map(|r| r.conversion),
    })
}

impl RedisSpool {
    /// Up to `limit` dead letters of `account` with ids above `after`, oldest first.
    async fn dead_letters_of(
        &self,
        account: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, SpoolError> {
        let k = self.keys(account);
        let got: redis::RedisResult<Value> = redis::cmd("XRANGE")
            .arg(&k.dead)
            .arg(format!("({}", u64_to_stream_id(after)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut self.store.conn())
            .await;
        let entries = array(
            self.store
                .track("dead letters read", got)
                .map_err(unavailable)?,
        );
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let e = array(e);
            let id = parse_id(blob(e.first()))?;
            let fields = match e.get(1) {
                Some(Value::Array(f)) => f.as_slice(),
                _ => &[],
            };
            // A letter this gateway cannot read back (a newer version's reason) is shown as corrupt.
            out.push(
                dead_letter_of(account, id, fields).unwrap_or_else(|| DeadLetter {
                    id,
                    account: account.to_owned(),
                    reason: DeadLetterReason::Corrupt,
                    message: "this dead letter's fields could not be read".into(),
                    dead_lettered_at_ms: 0,
                    conversion: None,
                    received_at_ms: 0,
                    event_name: None,
                    raw_bytes: None,
                }),
            );
        }
        Ok(out)
    }
}

impl DeadLetterStore for RedisSpool {
    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        async move {
            if ids.is_empty() {
                return Ok(());
            }
            let k = self.keys(account);
            let now_ms = chrono::Utc::now().timestamp_millis();
            let packs = by_pack(ids);
            let mut call = self.scripts.dead_letter.key(&k.q);
            call.key(&k.bytes)
                .key(&k.surplus)
                .key(&k.done)
                .key(&k.dead)
                .key(&k.dead_bytes)
                .key(&k.evicted)
                .arg(GROUP)
                .arg(&self.opts.consumer)
                .arg(self.opts.max_dead_letters)
                .arg(reason.to_string())
                .arg(message)
                .arg(now_ms)
                .arg(self.slot(account));
            {
                let st = self.lock();
                let taken = st.taken.get(account);
                for (id, indices) in &packs {
                    let n = taken.and_then(|t| t.get(id)).map_or(0, |t| t.sizes.len());
                    call.arg(id.stream_id()).arg(pack::indices_arg(indices, n));
                }
            }
            let got: redis::RedisResult<(u64, u64, u64, u64, u64, u64)> =
                call.invoke_async(&mut self.store.conn()).await;
            let (events, bytes, dead, dead_bytes, evicted, packs_left) =
                self.store.track("dead-letter", got).map_err(unavailable)?;
            self.update(account, |k| {
                *k = Known {
                    events,
                    bytes,
                    dead,
                    dead_bytes,
                    evicted,
                    packs: packs_left,
                    ..*k
                }
            });
            self.close(account, &packs);
            Ok(())
        }
        .boxed()
    }

    fn dead_letters(
        &self,
        q: DeadLetterQuery,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, SpoolError>> {
        async move {
            let accounts = match &q.account {
                Some(a) => vec![a.clone()],
                None => self.opts.accounts.clone(),
            };
            let mut all = Vec::new();
            for a in &accounts {
                all.extend(self.dead_letters_of(a, q.after, q.limit).await?);
            }
            all.sort_by(|x, y| (x.id, &x.account).cmp(&(y.id, &y.account)));
            all.truncate(q.limit);
            Ok(all)
        }
        .boxed()
    }

    fn dead_letter_counts(&self) -> BoxFuture<'_, Result<DeadLetterCounts, SpoolError>> {
        async move {
            let mut counts = DeadLetterCounts::default();
            for a in &self.opts.accounts {
                let (known, _) = self.stats(a).await?;
                self.update(a, |k| *k = known);
                counts.kept += known.dead;
                counts.evicted += known.evicted;
            }
            Ok(counts)
        }
        .boxed()
    }

    fn replay<'a>(
        &'a self,
        account: &'a str,
        letters: Vec<(u64, Record)>,
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        async move {
            if letters.is_empty() {
                return Ok(0);
            }
            let mut encoded = Vec::with_capacity(letters.len());
            for (id, r) in &letters {
                encoded.push((*id, codec::encode(r).map_err(unavailable)?));
            }
            self.admit(encoded.iter().map(|(_, b)| b.len() as u64).sum())?;
            let k = self.keys(account);
            let mut call = self.scripts.replay.key(&k.q);
            call.key(&k.bytes)
                .key(&k.surplus)
                .key(&k.dead)
                .key(&k.dead_bytes);
            for (id, bytes) in &encoded {
                call.arg(u64_to_stream_id(*id)).arg(bytes.as_slice());
            }
            let got: redis::RedisResult<(usize, u64, u64, u64, u64, u64)> =
                call.invoke_async(&mut self.store.conn()).await;
            let (moved, events, bytes, dead, dead_bytes, packs) =
                self.store.track("replay", got).map_err(unavailable)?;
            self.update(account, |k| {
                *k = Known {
                    events,
                    bytes,
                    dead,
                    dead_bytes,
                    packs,
                    ..*k
                }
            });
            if moved > 0 {
                self.notifier(account).notify_one();
            }
            Ok(moved)
        }
        .boxed()
    }

    fn delete_dead_letters<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        async move {
            if ids.is_empty() {
                return Ok(0);
            }
            let k = self.keys(account);
            let mut call = self.scripts.delete_dead.key(&k.dead);
            call.key(&k.dead_bytes);
            for id in ids {
                call.arg(u64_to_stream_id(*id));
            }
            let got: redis::RedisResult<(usize, u64, u64)> =
                call.invoke_async(&mut self.store.conn()).await;
            let (n, dead, dead_bytes) = self
                .store
                .track("dead letters delete", got)
                .map_err(unavailable)?;
            self.update(account, |k| {
                k.dead = dead;
                k.dead_bytes = dead_bytes;
            });
            Ok(n)
        }
        .boxed()
    }
}

impl SpoolStats for RedisSpool {
    fn account_backlog<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<AccountBacklog, SpoolError>> {
        async move {
            let (known, oldest_ms) = self.stats(account).await?;
            self.update(account, |k| *k = known);
            Ok(AccountBacklog {
                events: known.events,
                bytes: known.bytes,
                oldest_ms,
            })
        }
        .boxed()
    }

    fn bytes(&self) -> u64 {
        self.lock().known.values().map(|k| k.bytes).sum()
    }

    fn account_bytes(&self, account: &str) -> u64 {
        self.lock().known.get(account).map_or(0, |k| k.bytes)
    }

    fn bound_usage(&self) -> BoundUsage {
        BoundUsage {
            used_bytes: Self::total_bytes(&self.lock()),
            max_bytes: self.bound.max_bytes(),
        }
    }

    fn health(&self) -> Result<(), String> {
        if let Some(why) = self.store.down_because() {
            return Err(format!(
                "{why} (events are queued in Redis; none is accepted while it cannot be reached)"
            ));
        }
        let mut st = self.lock();
        let total = Self::total_bytes(&st);
        match self.bound.refusal(total, &mut st.refused) {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
