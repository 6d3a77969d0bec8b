//! Sandbox mode: nothing leaves the process. Each batch is checked against X's contract
//! (`crate::x_contract`) and answered as X would answer it; accepted batches are kept (the last
//! `SANDBOX_KEEP`) for inspection.

use super::{Outcome, RateLimitInfo, Target, Transport, XError};
use crate::config::Upstream;
use crate::conversion::Conversion;
use crate::x_contract as contract;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::Serialize;
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// A batch the sandbox built, checked and kept instead of sending.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxBatch {
    pub account: String,
    pub url: String,
    pub debug_id: String,
    pub conversions: Vec<Conversion>,
}

/// How many sandbox batches are kept for inspection.
pub const SANDBOX_KEEP: usize = 100;

pub struct SandboxTransport {
    settings: Upstream,
    log: Mutex<VecDeque<SandboxBatch>>,
}

impl SandboxTransport {
    pub fn new(settings: Upstream) -> Self {
        SandboxTransport {
            settings,
            log: Mutex::new(VecDeque::new()),
        }
    }

    /// The most recent batches accepted, oldest first.
    pub fn batches(&self) -> Vec<SandboxBatch> {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn check(&self, target: &Target, conversions: &[Conversion]) -> Outcome {
        let url = super::endpoint(&self.settings, &target.pixel_id);
        let body = match super::encode(conversions) {
            Ok(b) => b,
            Err(outcome) => return *outcome,
        };
        let pixels: HashSet<String> = [target.pixel_id.clone()].into();
        let scope = contract::Scope {
            account_sets: None,
            pixels: &pixels,
        };
        if let Err(errors) = contract::validate(&body, &scope) {
            return Outcome::Refused {
                status: contract::status_of(&errors),
                errors: errors
                    .into_iter()
                    .map(|e| XError {
                        code: e.code.into(),
                        message: e.message,
                        parameter: Some(e.parameter),
                    })
                    .collect(),
                rate_limit: RateLimitInfo::default(),
                body_excerpt: None,
            };
        }
        let debug_id = format!("sandbox-{:032x}", rand::random::<u128>());
        if let Ok(mut log) = self.log.lock() {
            if log.len() == SANDBOX_KEEP {
                log.pop_front();
            }
            log.push_back(SandboxBatch {
                account: target.account.clone(),
                url,
                debug_id: debug_id.clone(),
                conversions: conversions.to_vec(),
            });
        }
        Outcome::Accepted {
            status: 200,
            conversions_processed: Some(conversions.len() as u64),
            debug_id: Some(debug_id),
            rate_limit: RateLimitInfo::default(),
        }
    }
}

impl Transport for SandboxTransport {
    fn send<'a>(
        &'a self,
        target: &'a Target,
        conversions: &'a [Conversion],
    ) -> BoxFuture<'a, Outcome> {
        let outcome = self.check(target, conversions);
        async move { outcome }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sandbox() -> SandboxTransport {
        SandboxTransport::new(Upstream {
            base_url: "https://ads-api.x.com".into(),
            api_version: "12".into(),
            timeout: Duration::from_secs(1),
            sandbox: true,
        })
    }

    fn target() -> Target {
        Target {
            account: "acme".into(),
            pixel_id: "o9d7n".into(),
            auth: crate::upstream::Credentials::new(None),
        }
    }

    #[tokio::test]
    async fn accepts_what_x_accepts_and_keeps_it() {
        let t = sandbox();
        let ok = Conversion::minimal("2026-11-28T12:00:00.000Z", "o9d2g", "t", "c1");
        let outcome = t.send(&target(), std::slice::from_ref(&ok)).await;
        assert!(matches!(
            outcome,
            Outcome::Accepted {
                conversions_processed: Some(1),
                ..
            }
        ));
        let kept = t.batches();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            kept[0].url,
            "https://ads-api.x.com/12/measurement/conversions/o9d7n"
        );
        assert_eq!(kept[0].conversions, [ok]);
    }

    #[tokio::test]
    async fn refuses_what_x_refuses_with_xs_message() {
        let t = sandbox();
        let bad = Conversion::minimal("yesterday", "o9d2g", "t", "c1");
        match t.send(&target(), &[bad]).await {
            Outcome::Refused { status, errors, .. } => {
                assert_eq!(status, 400);
                assert_eq!(errors[0].parameter.as_deref(), Some("conversion_time"));
            }
            other => panic!("{other:?}"),
        }
        assert!(t.batches().is_empty(), "a refused batch is not kept");
    }

    #[tokio::test]
    async fn keeps_the_last_batches_only() {
        let t = sandbox();
        for i in 0..SANDBOX_KEEP + 5 {
            let c = Conversion::minimal("2026-11-28T12:00:00.000Z", "o9d2g", "t", &format!("c{i}"));
            t.send(&target(), &[c]).await;
        }
        let kept = t.batches();
        assert_eq!(kept.len(), SANDBOX_KEEP);
        assert_eq!(kept[0].conversions[0].conversion_id, "c5");
    }
}
