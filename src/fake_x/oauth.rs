//! OAuth 1.0a HMAC-SHA1 verification written from RFC 5849, independent of the gateway's signer
//! (`oauth1-request`), so that the two check each other.

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha1::Sha1;

/// RFC 5849 §3.6: everything but ALPHA, DIGIT, '-', '.', '_', '~' is encoded.
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, RFC3986).to_string()
}

/// The parameters of an `Authorization: OAuth ...` header, decoded. `None` when it is not one.
pub fn parse_header(header: &str) -> Option<Vec<(String, String)>> {
    let rest = header.trim().strip_prefix("OAuth")?.trim_start();
    let mut out = Vec::new();
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=')?;
        let v = v.trim().strip_prefix('"')?.strip_suffix('"')?;
        out.push((
            percent_decode_str(k.trim())
                .decode_utf8()
                .ok()?
                .into_owned(),
            percent_decode_str(v).decode_utf8().ok()?.into_owned(),
        ));
    }
    Some(out)
}

/// RFC 5849 §3.4.1: method, base string URI, and the normalized parameters (oauth_*, query, form body),
/// without `oauth_signature` and `realm`.
pub fn base_string(method: &str, base_uri: &str, params: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "oauth_signature" && k != "realm")
        .map(|(k, v)| (encode(k), encode(v)))
        .collect();
    pairs.sort();
    let normalized = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        encode(base_uri),
        encode(&normalized)
    )
}

/// HMAC-SHA1 over the base string with key `enc(consumer_secret)&enc(token_secret)`, base64.
pub fn sign(base: &str, consumer_secret: &str, token_secret: &str) -> String {
    let key = format!("{}&{}", encode(consumer_secret), encode(token_secret));
    let mut mac =
        Hmac::<Sha1>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(base.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// RFC 5849 §3.4.1.2: scheme and host lower-case, default port dropped, no query or fragment.
pub fn base_string_uri(scheme: &str, host: &str, path: &str) -> String {
    let scheme = scheme.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let host = match (scheme.as_str(), host.rsplit_once(':')) {
        ("http", Some((h, "80"))) | ("https", Some((h, "443"))) => h.to_owned(),
        _ => host,
    };
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn known_answers() {
        let v: Value =
            serde_json::from_str(include_str!("../../tests/vectors/oauth1.json")).unwrap();
        for case in v["cases"].as_array().unwrap() {
            let uri = url::Url::parse(case["uri"].as_str().unwrap()).unwrap();
            let mut params: Vec<(String, String)> = case["oauth_params"]
                .as_object()
                .unwrap()
                .iter()
                .chain(case["form_body_params"].as_object().unwrap())
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            params.extend(
                uri.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned())),
            );
            let host = match uri.port() {
                Some(p) => format!("{}:{p}", uri.host_str().unwrap()),
                None => uri.host_str().unwrap().to_owned(),
            };
            let base = base_string(
                case["method"].as_str().unwrap(),
                &base_string_uri(uri.scheme(), &host, uri.path()),
                &params,
            );
            assert_eq!(
                base,
                case["signature_base_string"].as_str().unwrap(),
                "{}",
                case["name"]
            );
            let sig = sign(
                &base,
                case["consumer_secret"].as_str().unwrap(),
                case["token_secret"].as_str().unwrap(),
            );
            assert_eq!(
                sig,
                case["oauth_signature"].as_str().unwrap(),
                "{}",
                case["name"]
            );
        }
    }

    #[test]
    fn header_parsing() {
        let h = r#"OAuth oauth_consumer_key="ck", oauth_nonce="a%2Fb",oauth_signature="x%3D""#;
        let p = parse_header(h).unwrap();
        assert_eq!(p[1], ("oauth_nonce".to_string(), "a/b".to_string()));
        assert_eq!(p[2].1, "x=");
        assert!(parse_header("Bearer x").is_none());
    }

    #[test]
    fn default_ports_are_dropped() {
        assert_eq!(
            base_string_uri("HTTP", "Example.COM:80", "/r"),
            "http://example.com/r"
        );
        assert_eq!(
            base_string_uri("http", "127.0.0.1:18080", "/r"),
            "http://127.0.0.1:18080/r"
        );
    }
}
