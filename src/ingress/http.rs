//! The HTTP door: Signal-compatible ingestion, Customer.io reporting webhooks, and health.
//!
//! Input: HTTP requests on the relay's HTTP port. Output: JSON answers; every error uses the one
//! JSON shape of [`crate::error::ApiError`]. Signatures are verified over the raw body before it
//! is parsed; a request with a bad or missing signature, or over its size limit, never reaches
//! the queue.
//!
//! - `POST /v1/events`: one Signal canonical event → `{"success":true,…}`.
//! - `POST /v1/batch`: a JSON array of events, or `{"batch": […]}` → a result per event.
//! - `POST /v1/webhooks/customerio`: a Customer.io reporting webhook → 200 as soon as it is
//!   queued, also when the rules ignore it (any other answer stalls Customer.io's feed).
//! - `GET /healthz`: serving state, queue depth, the queue backend and whether it is connected,
//!   paused integrations with their hints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse as _;
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, StatusCode};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::delivery::DeliveryState;
use crate::error::{ApiError, ErrorCode};
use crate::ingest::{Accepted, Disposition, Ingest};
use crate::ingress::signature;
use crate::integration::Secret;
use crate::normalize::{self, InboundEvent};
use crate::queue::Queue;
use crate::rules::Source;
use crate::timefmt::now_ms;

use crate::normalize::MAX_WEBHOOK_BYTES;
/// The longest a request waits for room in the body budget before it is refused (at most a
/// quarter of the body timeout).
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(5);

/// The memory request bodies may hold at once. A body reserves its declared length (or its
/// route's limit when it declares none) before it is read, so senders who never finish their
/// bodies cannot make the relay hold more than the budget: past it, requests wait a little,
/// then get 503 with `Retry-After`.
#[derive(Clone)]
pub struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        BodyBudget(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }
}

/// A body read within the budget: its share of the budget is returned when this is dropped.
struct ReadBody {
    bytes: Bytes,
    _reserved: Option<OwnedSemaphorePermit>,
}

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
    /// Signal signature secret.
    pub signal_secret: Option<Secret>,
    /// Signal timestamp tolerance.
    pub signal_tolerance: Duration,
    /// Customer.io signing key.
    pub customerio_key: Option<Secret>,
    /// Customer.io timestamp tolerance.
    pub customerio_tolerance: Duration,
    /// Largest event accepted.
    pub max_event_bytes: usize,
    /// Most events per batch.
    pub max_batch_events: usize,
    /// The memory request bodies may hold at once.
    pub bodies: BodyBudget,
    /// The longest a request body may take to arrive.
    pub body_timeout: Duration,
}

/// The HTTP routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/livez", get(live))
        .route("/v1/events", post(signal_event))
        .route("/v1/batch", post(signal_batch))
        .route("/v1/webhooks/customerio", post(customerio_webhook))
        // Limits are enforced per route while reading, so that oversized bodies get a JSON 413.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Reads a request body of at most `limit` bytes, within the body timeout and the port's body
/// budget. The budget is taken as the bytes arrive, not for what the request declares: a sender
/// who stalls holds only what it sent, and the whole body must arrive within the timeout.
async fn read_body(
    s: &HttpState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<ReadBody, ApiError> {
    use http_body_util::BodyExt as _;
    let too_large = || ApiError {
        violations: Vec::new(),
        retry_after: None,
        ..ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is over the {limit}-byte limit"),
        )
    };
    let busy = || ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            ErrorCode::Unavailable,
            "the relay is reading as many request bodies as its memory budget allows; retry shortly",
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let deadline = tokio::time::Instant::now() + s.body_timeout;
    if let Some(n) = declared.filter(|n| *n > limit) {
        if n <= DRAIN_MAX {
            drain(body, deadline).await;
        }
        return Err(too_large());
    }
    let wait = BODY_BUDGET_WAIT.min(s.body_timeout / 4);
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the request body did not arrive within {} s",
                        s.body_timeout.as_secs()
                    ),
                ));
            }
            Ok(None) => break,
            // The connection broke mid-body: nobody reads this answer.
            Ok(Some(Err(_))) => return Err(ApiError::field("body", "could not be read to its end")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > limit {
            // What was read, and its share of the budget, go before the rest is read out.
            drop(buf);
            drop(reserved);
            drain(body, deadline).await;
            return Err(too_large());
        }
        let need = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if need > 0 {
            let permit = match tokio::time::timeout(wait, s.bodies.0.clone().acquire_many_owned(need)).await {
                Ok(Ok(permit)) => permit,
                _ => return Err(busy()),
            };
            match reserved.as_mut() {
                Some(r) => r.merge(permit),
                None => reserved = Some(permit),
            }
        }
        buf.extend_from_slice(&data);
    }
    Ok(ReadBody {
        bytes: buf.freeze(),
        _reserved: reserved,
    })
}

