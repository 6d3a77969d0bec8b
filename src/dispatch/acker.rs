//! Acks delivered batches in the background, one at a time, while the next batch goes out.
//!
//! Invariant: at most one ack is committing; a failed ack leaves its batch in the spool and is reported
//! once (`take_failed`), so the dispatcher reads the queue from its start again and resends the batch
//! (same `conversion_id`s: X's deduplication removes the repeat).

use super::AccountStatus;
use crate::metrics::Metrics;
use crate::spool::Spool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub(super) struct Acker {
    pending: Option<(tokio::task::JoinHandle<()>, usize)>,
    failed: Arc<AtomicBool>,
}

/// Where an ack's result goes.
pub(super) struct AckTarget {
    pub spool: Arc<dyn Spool>,
    pub account: String,
    pub status: Arc<Mutex<AccountStatus>>,
    pub metrics: Arc<Metrics>,
}

impl Acker {
    /// Events whose ack is committing.
    pub fn in_flight(&self) -> usize {
        self.pending.as_ref().map_or(0, |(_, n)| *n)
    }

    /// Whether an ack failed since the last call.
    pub fn take_failed(&self) -> bool {
        self.failed.swap(false, Ordering::Relaxed)
    }

    /// Waits for the ack in flight, if any.
    pub async fn finish(&mut self) {
        if let Some((task, _)) = self.pending.take() {
            let _ = task.await;
        }
    }

    /// Starts acking `ids` once the previous ack is done.
    pub async fn submit(&mut self, to: AckTarget, ids: Vec<u64>) {
        self.finish().await;
        let failed = self.failed.clone();
        let n = ids.len();
        let task = tokio::spawn(async move {
            match to.spool.ack(&to.account, &ids).await {
                Ok(()) => {
                    to.status
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .delivered += n as u64;
                    to.metrics.delivered(&to.account, n as u64);
                }
                Err(e) => {
                    tracing::error!(account = %to.account, error = %e, "cannot ack a delivered batch; it will be resent");
                    failed.store(true, Ordering::Relaxed);
                }
            }
        });
        self.pending = Some((task, n));
    }
}
