//! What callers ask of the storage thread, and how it answers: one command per call, each with a
//! oneshot for its answer. The thread drains whatever is queued into one group.

use super::super::{Admission, SpoolError};
use crate::limiter::Nanos;
use crate::reasons::DeadLetterReason;
use tokio::sync::oneshot;

/// A record made ready for the storage thread (in the caller's task): its dedup key and encoded bytes.
pub(super) struct Prepared {
    pub key: [u8; 32],
    pub account: String,
    pub received_at_ms: i64,
    pub bytes: Vec<u8>,
}

pub(super) type Answer<T> = oneshot::Sender<Result<T, SpoolError>>;

pub(super) enum Cmd {
    Append {
        records: Vec<Prepared>,
        reply: Answer<Vec<Admission>>,
    },
    Write(Op),
    /// Finish what is queued before it, close the file, stop the thread.
    Close {
        reply: Answer<()>,
    },
    /// Stop the thread as a bug would (a panic): tests of the crash-only path.
    Crash,
    /// Hold the next transaction open, just before its commit, until the sender goes: tests that show
    /// readers never wait for a commit.
    #[cfg(test)]
    HoldNextCommit(std::sync::mpsc::Receiver<()>),
}

/// What changes the redb file directly, in the storage thread's next transaction.
pub(super) enum Op {
    Ack {
        account: String,
        ids: Vec<u64>,
        reply: Answer<()>,
    },
    DeadLetter {
        account: String,
        ids: Vec<u64>,
        reason: DeadLetterReason,
        message: String,
        reply: Answer<()>,
    },
    SaveTat {
        key: String,
        tat: Nanos,
        reply: Answer<()>,
    },
    /// Dead letters back to the queue, each with its (re-mapped, encoded) record.
    Replay {
        account: String,
        letters: Vec<(u64, Vec<u8>)>,
        reply: Answer<usize>,
    },
    DeleteDead {
        account: String,
        ids: Vec<u64>,
        reply: Answer<usize>,
    },
}

/// An answer decided inside a transaction, sent once it committed (or replaced by its error).
pub(super) enum Reply {
    Admissions(Answer<Vec<Admission>>, Result<Vec<Admission>, SpoolError>),
    Unit(Answer<()>, Result<(), SpoolError>),
    Count(Answer<usize>, Result<usize, SpoolError>),
}

impl Reply {
    /// Sends the answer, or `failed` instead when the write did not happen.
    pub fn send(self, failed: Option<&SpoolError>) {
        fn answer<T>(tx: Answer<T>, r: Result<T, SpoolError>, failed: Option<&SpoolError>) {
            let _ = tx.send(failed.map_or(r, |e| Err(e.clone())));
        }
        match self {
            Reply::Admissions(tx, r) => answer(tx, r, failed),
            Reply::Unit(tx, r) => answer(tx, r, failed),
            Reply::Count(tx, r) => answer(tx, r, failed),
        }
    }
}

impl Cmd {
    pub fn fail(self, e: &SpoolError) {
        match self {
            Cmd::Append { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::Write(op) => op.fail(e),
            Cmd::Close { reply } => {
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::Crash => {}
            #[cfg(test)]
            Cmd::HoldNextCommit(_) => {}
        }
    }
}

impl Op {
    pub fn fail(self, e: &SpoolError) {
        match self {
            Op::Replay { reply, .. } | Op::DeleteDead { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Op::Ack { reply, .. } | Op::DeadLetter { reply, .. } | Op::SaveTat { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
