//! What an upstream outcome means for the batch that produced it. Pure: no I/O, no clock.
//!
//! Like Vector's `RetryLogic`: this decides, the dispatcher acts.

use crate::reasons::{DeadLetterReason, PauseReason};
use crate::upstream::Outcome;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// X took the batch. `hold_until` (epoch seconds) when the headers say the budget is spent.
    Ack {
        debug_id: Option<String>,
        hold_until: Option<u64>,
    },
    /// X refused the batch because of some of its conversions: send each half on its own.
    Split,
    /// X refused this single conversion for good.
    DeadLetter {
        reason: DeadLetterReason,
        message: String,
    },
    /// A configuration fault (credentials, access, pixel): keep the events, probe again later.
    Pause {
        reason: PauseReason,
        message: String,
    },
    /// Over X's rate limit: send nothing before `until` (epoch seconds).
    WaitUntil { until: u64, message: String },
    /// A transient fault: try the same batch again after a backoff.
    Backoff { message: String },
}

impl Action {
    /// A fixed label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Action::Ack { .. } => "ack",
            Action::Split => "split",
            Action::DeadLetter { .. } => "dead_letter",
            Action::Pause { .. } => "pause",
            Action::WaitUntil { .. } => "wait_until",
            Action::Backoff { .. } => "backoff",
        }
    }
}

/// How long to hold after a 429 that names no reset time.
pub const DEFAULT_RATE_LIMIT_WAIT_SECS: u64 = 60;

fn names_event_id(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Refused { errors, .. } => errors.iter().any(|e| {
            e.parameter.as_deref() == Some("event_id") || e.message.starts_with("event_id (")
        }),
        _ => false,
    }
}

