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
        auth: Some(Auth::PixelToken {
            token: Secret::new("tok"),
        }),
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
