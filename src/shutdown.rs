//! The one shutdown signal of the process.
//!
//! `Shutdown::new()` gives the trigger (kept by whoever decides to stop: the signal handler, or a part
//! that can no longer keep its promises) and a `Shutdown` handle, cloned into everything that must stop:
//! ingest (answers 503 from then on), readiness, the HTTP servers (graceful), the dispatchers. Invariant:
//! once triggered it stays triggered, and every handle sees it, including handles cloned afterwards.

use tokio::sync::watch;

/// Decides the shutdown. Dropping it without triggering leaves the handles waiting forever.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Tells whether shutdown began, and waits for it.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Shutdown(rx))
    }

    /// A handle that never fires (tests, tools).
    pub fn never() -> Shutdown {
        // With its trigger gone the channel is closed, which `wait` takes as "never".
        let (_, rx) = watch::channel(false);
        Shutdown(rx)
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown began (never, when the trigger was dropped without firing).
    pub async fn wait(mut self) {
        self.wait_ref().await
    }

    /// Like `wait`, without consuming the handle (for `select!` in a loop).
    pub async fn wait_ref(&mut self) {
        if self.0.wait_for(|set| *set).await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Another handle on the same signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn every_handle_sees_it_even_those_cloned_later() {
        let (trigger, handle) = Shutdown::new();
        let early = handle.clone();
        assert!(!early.is_set());
        let waiter = tokio::spawn(early.clone().wait());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        trigger.fire();
        waiter.await.unwrap();
        assert!(early.is_set() && handle.is_set() && trigger.subscribe().is_set());
        // Waiting after the fact returns at once.
        tokio::time::timeout(Duration::from_millis(1), handle.clone().wait())
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn never_never_fires() {
        let h = Shutdown::never();
        assert!(!h.is_set());
        assert!(tokio::time::timeout(Duration::from_secs(3600), h.wait())
            .await
            .is_err());
    }
}
