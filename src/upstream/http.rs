//! The real X client: builds the endpoint URL, authenticates (`super::auth`), sends one batch, and turns
//! whatever comes back into an `Outcome` (`super::outcome`). It never retries by itself.

use super::{auth, classify, Outcome, Target, Transport};
use crate::config::Upstream;
use crate::conversion::Conversion;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

pub struct HttpTransport {
    http: reqwest::Client,
    settings: Upstream,
}

impl HttpTransport {
    pub fn new(settings: Upstream) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("conversion-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpTransport { http, settings })
    }

    /// `{base_url}/{api_version}/measurement/conversions/{pixel_id}`
    pub fn endpoint(&self, pixel_id: &str) -> String {
        super::endpoint(&self.settings, pixel_id)
    }

    /// Sends one batch (at most 500 conversions) and classifies the response.
    pub async fn send_batch(&self, target: &Target, conversions: &[Conversion]) -> Outcome {
        let url = self.endpoint(&target.pixel_id);
        let body = match super::encode(conversions) {
            Ok(b) => b,
            Err(outcome) => return *outcome,
        };
        let Some(auth) = &target.auth.get() else {
            return Outcome::Transport {
                message: "account has no credentials (only sandbox mode runs without)".into(),
            };
        };
        let body_len = body.len();
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let request = auth::apply(request, auth, &url);
        let bytes = body_len;
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return transport_outcome(&e, bytes),
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
}

impl Transport for HttpTransport {
    fn send<'a>(
        &'a self,
        target: &'a Target,
        conversions: &'a [Conversion],
    ) -> BoxFuture<'a, Outcome> {
        self.send_batch(target, conversions).boxed()
    }
}

/// Bodies at least this large whose connection breaks while they are sent are taken as refused for
/// their size (X closes on a body it will not take); a smaller one breaking is a connection fault.
const LARGE_BODY: usize = 64 << 10;

fn transport_outcome(e: &reqwest::Error, body_bytes: usize) -> Outcome {
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
    if body_bytes >= LARGE_BODY && broke_while_sending(e) {
        return Outcome::BodyNotSent {
            bytes: body_bytes,
            message,
        };
    }
    Outcome::Transport { message }
}

/// Whether the peer closed the connection under the request (a broken pipe or a reset while writing).
fn broke_while_sending(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return true;
            }
        }
        source = s.source();
    }
    false
}