/// The most of an oversized body read (and dropped) before the 413 is answered: a sender that
/// writes its whole body before reading the answer (most HTTP clients) would otherwise see the
/// connection reset instead of the 413, and retry the same body for ever.
const DRAIN_MAX: usize = 64 * 1024 * 1024;

/// Reads the rest of a refused body and drops it, until it ends, [`DRAIN_MAX`] bytes have
/// come, or `deadline`; whatever is left then is cut off with the connection.
async fn drain(mut body: Body, deadline: tokio::time::Instant) {
    use http_body_util::BodyExt as _;
    let mut read = 0usize;
    while read <= DRAIN_MAX {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// The request's `Content-Encoding`, unless it is none or `identity`.
fn content_encoding(headers: &HeaderMap) -> Option<&http::HeaderValue> {
    headers
        .get(http::header::CONTENT_ENCODING)
        .filter(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
}

/// The body as JSON bytes: as sent, or inflated when it came gzip-compressed (up to `limit`
/// bytes inflated). Signatures are checked before, over the bytes as sent.
fn inflated<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
    limit: usize,
) -> Result<std::borrow::Cow<'a, [u8]>, ApiError> {
    use std::io::Read as _;
    let Some(encoding) = content_encoding(headers) else {
        return Ok(std::borrow::Cow::Borrowed(body));
    };
    if !encoding.as_bytes().trim_ascii().eq_ignore_ascii_case(b"gzip") {
        return Err(ApiError::field(
            "Content-Encoding",
            "only gzip is accepted (or no encoding)",
        ));
    }
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    // Every member of the stream (gzip allows several, concatenated).
    flate2::read::MultiGzDecoder::new(body)
        .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| ApiError::field("body", format!("is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body inflates to over the {limit}-byte limit"),
        ));
    }
    Ok(std::borrow::Cow::Owned(out))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A signature header's text: `None` when absent, refused as malformed when it is not text.
fn signature_header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| unauthenticated(signature::SignatureError::Malformed(name)))
        })
        .transpose()
}

fn unauthenticated(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, format!("invalid signature: {e}"))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            return normalize::too_deep("body");
        }
        ApiError::field("body", format!("is not valid JSON: {e}"))
    })
}

fn verify_signal(s: &HttpState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    check_signal(s, headers, body).inspect_err(|e| s.ingest.unauthenticated(Source::Signal, &e.message))
}

fn check_signal(s: &HttpState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let secret = s.signal_secret.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "Signal HTTP ingestion is not configured: set --signal-secret (LYTICS_RELAY_SIGNAL_SECRET)",
        )
    })?;
    signature::verify_signal(
        secret.expose(),
        signature_header(headers, "X-Timestamp")?,
        signature_header(headers, "X-Signature")?,
        body,
        now_ms(),
        i64::try_from(s.signal_tolerance.as_secs()).unwrap_or(i64::MAX),
    )
    .map_err(unauthenticated)
}

/// The JSON form of an accepted event.
pub fn accepted_json(a: &Accepted) -> Value {
    json!({
        "message_id": &*a.id,
        "status": match a.disposition {
            Disposition::Queued => "accepted",
            Disposition::Duplicate => "duplicate",
            Disposition::Ignored => "ignored",
        },
        "records": a.records,
        "rules": a.rules.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "dropped": a.dropped.iter().map(|d| json!({"rule": &*d.rule, "reason": d.reason, "integration": d.integration.as_deref()})).collect::<Vec<_>>(),
        "rules_version": &*a.rules_version,
    })
}

fn error_json(e: &ApiError) -> Value {
    json!({"code": e.code.as_str(), "message": e.message, "violations": e.violations})
}

