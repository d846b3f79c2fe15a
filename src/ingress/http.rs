//! The HTTP door: health and status for operators and load balancers.
//!
//! Input: HTTP requests on the relay's HTTP port. Output: JSON answers; errors use the one JSON
//! error shape of [`crate::error::ApiError`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::{Value, json};

use crate::delivery::DeliveryState;
use crate::ingest::Ingest;
use crate::queue::Queue;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The ingest core.
    pub ingest: Ingest,
    /// The delivery stage's pauses and counters.
    pub delivery: Arc<DeliveryState>,
    /// The queue, for its depth.
    pub queue: Arc<dyn Queue>,
    /// False once shutdown has begun.
    pub serving: Arc<AtomicBool>,
}

/// The HTTP routes.
pub fn router(state: HttpState) -> Router {
    Router::new().route("/healthz", get(health)).with_state(state)
}

/// `GET /healthz`: 200 while serving (with paused integrations and their troubleshooting text),
/// 503 once shutdown has begun.
async fn health(State(s): State<HttpState>) -> (StatusCode, Json<Value>) {
    let serving = s.serving.load(Ordering::SeqCst);
    let paused: Vec<Value> = s
        .delivery
        .paused()
        .into_iter()
        .map(|(id, p)| json!({"integration": id, "status": p.status, "hint": p.hint, "message": p.message, "since_ms": p.since_ms}))
        .collect();
    let code = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if serving { "serving" } else { "not_serving" },
        "rules_version": s.ingest.rules().current().version().to_string(),
        "queue_depth": s.queue.depth(),
        "paused_integrations": paused,
    });
    (code, Json(body))
}