/// Decides what to do with a batch of `batch_len` conversions after `outcome`, at `now` (epoch seconds).
pub fn decide(outcome: &Outcome, batch_len: usize, now: u64) -> Action {
    let message = outcome.message();
    let isolate = |reason: DeadLetterReason| {
        if batch_len > 1 {
            Action::Split
        } else {
            Action::DeadLetter {
                reason,
                message: message.clone(),
            }
        }
    };
    match outcome {
        Outcome::Accepted {
            debug_id,
            rate_limit,
            ..
        } => Action::Ack {
            debug_id: debug_id.clone(),
            hold_until: rate_limit
                .exhausted()
                .then(|| rate_limit.latest_reset())
                .flatten()
                .filter(|t| *t > now),
        },
        Outcome::Refused {
            status: 429,
            rate_limit,
            ..
        } => {
            let from_reset = rate_limit.latest_reset();
            let from_retry_after = rate_limit.retry_after.map(|d| now + d.as_secs().max(1));
            let until = from_reset
                .into_iter()
                .chain(from_retry_after)
                .max()
                .unwrap_or(now + DEFAULT_RATE_LIMIT_WAIT_SECS);
            Action::WaitUntil {
                until: until.max(now + 1),
                message,
            }
        }
        Outcome::Refused { status: 400, .. } => isolate(DeadLetterReason::Rejected),
        // Too large: halves until the event is alone, never a backoff (the same body fails the same way).
        Outcome::Refused { status: 413, .. } | Outcome::BodyNotSent { .. } => {
            isolate(DeadLetterReason::TooLarge)
        }
        Outcome::Refused { status: 404, .. } if names_event_id(outcome) => {
            isolate(DeadLetterReason::NotFound)
        }
        Outcome::Refused { status: 401, .. } => Action::Pause {
            reason: PauseReason::Unauthorized,
            message,
        },
        Outcome::Refused { status: 403, .. } => Action::Pause {
            reason: PauseReason::Forbidden,
            message,
        },
        Outcome::Refused { status: 404, .. } => Action::Pause {
            reason: PauseReason::NotFound,
            message,
        },
        Outcome::Refused { .. } | Outcome::Timeout | Outcome::Transport { .. } => {
            Action::Backoff { message }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{RateLimitInfo, XError};
    use proptest::prelude::*;
    use std::time::Duration;

    fn refused(status: u16, errors: Vec<XError>, rate_limit: RateLimitInfo) -> Outcome {
        Outcome::Refused {
            status,
            errors,
            rate_limit,
            body_excerpt: None,
        }
    }

    fn x(message: &str, parameter: &str) -> XError {
        XError {
            code: "INVALID_PARAMETER".into(),
            message: message.into(),
            parameter: Some(parameter.into()),
        }
    }

    #[test]
    fn table_of_statuses() {
        let none = RateLimitInfo::default;
        let bad = x(
            "hashed_email (abc) is not a valid SHA-256 hash",
            "hashed_email",
        );
        assert_eq!(
            decide(&refused(400, vec![bad.clone()], none()), 500, 0),
            Action::Split
        );
        assert_eq!(
            decide(&refused(400, vec![bad], none()), 1, 0),
            Action::DeadLetter {
                reason: DeadLetterReason::Rejected,
                message: "hashed_email (abc) is not a valid SHA-256 hash".into()
            }
        );
        let not_mine = x(
            "event_id (abc) does not belong to provided account",
            "event_id",
        );
        assert_eq!(
            decide(&refused(404, vec![not_mine.clone()], none()), 2, 0),
            Action::Split
        );
        assert!(matches!(
            decide(&refused(404, vec![not_mine], none()), 1, 0),
            Action::DeadLetter {
                reason: DeadLetterReason::NotFound,
                ..
            }
        ));
        assert!(matches!(
            decide(&refused(404, vec![], none()), 10, 0),
            Action::Pause {
                reason: PauseReason::NotFound,
                ..
            }
        ));
        assert!(matches!(
            decide(&refused(401, vec![], none()), 10, 0),
            Action::Pause {
                reason: PauseReason::Unauthorized,
                ..
            }
        ));
        assert!(matches!(
            decide(&refused(403, vec![], none()), 10, 0),
            Action::Pause {
                reason: PauseReason::Forbidden,
                ..
            }
        ));
        for s in [408, 423, 500, 502, 503, 504] {
            assert!(
                matches!(
                    decide(&refused(s, vec![], none()), 10, 0),
                    Action::Backoff { .. }
                ),
                "{s}"
            );
        }
        assert!(matches!(
            decide(&Outcome::Timeout, 10, 0),
            Action::Backoff { .. }
        ));
        assert!(matches!(
            decide(
                &Outcome::Transport {
                    message: "refused".into()
                },
                10,
                0
            ),
            Action::Backoff { .. }
        ));
    }

    #[test]
    fn too_large_is_split_then_dead_lettered_never_backed_off() {
        let none = RateLimitInfo::default;
        let cut = Outcome::BodyNotSent {
            bytes: 3 << 20,
            message: "broken pipe".into(),
        };
        for o in [refused(413, vec![], none()), cut] {
            assert_eq!(decide(&o, 120, 0), Action::Split, "{o:?}");
            assert!(matches!(
                decide(&o, 1, 0),
                Action::DeadLetter {
                    reason: DeadLetterReason::TooLarge,
                    ..
                }
            ));
        }
    }

    #[test]
    fn rate_limits() {
        let h = RateLimitInfo {
            remaining: Some(0),
            reset: Some(1_000),
            account_reset: Some(1_060),
            ..Default::default()
        };
        assert_eq!(
            decide(&refused(429, vec![], h.clone()), 5, 900).clone(),
            Action::WaitUntil {
                until: 1_060,
                message: "HTTP 429 without a body".into()
            }
        );
        let ra = RateLimitInfo {
            retry_after: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        assert!(matches!(
            decide(&refused(429, vec![], ra), 5, 900),
            Action::WaitUntil { until: 930, .. }
        ));
        assert!(matches!(
            decide(&refused(429, vec![], RateLimitInfo::default()), 5, 900),
            Action::WaitUntil { until: 960, .. }
        ));
        let ok = Outcome::Accepted {
            status: 200,
            conversions_processed: Some(5),
            debug_id: Some("d".into()),
            rate_limit: h,
        };
        assert_eq!(
            decide(&ok, 5, 900),
            Action::Ack {
                debug_id: Some("d".into()),
                hold_until: Some(1_060)
            }
        );
    }

    proptest! {
        /// A single conversion is never split, a batch refused for its content is never dead-lettered whole,
        /// and nothing but a 2xx acks.
        #[test]
        fn invariants(status in 100u16..600, len in 1usize..=500, now in 0u64..2_000_000_000) {
            let o = if (200..300).contains(&status) {
                Outcome::Accepted { status, conversions_processed: None, debug_id: None, rate_limit: RateLimitInfo::default() }
            } else {
                refused(status, vec![], RateLimitInfo::default())
            };
            let a = decide(&o, len, now);
            prop_assert_eq!(matches!(a, Action::Ack { .. }), (200..300).contains(&status));
            if len == 1 { prop_assert!(a != Action::Split); }
            if len > 1 {
                let dead = matches!(a, Action::DeadLetter { .. });
                prop_assert!(!dead);
            }
            if let Action::WaitUntil { until, .. } = a { prop_assert!(until > now); }
        }
    }
}