async fn signal_event(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = read_body(&s, &headers, body, s.max_event_bytes).await?;
    verify_signal(&s, &headers, &body.bytes)?;
    let body = inflated(&headers, &body.bytes, s.max_event_bytes)?;
    let value = parse_json(&body)?;
    // `{"event": {…}}` is the gRPC request's shape (what grpcurl takes), not this endpoint's.
    if let Value::Object(m) = &value
        && m.len() == 1
        && m.get("event").is_some_and(Value::is_object)
    {
        return Err(ApiError::field(
            "event",
            "post the Signal event itself as the body, not {\"event\": …} (that is the gRPC request's shape)",
        ));
    }
    let event = normalize::signal_event(value, "", s.max_event_bytes, now_ms())?;
    let accepted = s
        .ingest
        .accept(vec![event], header(&headers, "traceparent"))
        .await?;
    let mut answer = accepted.first().map(accepted_json).unwrap_or_else(|| json!({}));
    answer["success"] = json!(true);
    Ok(Json(answer))
}

/// A JSON object.
type JsonObject = serde_json::Map<String, Value>;

/// An object a batch gives all its events, by its key (`context`, `integrations`).
type Shared = (&'static str, JsonObject);

/// The events of a batch body (`[…]` or `{"batch": […]}`), each still unparsed (skimming the
/// body has no nesting limit, so an event too deep to parse does not fail its neighbours), and
/// the batch's own `context` and `integrations`, which apply to every event (Segment's batch
/// API), by key.
fn batch_items(body: &[u8]) -> Result<(Vec<&RawValue>, Vec<Shared>), ApiError> {
    #[derive(serde::Deserialize)]
    struct Wrapped<'a> {
        #[serde(borrow)]
        batch: Option<&'a RawValue>,
        #[serde(borrow)]
        context: Option<&'a RawValue>,
        #[serde(borrow)]
        integrations: Option<&'a RawValue>,
    }
    let not_json = |e: serde_json::Error| ApiError::field("body", format!("is not valid JSON: {e}"));
    let object = |key: &'static str,
                  raw: Option<&RawValue>|
     -> Result<Option<(&'static str, JsonObject)>, ApiError> {
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(m)) => Ok(Some((key, m))),
            Ok(Value::Null) => Ok(None),
            Ok(_) => Err(ApiError::field(key, "must be an object")),
            Err(e) if e.to_string().starts_with("recursion limit exceeded") => Err(normalize::too_deep(key)),
            Err(e) => Err(ApiError::field(key, format!("is not valid JSON: {e}"))),
        }
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => Ok((serde_json::from_slice(body).map_err(not_json)?, Vec::new())),
        Some(b'{') => {
            let wrapped: Wrapped<'_> = serde_json::from_slice(body).map_err(not_json)?;
            let shared = [
                object("context", wrapped.context)?,
                object("integrations", wrapped.integrations)?,
            ]
            .into_iter()
            .flatten()
            .collect();
            let events = wrapped
                .batch
                .and_then(|b| serde_json::from_str(b.get()).ok())
                .ok_or_else(|| ApiError::field("batch", "must be an array of events"))?;
            Ok((events, shared))
        }
        _ => {
            // Not an array or an object: invalid JSON is named as such.
            parse_json(body)?;
            Err(ApiError::field(
                "body",
                "must be an array of events or {\"batch\": [...]}",
            ))
        }
    }
}

/// Gives an event of a batch the batch's `key` object: a `context` fills what the event's own
/// lacks, at any depth (the event's own values win); `integrations` switches apply only to an
/// event without its own, since a switch is decided by the most specific key present, and a
/// merged batch `Lytics: true` would overrule the event's own `All: false`.
fn with_batch_object(event: &mut Value, key: &str, shared: &serde_json::Map<String, Value>) {
    fn merge(into: &mut serde_json::Map<String, Value>, from: &serde_json::Map<String, Value>) {
        for (k, v) in from {
            match (into.get_mut(k), v) {
                (Some(Value::Object(mine)), Value::Object(theirs)) => merge(mine, theirs),
                // `null` is no value, as everywhere in the rules.
                (Some(Value::Null), v) | (None, v) => {
                    into.insert(k.clone(), v.clone());
                }
                (Some(_), _) => {}
            }
        }
    }
    let Value::Object(event) = event else { return };
    match event.get_mut(key) {
        Some(Value::Object(_)) if key == "integrations" => {}
        Some(Value::Object(own)) => merge(own, shared),
        // One that is not an object is the event's own mistake, refused by validation.
        Some(_) => {}
        None => {
            event.insert(key.into(), Value::Object(shared.clone()));
        }
    }
}

