//! Serving a listener: one task per connection, HTTP/1.1 by hyper, and a stop that no client can hold up.
//!
//! # Connections
//! Every accepted connection gets its own task. Its request headers must arrive within
//! `server.header_timeout` (hyper's header read timeout, on tokio's timer): a client that trickles
//! headers is cut off then, whatever else happens. hyper's own parse-error answers carry problem bodies
//! (`explained`). A connection with no request in progress and no answer for `server.idle_timeout` is
//! closed (a request's body has its own limit, `server.body_timeout`, kept by ingest). At most
//! `max_connections` are open at once: one more is closed as soon as it is accepted and counted, never
//! queued, so that a flood of one listener leaves descriptors to the spool and to the other listener.
//!
//! # Stopping
//! When the shutdown fires, the listener is closed at once: new connections are refused (a Kubernetes
//! pod being stopped is already out of its Service's endpoints, and a refused connection tells the
//! client that nothing was sent). Every open connection is told to finish: a request in progress
//! completes and its answer goes out with `connection: close`. A connection with no request in progress
//! and no answer in the last `STOP_GRACE` (an idle keep-alive, headers still trickling in) is closed
//! then — it never got a `202`, so nothing accepted is lost. The server's task ends when the last
//! connection has.

use super::explained::Explained;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::shutdown::Shutdown;

/// How long, after the shutdown, a connection may stay without a request in progress.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// How a listener's connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub header_timeout: Duration,
    /// A connection with no request in progress and no answer for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once at most; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// The listener's name in metrics and logs (`ingest`, `admin`).
    pub listener: &'static str,
    /// Answers are small and go out whole: no Nagle delay on them.
    pub nodelay: bool,
}

/// Serves `router` on `listener` until `shutdown` fires and the connections have finished.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
    opts: ServeOptions,
    refused: impl Fn() + Send + 'static,
) {
    let mut connections = JoinSet::new();
    let mut stop = shutdown.clone();
    let room = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let mut warned = None::<Instant>;
    loop {
        tokio::select! {
            _ = stop.wait_ref() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    // Full: closed at once (the client sees the connection end, not a queue), so that
                    // the descriptors left serve the spool and the other listener.
                    let Ok(permit) = room.clone().try_acquire_owned() else {
                        drop(tcp);
                        refused();
                        if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            warned = Some(Instant::now());
                            tracing::warn!(listener = opts.listener, max = opts.max_connections, "connection limit reached: new connections are closed at once");
                        }
                        continue;
                    };
                    if opts.nodelay {
                        let _ = tcp.set_nodelay(true);
                    }
                    let (router, shutdown) = (router.clone(), shutdown.clone());
                    connections.spawn(async move {
                        connection(tcp, router, shutdown, opts).await;
                        drop(permit);
                    });
                }
                // Out of file descriptors and the like: wait a little instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Requests of one connection in progress, and when the last answer was made.
struct Activity {
    in_progress: AtomicUsize,
    last_answer: Mutex<Instant>,
}

impl Activity {
    fn quiet_for(&self, grace: Duration) -> bool {
        self.in_progress.load(Ordering::Acquire) == 0
            && self
                .last_answer
                .lock()
                .map_or(true, |t| t.elapsed() >= grace)
    }
}

/// Counts a request from its call until its answer is made.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_progress.fetch_add(1, Ordering::AcqRel);
        InProgress(activity.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.last_answer.lock() {
            *t = Instant::now();
        }
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    router: Router,
    mut shutdown: Shutdown,
    opts: ServeOptions,
) {
    let activity = Arc::new(Activity {
        in_progress: AtomicUsize::new(0),
        last_answer: Mutex::new(Instant::now()),
    });
    let counted = activity.clone();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let guard = InProgress::new(&counted);
            let answer = router.clone().oneshot(request.map(axum::body::Body::new));
            async move {
                let response = answer.await;
                drop(guard);
                response
            }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(Explained::new(tcp)), service);
    tokio::pin!(conn);
    // Looked at this often for idleness (a finer clock than the timeout itself).
    let tick = (opts.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            _ = shutdown.wait_ref() => {
                conn.as_mut().graceful_shutdown();
                break;
            }
            _ = tokio::time::sleep(tick) => {
                // Idle keep-alive: closing it costs the client a reconnect, keeping it a descriptor.
                if activity.quiet_for(opts.idle_timeout) {
                    return;
                }
            }
        }
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            _ = tokio::time::sleep(STOP_GRACE) => {
                if activity.quiet_for(STOP_GRACE) {
                    return;
                }
            }
        }
    }
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        // A client that goes away or times out its headers is routine: debug, not a warning.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
