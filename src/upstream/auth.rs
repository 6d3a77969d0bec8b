//! Request authentication: OAuth 1.0a HMAC-SHA1 (through `oauth1-request`) or the pixel access token.
//!
//! A fresh nonce and timestamp are drawn for every call, so every attempt, retries included, is signed
//! afresh. The JSON body is not part of the signature (OAuth 1.0a signs only form bodies).

use crate::config::{Auth, Secret};
use std::num::NonZeroU64;

/// The `Authorization` header for a POST to `uri`. `fixed` pins nonce and timestamp (tests only).
pub fn oauth1_header(
    consumer_key: &Secret,
    consumer_secret: &Secret,
    access_token: &Secret,
    access_token_secret: &Secret,
    uri: &str,
    fixed: Option<(&str, u64)>,
) -> String {
    let mut builder = signer([
        consumer_key,
        consumer_secret,
        access_token,
        access_token_secret,
    ]);
    if let Some((nonce, timestamp)) = fixed {
        builder.nonce(nonce).timestamp(NonZeroU64::new(timestamp));
    }
    builder.post(uri, &())
}

/// The `Authorization` header for a `method` request to `uri` (without its query) whose query or form
/// parameters are `params`: the Ads API's account endpoints sign them (RFC 5849 §3.4.1.3), unlike the
/// conversions endpoint's JSON body. Send the same `params` as the query (`to_query`) or the form body.
pub fn oauth1_header_for(
    credentials: [&Secret; 4],
    method: &str,
    uri: &str,
    params: &[(&str, &str)],
) -> String {
    let builder = signer(credentials);
    let mut sorted = params.to_vec();
    sorted.sort();
    // `ParameterList` wants its pairs sorted (they are, just above).
    builder.authorize(method, uri, &oauth1_request::ParameterList::new(sorted))
}

/// An HMAC-SHA1 signer for the consumer key and secret, access token and secret, in that order.
fn signer(
    [consumer_key, consumer_secret, access_token, access_token_secret]: [&Secret; 4],
) -> oauth1_request::Builder<'_, oauth1_request::HmacSha1, &str, &str> {
    let token = oauth1_request::Token::from_parts(
        consumer_key.expose(),
        consumer_secret.expose(),
        access_token.expose(),
        access_token_secret.expose(),
    );
    let mut builder = oauth1_request::Builder::with_token(token, oauth1_request::HmacSha1::new());
    builder.version(true);
    builder
}

/// `params` as a query string or `application/x-www-form-urlencoded` body, encoded as they are signed.
pub fn encode_params(params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    oauth1_request::to_form(&oauth1_request::ParameterList::new(sorted))
}

/// Adds the account's credentials to a request.
pub fn apply(request: reqwest::RequestBuilder, auth: &Auth, uri: &str) -> reqwest::RequestBuilder {
    match auth {
        Auth::Oauth1 {
            consumer_key,
            consumer_secret,
            access_token,
            access_token_secret,
        } => request.header(
            reqwest::header::AUTHORIZATION,
            oauth1_header(
                consumer_key,
                consumer_secret,
                access_token,
                access_token_secret,
                uri,
                None,
            ),
        ),
        Auth::PixelToken { token } => request.header("x-pixel-token", token.expose()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn param<'a>(header: &'a str, name: &str) -> &'a str {
        let start = header.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        let rest = &header[start..];
        &rest[..rest.find('"').unwrap()]
    }

    /// The conversions-endpoint cases of `shared/vectors/oauth1.json` (no form body, JSON not signed).
    #[test]
    fn signatures_match_the_known_answers() {
        let v: Value =
            serde_json::from_str(include_str!("../../tests/vectors/oauth1.json")).unwrap();
        let mut checked = 0;
        for case in v["cases"].as_array().unwrap() {
            if !case["form_body_params"].as_object().unwrap().is_empty() {
                continue; // a form body is never what the gateway sends
            }
            let p = &case["oauth_params"];
            let s = |v: &Value| Secret::new(v.as_str().unwrap());
            let header = oauth1_header(
                &s(&p["oauth_consumer_key"]),
                &s(&case["consumer_secret"]),
                &s(&p["oauth_token"]),
                &s(&case["token_secret"]),
                case["uri"].as_str().unwrap(),
                Some((
                    p["oauth_nonce"].as_str().unwrap(),
                    p["oauth_timestamp"].as_str().unwrap().parse().unwrap(),
                )),
            );
            let sig = percent_encoding::percent_decode_str(param(&header, "oauth_signature"))
                .decode_utf8()
                .unwrap();
            assert_eq!(
                sig,
                case["oauth_signature"].as_str().unwrap(),
                "{}",
                case["name"]
            );
            assert_eq!(param(&header, "oauth_version"), "1.0");
            checked += 1;
        }
        assert_eq!(checked, 2);
    }

    /// The classic case has a query and a form body: both are signed. (oauth1-request takes query
    /// parameters as request parameters and refuses a URI with a query; the gateway's URIs have none.)
    #[test]
    fn signer_handles_query_and_form_parameters() {
        let v: Value =
            serde_json::from_str(include_str!("../../tests/vectors/oauth1.json")).unwrap();
        let case = &v["cases"][0];
        let p = &case["oauth_params"];
        let token = oauth1_request::Token::from_parts(
            p["oauth_consumer_key"].as_str().unwrap(),
            case["consumer_secret"].as_str().unwrap(),
            p["oauth_token"].as_str().unwrap(),
            case["token_secret"].as_str().unwrap(),
        );
        let mut builder =
            oauth1_request::Builder::with_token(token, oauth1_request::HmacSha1::new());
        builder
            .version(true)
            .nonce(p["oauth_nonce"].as_str().unwrap())
            .timestamp(NonZeroU64::new(1318622958));
        let status = case["form_body_params"]["status"].as_str().unwrap();
        let (uri, query) = case["uri"].as_str().unwrap().split_once('?').unwrap();
        let (qk, qv) = query.split_once('=').unwrap();
        let params = oauth1_request::ParameterList::new([
            (qk, &qv as &dyn std::fmt::Display),
            ("status", &status),
        ]);
        let header = builder.post(uri, &params);
        let sig = percent_encoding::percent_decode_str(param(&header, "oauth_signature"))
            .decode_utf8()
            .unwrap();
        assert_eq!(sig, case["oauth_signature"].as_str().unwrap());
    }

    #[test]
    fn every_call_draws_a_fresh_nonce() {
        let s = Secret::new("x");
        let a = oauth1_header(
            &s,
            &s,
            &s,
            &s,
            "https://ads-api.x.com/12/measurement/conversions/o9d7n",
            None,
        );
        let b = oauth1_header(
            &s,
            &s,
            &s,
            &s,
            "https://ads-api.x.com/12/measurement/conversions/o9d7n",
            None,
        );
        assert_ne!(param(&a, "oauth_nonce"), param(&b, "oauth_nonce"));
        assert_ne!(param(&a, "oauth_signature"), param(&b, "oauth_signature"));
    }
}