async fn signal_batch(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::response::Response, ApiError> {
    let limit = s
        .max_event_bytes
        .saturating_mul(s.max_batch_events)
        .min(crate::app::MAX_GRPC_MESSAGE);
    let body = read_body(&s, &headers, body, limit).await?;
    verify_signal(&s, &headers, &body.bytes)?;
    let body = inflated(&headers, &body.bytes, limit)?;
    let (events, shared) = batch_items(&body)?;
    // The batch's objects join every event: alone over an event's limit, no event could take one.
    for (key, c) in &shared {
        let size = normalize::json_bytes(&Value::Object(c.clone())).len();
        if size > s.max_event_bytes {
            return Err(normalize::too_large(key, size, s.max_event_bytes));
        }
    }
    if events.is_empty() || events.len() > s.max_batch_events {
        return Err(ApiError::field(
            "batch",
            format!("must hold 1 to {} events", s.max_batch_events),
        ));
    }
    let now = now_ms();
    let mut results: Vec<Value> = Vec::with_capacity(events.len());
    let mut valid: Vec<InboundEvent> = Vec::new();
    let mut slots = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        let field = format!("batch[{i}]");
        // An event's bytes as sent count, as a body to /v1/events does.
        if e.get().len() > s.max_event_bytes {
            let err = normalize::too_large(&field, e.get().len(), s.max_event_bytes);
            results.push(json!({"index": i, "error": error_json(&err)}));
            continue;
        }
        // Each event is parsed on its own, so one nested past the parser's limit is refused
        // alone, as gRPC `SendBatch` refuses it.
        let parsed = serde_json::from_str::<Value>(e.get()).map_err(|e| {
            // The skim checked the syntax already: what is left is the nesting limit.
            if e.to_string().starts_with("recursion limit exceeded") {
                normalize::too_deep(&field)
            } else {
                ApiError::field(field.clone(), format!("is not valid JSON: {e}"))
            }
        });
        let parsed = parsed.map(|mut e| {
            for (key, object) in &shared {
                with_batch_object(&mut e, key, object);
            }
            e
        });
        match parsed.and_then(|e| normalize::signal_event(e, &field, s.max_event_bytes, now)) {
            Ok(ev) => {
                slots.push(results.len());
                results.push(json!({"index": i}));
                valid.push(ev);
            }
            Err(err) => results.push(json!({"index": i, "error": error_json(&err)})),
        }
    }
    let accepted = if valid.is_empty() {
        Vec::new()
    } else {
        s.ingest.accept(valid, header(&headers, "traceparent")).await?
    };
    for (slot, a) in slots.into_iter().zip(accepted.iter()) {
        results[slot]["result"] = accepted_json(a);
    }
    let rejected = results.len() - accepted.len();
    // `success` says the batch was taken: its refused events are in `results`, and resending the
    // whole batch would deliver the accepted ones again (those without a messageId twice).
    let mut answer = json!({"success": !accepted.is_empty(), "accepted": accepted.len(), "rejected": rejected, "results": results});
    if accepted.is_empty() {
        // Nothing of it was taken: a bad payload (400), so that a sender checking only the
        // status does not count the batch as delivered. Each event's error is in `results`,
        // and all their violations in `error`.
        let violations: Vec<Value> = results
            .iter()
            .filter_map(|r| r["error"]["violations"].as_array())
            .flatten()
            .cloned()
            .collect();
        answer["error"] = json!({
            "code": ErrorCode::InvalidArgument.as_str(),
            "message": format!("none of the batch's {rejected} event(s) is valid; `results` says why for each"),
            "violations": violations,
        });
        return Ok((StatusCode::BAD_REQUEST, Json(answer)).into_response());
    }
    Ok(Json(answer).into_response())
}

