//! The HTTP port's connections: hyper's HTTP/1.1 server, with the limits a port open to the
//! internet needs.
//!
//! Input: the bound listener and the router. Output: connections served until `stop`, then
//! closed gracefully (requests in progress finish; the caller bounds the wait). Customer.io
//! must reach this port from the internet, so nobody can hold it with idle or slow connections:
//!
//! - the port speaks HTTP/1.1 only (gRPC, on its own port, is the HTTP/2 door): no protocol
//!   detection or HTTP/2 handshake that could be left hanging, no stream windows to fill;
//! - a connection must send each request's whole head within [`HttpLimits::head_timeout`],
//!   counted from the moment it opens (or the previous response), so a silent or idle
//!   connection is closed after that long;
//! - a request head is at most [`MAX_HEAD_BYTES`];
//! - at most [`HttpLimits::max_connections`] connections are open; past that, new ones wait in
//!   the listener's backlog until one closes;
//! - request bodies are read within [`HttpLimits::body_timeout`] and a shared memory budget
//!   ([`crate::ingress::http::BodyBudget`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Throttle;

/// The largest request head (request line and headers) read, in bytes: larger gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The HTTP port's limits (`limits.http_*` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The longest wait for a request's head, from the connection's start or the last answer.
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
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
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
        let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
