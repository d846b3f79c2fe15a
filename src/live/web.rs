//! The Live Events page on the HTTP port.
//!
//! - `GET /live?token=<admin token>`: one self-contained HTML page (inline CSS and script, no
//!   external assets) that shows live events, newest first.
//! - `GET /live/events?token=…&integration=…&source=…&event_type=…&outcome=…`: the page's
//!   server-sent events: `live` (one live event as JSON) and `dropped` (`{"dropped": N}` when
//!   this watcher fell behind and lost N events).
//!
//! Browsers cannot set an `Authorization` header on `EventSource`, so both take the admin token
//! as the `token` query parameter (or, from curl and scripts, the usual `Authorization: Bearer`
//! header), compared in constant time; without it they answer 401 in the
//! project's JSON error shape. The relay logs no request URIs, so the token stays out of logs,
//! and the page is served with `Referrer-Policy: no-referrer` so it does not leak either.

use std::convert::Infallible;

use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::json;

use super::{Filter, LiveBus, Seen};
use crate::admin::AdminToken;
use crate::error::{ApiError, ErrorCode, QueryOf};

/// The page.
const PAGE: &str = include_str!("page.html");

/// What the live routes share.
#[derive(Clone)]
pub struct LiveWeb {
    /// The bus the page watches.
    pub bus: LiveBus,
    /// The admin token the page needs.
    pub token: AdminToken,
}

/// The query of both routes.
#[derive(Debug, Default, Deserialize)]
struct LiveQuery {
    token: Option<String>,
    #[serde(default)]
    integration: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    outcome: String,
}

/// The live routes, to merge into the HTTP router.
pub fn router(state: LiveWeb) -> Router {
    Router::new()
        .route("/live", get(page))
        .route("/live/events", get(events))
        .with_state(state)
}

/// The admin token as the `token` query parameter (browsers) or, as on every other admin call,
/// an `Authorization: Bearer` header (curl, scripts).
fn authorize(state: &LiveWeb, q: &LiveQuery, headers: &HeaderMap) -> Result<(), ApiError> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if state.token.check_token(q.token.as_deref()) || state.token.check(bearer) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "missing or wrong admin token: open `/live?token=<admin token>`",
        ))
    }
}

async fn page(
    State(state): State<LiveWeb>,
    headers: HeaderMap,
    QueryOf(q): QueryOf<LiveQuery>,
) -> Result<Response, ApiError> {
    authorize(&state, &q, &headers)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
        ],
        PAGE,
    )
        .into_response())
}

async fn events(
    State(state): State<LiveWeb>,
    headers: HeaderMap,
    QueryOf(q): QueryOf<LiveQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    authorize(&state, &q, &headers)?;
    let filter = Filter::parse(&q.integration, &q.source, &q.event_type, &q.outcome)
        .map_err(|e| super::filter_error(&e))?;
    let watcher = state.bus.subscribe(filter);
    // The stream (and with it the subscription) is dropped when the browser goes away.
    let stream = futures::stream::unfold(watcher, |mut watcher| async move {
        let event = match watcher.next().await? {
            Seen::Event(e) => Event::default().event("live").data(e.to_json().to_string()),
            Seen::Dropped(n) => Event::default()
                .event("dropped")
                .data(json!({ "dropped": n }).to_string()),
        };
        Some((Ok(event), watcher))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
