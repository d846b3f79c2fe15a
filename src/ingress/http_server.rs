//! The HTTP port's connections: hyper, with the limits a port open to the internet needs.
//!
//! Input: the bound listener and the router. Output: connections served until `stop`, then
//! closed gracefully (requests in progress finish; the caller bounds the wait). Customer.io
//! must reach this port from the internet, so nobody can hold it with idle or slow connections:
//!
//! - a connection must send its first byte, and an HTTP/1 request its whole head, within
//!   [`HttpLimits::head_timeout`];
//! - HTTP/2 connections carry at most [`HTTP2_MAX_STREAMS`] requests at once and are pinged
//!   while idle, and closed when the ping goes unanswered;
//! - at most [`HttpLimits::max_connections`] connections are open; past that, new ones wait in
//!   the listener's backlog until one closes;
//! - request bodies are read within [`HttpLimits::body_timeout`] and a shared memory budget
//!   ([`crate::ingress::http::BodyBudget`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Throttle;

/// Requests one HTTP/2 connection carries at once.
pub const HTTP2_MAX_STREAMS: u32 = 100;
/// How often an idle HTTP/2 connection is pinged, and how long the answer may take.
const HTTP2_PING: Duration = Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP port's limits (`limits.http_*` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The longest wait for a connection's first byte and for an HTTP/1 request's head.
    pub head_timeout: Duration,
    /// The longest a request body may take to arrive.
    pub body_timeout: Duration,
    /// Request bodies held in memory at once, across all requests.
    pub body_budget_bytes: usize,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            head_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            body_budget_bytes: 128 * 1024 * 1024,
            max_connections: 4096,
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, then closes the connections
/// gracefully and returns once they are closed.
pub async fn serve(listener: TcpListener, app: Router, limits: HttpLimits, stop: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .keep_alive_interval(Some(HTTP2_PING))
        .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, most likely: wait a little for some to close.
                    static LOGGED: Throttle = Throttle::new(10_000);
                    if LOGGED.pass().is_some() {
                        tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Answers go out at once, not after the previous one is acknowledged.
        let _ = tcp.set_nodelay(true);
        let (builder, app, watcher) = (builder.clone(), app.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            if !first_byte(&tcp, limits.head_timeout).await {
                return;
            }
            let conn =
                builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(app));
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Waits for the connection's first byte (or its end) for at most `timeout`: hyper's own
/// timeout starts only once it knows the protocol, which takes a byte.
async fn first_byte(tcp: &TcpStream, timeout: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, tcp.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}
