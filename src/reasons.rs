//! The fixed vocabularies the gateway reports in: why an event was dead-lettered, why an account is
//! paused, what ingest decided for an event.
//!
//! Each is an enum with `ALL` (every value, in a fixed order) and `as_str()` (its label in metrics, logs,
//! the admin API and stored dead letters). Metrics create their series by iterating `ALL`, so a new value
//! cannot be forgotten there; labels never come from anything a client or X sent.

use serde::{Deserialize, Serialize};

macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $label)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }

            /// The value whose label is `label` (as stored), if any.
            pub fn from_label(label: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == label)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// Why an event left its queue for the dead letters.
    DeadLetterReason {
        /// X refused this conversion alone (400, or 413 for a single one).
        Rejected => "rejected",
        /// X said the event's SET id is unknown or not the account's (404 naming `event_id`).
        NotFound => "not_found",
        /// Not delivered within `delivery.max_event_age`.
        Expired => "expired",
        /// The stored record no longer decodes; what could be read is kept with it.
        Corrupt => "corrupt",
        /// X refused the conversion alone as too large (413, or the connection closed under its body).
        TooLarge => "too_large",
    }
}

vocabulary! {
    /// Why an account's sending is paused (its events are kept; it probes with a long backoff).
    PauseReason {
        /// 401: the credentials are wrong.
        Unauthorized => "unauthorized",
        /// 403: the credentials lack access to the ad account.
        Forbidden => "forbidden",
        /// 404 of the route or the pixel.
        NotFound => "not_found",
    }
}

vocabulary! {
    /// What ingest decided for one event.
    IngestOutcome {
        /// Spooled; it will be delivered.
        Accepted => "accepted",
        /// Seen within the dedup window; not queued again.
        Duplicate => "duplicate",
        /// The user did not consent; dropped without error.
        Suppressed => "suppressed",
        /// Refused at the door with field errors.
        Rejected => "rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_round_trip_through_serde() {
        fn check<T: Copy + Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(
            all: &[T],
            label: fn(T) -> &'static str,
        ) {
            let mut seen = std::collections::HashSet::new();
            for v in all {
                assert!(seen.insert(label(*v)), "{} twice", label(*v));
                let json = serde_json::to_string(v).unwrap();
                assert_eq!(json, format!("\"{}\"", label(*v)));
                assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *v);
            }
        }
        check(DeadLetterReason::ALL, DeadLetterReason::as_str);
        check(PauseReason::ALL, PauseReason::as_str);
        check(IngestOutcome::ALL, IngestOutcome::as_str);
        assert_eq!(DeadLetterReason::ALL.len(), 5);
        assert_eq!(PauseReason::NotFound.to_string(), "not_found");
    }
}
