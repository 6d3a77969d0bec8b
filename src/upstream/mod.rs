//! The X client: builds the endpoint URL, authenticates, sends one batch, and turns whatever comes back
//! into an `Outcome` (see `outcome`). It never retries by itself: deciding what to do is the caller's job.
//!
//! In sandbox mode nothing leaves the process: each batch is checked against X's contract and recorded.

pub mod auth;
pub mod outcome;

pub use outcome::{classify, Outcome, RateLimitInfo, XError};

use crate::config::{Auth, Upstream};
use crate::conversion::{Batch, Conversion};
use crate::fake_x::contract;
use serde::Serialize;
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// Where and as whom an account's batches go.
#[derive(Debug, Clone)]
pub struct Target {
    pub account: String,
    pub pixel_id: String,
    pub auth: Option<Auth>,
}

/// A batch the sandbox built, checked and kept instead of sending.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxBatch {
    pub account: String,
    pub url: String,
    pub debug_id: String,
    pub conversions: Vec<Conversion>,
}

/// How many sandbox batches are kept for inspection.
const SANDBOX_KEEP: usize = 100;

pub struct Client {
    http: reqwest::Client,
    settings: Upstream,
    sandbox_log: Mutex<VecDeque<SandboxBatch>>,
}

impl Client {
    pub fn new(settings: Upstream) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("conversion-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            settings,
            sandbox_log: Mutex::new(VecDeque::new()),
        })
    }

    /// `{base_url}/{api_version}/measurement/conversions/{pixel_id}`
    pub fn endpoint(&self, pixel_id: &str) -> String {
        format!(
            "{}/{}/measurement/conversions/{}",
            self.settings.base_url, self.settings.api_version, pixel_id
        )
    }

    /// Sends one batch (at most 500 conversions) and classifies the response.
    pub async fn send(&self, target: &Target, conversions: &[Conversion]) -> Outcome {
        let url = self.endpoint(&target.pixel_id);
        let body = match serde_json::to_vec(&Batch { conversions }) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Transport {
                    message: format!("could not encode the batch: {e}"),
                }
            }
        };
        if self.settings.sandbox {
            return self.record_sandbox(target, url, &body, conversions);
        }
        let Some(auth) = &target.auth else {
            return Outcome::Transport {
                message: "account has no credentials (only sandbox mode runs without)".into(),
            };
        };
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let request = auth::apply(request, auth, &url);
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return transport_outcome(&e),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        match response.bytes().await {
            Ok(bytes) => classify(
                status,
                |name| headers.get(name).and_then(|v| v.to_str().ok()),
                &bytes,
            ),
            Err(e) if e.is_timeout() => Outcome::Timeout,
            // The status arrived; a broken body does not change what it means.
            Err(_) => classify(
                status,
                |name| headers.get(name).and_then(|v| v.to_str().ok()),
                b"",
            ),
        }
    }

    fn record_sandbox(
        &self,
        target: &Target,
        url: String,
        body: &[u8],
        conversions: &[Conversion],
    ) -> Outcome {
        let pixels: HashSet<String> = [target.pixel_id.clone()].into();
        if let Err(errors) = contract::validate(
            body,
            &contract::Scope {
                account_sets: None,
                pixels: &pixels,
            },
        ) {
            let status = contract::status_of(&errors);
            let errors = errors
                .into_iter()
                .map(|e| XError {
                    code: e.code.into(),
                    message: e.message,
                    parameter: Some(e.parameter),
                })
                .collect();
            return Outcome::Refused {
                status,
                errors,
                rate_limit: RateLimitInfo::default(),
                body_excerpt: None,
            };
        }
        let debug_id = format!("sandbox-{:032x}", rand::random::<u128>());
        let batch = SandboxBatch {
            account: target.account.clone(),
            url,
            debug_id: debug_id.clone(),
            conversions: conversions.to_vec(),
        };
        if let Ok(mut log) = self.sandbox_log.lock() {
            if log.len() == SANDBOX_KEEP {
                log.pop_front();
            }
            log.push_back(batch);
        }
        Outcome::Accepted {
            status: 200,
            conversions_processed: Some(conversions.len() as u64),
            debug_id: Some(debug_id),
            rate_limit: RateLimitInfo::default(),
        }
    }

    /// The most recent batches built in sandbox mode, oldest first.
    pub fn sandbox_batches(&self) -> Vec<SandboxBatch> {
        self.sandbox_log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

fn transport_outcome(e: &reqwest::Error) -> Outcome {
    if e.is_timeout() {
        return Outcome::Timeout;
    }
    // reqwest's Display names the URL, never headers: no credential can leak through it.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Outcome::Transport { message }
}
