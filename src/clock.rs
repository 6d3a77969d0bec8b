//! Wall-clock time, injected where it decides something (budget, X's holds, event age), so that a test
//! can run it on tokio's paused clock and see hours of backoff in milliseconds.
//!
//! Sleeping is always done with `tokio::time`; `Clock` only answers "what time is it since the epoch".
//! `TokioClock` moves with tokio's clock, so under `tokio::time::pause` both agree exactly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Time since the Unix epoch.
    fn epoch(&self) -> Duration;

    /// Nanoseconds since the Unix epoch (the limiter's unit).
    fn epoch_nanos(&self) -> u64 {
        self.epoch().as_nanos().min(u64::MAX as u128) as u64
    }
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn epoch(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A wall clock that starts at `origin` and advances with `tokio::time` (paused and auto-advanced in tests).
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: Duration,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(origin: Duration) -> Self {
        TokioClock {
            origin,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn epoch(&self) -> Duration {
        self.origin + self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = TokioClock::starting_at(Duration::from_secs(1_000));
        assert_eq!(c.epoch(), Duration::from_secs(1_000));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(c.epoch(), Duration::from_secs(4_600));
        assert_eq!(c.epoch_nanos(), 4_600_000_000_000);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.epoch() > Duration::from_secs(1_577_836_800));
    }
}
