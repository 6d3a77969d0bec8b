//! Bearer-key checks for the ingest and admin APIs.
//!
//! Keys are compared as SHA-256 digests in constant time, and every configured key is compared, so
//! neither the position of a match nor the length of a key shows in the timing.

use crate::config::Secret;
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    open: bool,
}

impl ApiKeys {
    /// `open`: no key required (only when the configuration allows unauthenticated access and has no keys).
    pub fn new(keys: &[Secret], allow_unauthenticated: bool) -> Self {
        ApiKeys {
            digests: keys
                .iter()
                .map(|k| Sha256::digest(k.expose().as_bytes()).into())
                .collect(),
            open: keys.is_empty() && allow_unauthenticated,
        }
    }

    /// Whether no request can pass: no key configured and unauthenticated access not allowed.
    pub fn accepts_none(&self) -> bool {
        self.digests.is_empty() && !self.open
    }

    /// `Err(detail)` when the request does not carry an accepted key.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        if self.open {
            return Ok(());
        }
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Err("missing Authorization header; send Authorization: Bearer <api key>");
        };
        let value = value.to_str().unwrap_or("");
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err("Authorization must be Bearer <api key>"),
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut matched = subtle::Choice::from(0);
        for d in &self.digests {
            matched |= d.ct_eq(&presented);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err("the API key is not valid")
        }
    }
}