async fn customerio_webhook(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = read_body(&s, &headers, body, MAX_WEBHOOK_BYTES).await?;
    let body = &body.bytes[..];
    let signed = || {
        let key = s.customerio_key.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "Customer.io webhooks are not configured: set --customerio-signing-key (LYTICS_RELAY_CUSTOMERIO_SIGNING_KEY)",
            )
        })?;
        signature::verify_customerio(
            key.expose(),
            signature_header(&headers, "X-CIO-Timestamp")?,
            signature_header(&headers, "X-CIO-Signature")?,
            body,
            now_ms() / 1000,
            i64::try_from(s.customerio_tolerance.as_secs()).unwrap_or(i64::MAX),
        )
        .map_err(unauthenticated)
    };
    signed().inspect_err(|e| s.ingest.unauthenticated(Source::CustomerIo, &e.message))?;
    let body = inflated(&headers, body, MAX_WEBHOOK_BYTES)?;
    let event = normalize::customerio_event(parse_json(&body)?, "", MAX_WEBHOOK_BYTES)?;
    let accepted = s
        .ingest
        .accept(vec![event], header(&headers, "traceparent"))
        .await?;
    let mut answer = accepted.first().map(accepted_json).unwrap_or_else(|| json!({}));
    answer["success"] = json!(true);
    Ok(Json(answer))
}

/// `GET /healthz`: 200 while serving (with paused integrations and their troubleshooting text),
/// 503 once shutdown has begun or while the queue refuses everything until a restart.
async fn health(State(s): State<HttpState>) -> (StatusCode, Json<Value>) {
    let fault = s.queue.fault();
    let connected = s.queue.connected();
    let (code, status) = health_status(s.serving.load(Ordering::SeqCst), fault.is_some(), connected);
    let mut queue = json!({"backend": s.queue.backend(), "connected": connected});
    if let Some(why) = fault {
        queue["fault"] = json!(why);
    }
    let paused: Vec<Value> = s
        .delivery
        .paused()
        .into_iter()
        // Lytics' own answer stays on the admin API: this endpoint needs no token, and an
        // upstream's error text is not ours to publish.
        .map(|(id, p)| json!({"integration": id, "status": p.status, "hint": p.hint, "stream": p.stream, "since_ms": p.since_ms}))
        .collect();
    // Delivery keeps state for integrations since replaced or removed: only those in force show.
    let live: std::collections::HashSet<String> = s
        .ingest
        .integrations()
        .snapshot()
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    let mut limits = s.delivery.limits();
    limits.retain(|id, _| live.contains(id));
    let mut outages = s.delivery.outages();
    outages.retain(|id, _| live.contains(id));
    let body = json!({
        "status": status,
        "rules_version": s.ingest.rules().current().version().to_string(),
        "queue_depth": s.queue.depth(),
        "queue": queue,
        "paused_integrations": paused,
        "calls_in_flight_limit": limits,
        "lytics_outages": outages,
    });
    (code, Json(body))
}

/// `GET /livez`, for a liveness probe: 503 only while the queue refuses everything until the relay
/// restarts, the one state a restart cures. A shared queue out of reach or a shutdown under way
/// are for readiness (`/healthz`): restarting a relay then would not help, and one that cannot
/// reach NATS at start refuses to start.
async fn live(State(s): State<HttpState>) -> (StatusCode, Json<Value>) {
    match s.queue.fault() {
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failing", "fault": why})),
        ),
        None => (StatusCode::OK, Json(json!({"status": "alive"}))),
    }
}

/// The health answer's code and status: serving, or not (shutting down; a queue that refuses
/// everything until a restart, which orchestrators should act on; or a shared queue's server
/// out of reach, during which events are refused).
fn health_status(serving: bool, queue_fault: bool, connected: bool) -> (StatusCode, &'static str) {
    match (serving, queue_fault, connected) {
        (_, true, _) => (StatusCode::SERVICE_UNAVAILABLE, "failing"),
        (false, false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not_serving"),
        (true, false, false) => (StatusCode::SERVICE_UNAVAILABLE, "queue_unreachable"),
        (true, false, true) => (StatusCode::OK, "serving"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_while_the_queue_refuses_everything() {
        assert_eq!(health_status(true, false, true), (StatusCode::OK, "serving"));
        assert_eq!(
            health_status(false, false, true),
            (StatusCode::SERVICE_UNAVAILABLE, "not_serving")
        );
        assert_eq!(
            health_status(true, true, true),
            (StatusCode::SERVICE_UNAVAILABLE, "failing")
        );
        assert_eq!(
            health_status(false, true, true),
            (StatusCode::SERVICE_UNAVAILABLE, "failing")
        );
        assert_eq!(
            health_status(true, false, false),
            (StatusCode::SERVICE_UNAVAILABLE, "queue_unreachable")
        );
    }
}
