//! The X client against real sockets: endpoint URL, timeout, connection errors, non-JSON bodies.

use axum::routing::post;
use axum::Router;
use conversion_gateway::config::{Auth, Secret, Upstream};
use conversion_gateway::conversion::Conversion;
use conversion_gateway::upstream::{HttpTransport as Client, Outcome, Target, Transport};
use std::time::Duration;

fn settings(base_url: String, timeout: Duration) -> Upstream {
    Upstream {
        base_url,
        api_version: "11".into(),
        timeout,
        sandbox: false,
    }
}

fn target() -> Target {
    Target {
        account: "acme".into(),
        pixel_id: "o9d7n".into(),
        auth: conversion_gateway::upstream::Credentials::new(Some(Auth::PixelToken {
            token: Secret::new("tok"),
        })),
    }
}

fn one() -> Vec<Conversion> {
    vec![Conversion::minimal(
        "2026-11-28T12:00:00.000Z",
        "o9d2g",
        "t",
        "c1",
    )]
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn endpoint_uses_version_and_pixel() {
    let c = Client::new(settings(
        "https://ads-api.x.com".into(),
        Duration::from_secs(1),
    ))
    .unwrap();
    assert_eq!(
        c.endpoint("o9d7n"),
        "https://ads-api.x.com/11/measurement/conversions/o9d7n"
    );
}

#[tokio::test]
async fn slow_upstream_is_a_timeout() {
    let url = serve(Router::new().route(
        "/11/measurement/conversions/{pixel}",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    ))
    .await;
    let c = Client::new(settings(url, Duration::from_millis(200))).unwrap();
    let o = c.send(&target(), &one()).await;
    assert_eq!(o, Outcome::Timeout);
    assert_eq!(o.status_label(), "timeout");
}

#[tokio::test]
async fn refused_connection_is_a_transport_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(settings(
        format!("http://127.0.0.1:{port}"),
        Duration::from_secs(2),
    ))
    .unwrap();
    let o = c.send(&target(), &one()).await;
    assert!(matches!(o, Outcome::Transport { .. }), "{o:?}");
    assert_eq!(o.status_label(), "connect_error");
}

#[tokio::test]
async fn html_error_page_is_classified_by_status_and_body_is_sent_as_json() {
    let url = serve(Router::new().route(
        "/11/measurement/conversions/{pixel}",
        post(|headers: axum::http::HeaderMap, body: String| async move {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["conversions"][0]["conversion_id"], "c1");
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(headers["x-pixel-token"], "tok");
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::response::Html("<html>Sorry, that page does not exist</html>"),
            )
        }),
    ))
    .await;
    let c = Client::new(settings(url, Duration::from_secs(2))).unwrap();
    match c.send(&target(), &one()).await {
        Outcome::Refused {
            status: 404,
            errors,
            body_excerpt,
            ..
        } => {
            assert!(errors.is_empty());
            assert!(body_excerpt.unwrap().contains("does not exist"));
        }
        other => panic!("{other:?}"),
    }
}

/// A server that, once a request's headers are in and without reading its body, either answers
/// `answer` and closes, as X (and the fake) do with a body they will not take, or (`None`) resets the
/// connection without a word, so that the client sees its body write fail.
async fn cut_after_the_headers(answer: Option<&'static [u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 16 << 10];
            let _ = s.read(&mut buf).await;
            match answer {
                Some(bytes) => {
                    let _ = s.write_all(bytes).await;
                    let _ = s.shutdown().await;
                }
                // A zero linger resets the connection on drop without waiting (what the deprecation
                // warns of is a lingering, blocking close; there is nothing to wait for here).
                #[allow(deprecated)]
                None => {
                    let _ = s.set_linger(Some(Duration::ZERO));
                }
            }
        }
    });
    format!("http://{addr}")
}

const PAYLOAD_TOO_LARGE: &[u8] =
    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn a_body_x_will_not_take_is_too_large_never_a_connection_error() {
    use conversion_gateway::dispatch::policy::{decide, Action};
    use conversion_gateway::reasons::DeadLetterReason;
    let mut big = one();
    big[0].description = Some("x".repeat(8 << 20));
    for url in [
        cut_after_the_headers(Some(PAYLOAD_TOO_LARGE)).await,
        cut_after_the_headers(None).await,
    ] {
        let c = Client::new(settings(url, Duration::from_secs(5))).unwrap();
        let o = c.send(&target(), &big).await;
        assert!(
            matches!(
                o,
                Outcome::Refused { status: 413, .. } | Outcome::BodyNotSent { .. }
            ),
            "{o:?}"
        );
        assert_eq!(decide(&o, 2, 0), Action::Split, "{o:?}");
        assert!(matches!(
            decide(&o, 1, 0),
            Action::DeadLetter {
                reason: DeadLetterReason::TooLarge,
                ..
            }
        ));
    }
    // A small body on a connection that breaks is a connection fault, retried, never dead-lettered.
    let c = Client::new(settings(
        cut_after_the_headers(None).await,
        Duration::from_secs(5),
    ))
    .unwrap();
    let o = c.send(&target(), &one()).await;
    assert!(matches!(o, Outcome::Transport { .. }), "{o:?}");
    assert!(matches!(decide(&o, 1, 0), Action::Backoff { .. }));
}
