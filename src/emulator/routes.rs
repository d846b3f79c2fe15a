//! The emulator's HTTP surface: requests on Lytics' paths and `/_emulator/*` in, Lytics-shaped
//! JSON answers out.
//!
//! Handlers check the token, the account and the stream as Lytics does, in that order, then
//! hand the work to [`Emulator`]. Errors are `{"status":…,"message":…,"request_id":…}`;
//! successes are `{"status":200,"message":"success","data":…}`. `/_emulator/*` answers plain
//! JSON and needs no token. Handlers never hold a lock across an await and never decide merge
//! semantics.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};

use super::collect::{self, MAX_REQUEST_BYTES};
use super::faults::{FaultAction, Faults};
use super::{Emulator, FaultsApplied};

/// `GET /v2/stream/{name}/events` lists this many events unless told otherwise.
const DEFAULT_EVENTS_LIMIT: usize = 100;

/// LQL texts are small; this only stops a runaway client.
const MAX_QUERY_BYTES: usize = 1024 * 1024;

/// Builds the router over one emulator.
pub fn router(emulator: Emulator) -> Router {
    Router::new()
        .route("/collect/json/{stream}", post(collect))
        .route("/api/entity/user/{field}/{value}", get(entity))
        .route("/v2/stream/{name}/events", get(stream_events))
        .route("/api/query", post(register_query).get(list_queries))
        .route(
            "/_emulator/faults",
            put(put_faults).get(get_faults).delete(delete_faults),
        )
        .route("/_emulator/stats", get(stats))
        .route("/_emulator/reset", post(reset))
        .fallback(not_found)
        .with_state(emulator)
}

fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A Lytics error answer: `{"status":…,"message":…,"request_id":…}` with that status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "status": self.status.as_u16(),
            "message": self.message,
            "request_id": request_id(),
        });
        (self.status, Json(body)).into_response()
    }
}

fn success(data: Value) -> Response {
    Json(json!({"status": 200, "message": "success", "data": data})).into_response()
}

/// The answer to a collect request that drew a fault other than passing.
pub fn fault_response(action: FaultAction) -> Response {
    let error = match action {
        FaultAction::Error(code) => ApiError::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            format!("emulated fault: server error {code}"),
        ),
        // Lytics sends no `Retry-After` with its 429s, so neither does the emulator.
        FaultAction::Throttle => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "emulated fault: rate limited"),
        FaultAction::Drop => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "emulated fault: connection dropped (answered because the router is not served by `Emulator::serve`)",
        ),
        FaultAction::Pass => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no fault drawn"),
    };
    error.into_response()
}

fn query_params(uri: &Uri) -> Result<HashMap<String, String>, ApiError> {
    axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

/// Reads the query string and checks the token, as every Lytics path does first. The token
/// comes from the `Authorization` header (bare, or leniently `Bearer <token>`), else from
/// `?access_token=` or the legacy `?key=`.
fn authorized_params(
    emulator: &Emulator,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<HashMap<String, String>, ApiError> {
    checked_params(emulator, uri, headers, false)
}

/// Like [`authorized_params`] for the read-only inspection paths (profiles, stream events):
/// a request without any token is let through, so that `curl localhost:8085/api/entity/…`
/// works against the local emulator; a wrong token is still refused. Real Lytics always
/// requires the token.
fn readable_params(
    emulator: &Emulator,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<HashMap<String, String>, ApiError> {
    checked_params(emulator, uri, headers, true)
}

fn checked_params(
    emulator: &Emulator,
    uri: &Uri,
    headers: &HeaderMap,
    anonymous_reads: bool,
) -> Result<HashMap<String, String>, ApiError> {
    let params = query_params(uri)?;
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let v = v.trim();
            match v.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                _ => v,
            }
        })
        .filter(|t| !t.is_empty());
    let token = from_header
        .or_else(|| params.get("access_token").map(String::as_str))
        .or_else(|| params.get("key").map(String::as_str));
    match token {
        None if anonymous_reads => Ok(params),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing api token: send it in the `Authorization` header",
        )),
        Some(token) if !emulator.token_matches(token) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid api token: regenerate it in Lytics Account > API Tokens and update the config",
        )),
        Some(_) => Ok(params),
    }
}

fn unknown_stream(stream: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "stream `{stream}` not found: it must match a stream in Data > Data Streams exactly (case-sensitive)"
        ),
    )
}

/// Reads a body up to `limit` bytes, refusing early when `Content-Length` already says more;
/// `too_large` is the message of the 413 answer.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    too_large: &str,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, too_large);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut chunks = body.into_data_stream();
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("failed to read body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

async fn collect(
    State(emulator): State<Emulator>,
    Path(stream): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    if parts.extensions.get::<FaultsApplied>().is_none() {
        let (latency, action) = emulator.begin_collect();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if action != FaultAction::Pass {
            return Ok(fault_response(action));
        }
    }
    let params = authorized_params(&emulator, &parts.uri, &parts.headers)?;
    if let Some(account) = params.get("account_id")
        && !emulator.account_matches(account)
    {
        return Err(ApiError::bad_request(format!(
            "invalid account id `{account}`: check Account > Account Settings"
        )));
    }
    if !emulator.has_stream(&stream) {
        return Err(unknown_stream(&stream));
    }
    let bytes = read_body(
        &parts.headers,
        body,
        MAX_REQUEST_BYTES,
        "request body over 10 MB: send smaller batches",
    )
    .await?;
    let dryrun = flag(&params, "dryrun");
    let timestamp_field = params
        .get("timestamp_field")
        .map(String::as_str)
        .filter(|f| !f.is_empty());
    // A sink checks the body's shape and sizes without building values, unless a poison
    // fault needs to look inside the records.
    if emulator.is_sink() && !emulator.faults().reject_poison {
        let counted = collect::count_body(&bytes).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if !dryrun {
            emulator.count(counted.accepted, counted.rejected);
        }
        return Ok(collected(
            counted.accepted,
            counted.rejected,
            dryrun,
            timestamp_field,
            &params,
        ));
    }
    let received_at = Utc::now();
    let parsed = collect::parse_body(&bytes, timestamp_field, received_at.timestamp_millis())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if emulator.faults().reject_poison
        && parsed
            .accepted
            .iter()
            .any(|a| a.record.get("_poison") == Some(&Value::Bool(true)))
    {
        return Err(ApiError::bad_request(
            "invalid record: field `_poison` cannot be stored".to_string(),
        ));
    }
    let (message_count, rejected_count) = (parsed.accepted.len(), parsed.rejected);
    if !dryrun {
        emulator.ingest(&stream, parsed.accepted, rejected_count, received_at);
    }
    Ok(collected(
        message_count,
        rejected_count,
        dryrun,
        timestamp_field,
        &params,
    ))
}

/// Lytics' answer to a collect request it took.
fn collected(
    message_count: usize,
    rejected_count: usize,
    dryrun: bool,
    timestamp_field: Option<&str>,
    params: &HashMap<String, String>,
) -> Response {
    success(json!({
        "message_count": message_count,
        "rejected_count": rejected_count,
        "content-type": "application/json",
        "droperrors": false,
        "dryrun": dryrun,
        "timestamp_field": timestamp_field.unwrap_or(""),
        "filename": params.get("filename").map_or("", String::as_str),
    }))
}

async fn entity(
    State(emulator): State<Emulator>,
    Path((field, value)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    readable_params(&emulator, &uri, &headers)?;
    Ok(match emulator.profile(&field, &value) {
        Some(profile) => success(Value::Object(profile)),
        // Lytics answers an unknown user with 200 and this message, not with 404.
        None => Json(json!({"status": 200, "message": "Not Found", "data": null})).into_response(),
    })
}

async fn stream_events(
    State(emulator): State<Emulator>,
    Path(stream): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = readable_params(&emulator, &uri, &headers)?;
    let limit = match params.get("limit") {
        None => DEFAULT_EVENTS_LIMIT,
        Some(limit) => limit
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("`limit` must be a non-negative integer (0 means all)"))?,
    };
    let events = emulator
        .recent_events(&stream, limit)
        .ok_or_else(|| unknown_stream(&stream))?;
    Ok(success(Value::Array(
        events.iter().map(|e| e.to_json()).collect(),
    )))
}

async fn register_query(
    State(emulator): State<Emulator>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorized_params(&emulator, &uri, &headers)?;
    let bytes = read_body(&headers, body, MAX_QUERY_BYTES, "query text over 1 MB").await?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| ApiError::bad_request("query text is not valid utf-8"))?;
    let query = emulator
        .register_lql(text)
        .map_err(|e| ApiError::bad_request(format!("invalid lql: {e}")))?;
    Ok(success(json!({
        "alias": query.alias,
        "from": query.from,
        "by": query.by,
        "fields": query.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
    })))
}

async fn list_queries(
    State(emulator): State<Emulator>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorized_params(&emulator, &uri, &headers)?;
    Ok(success(json!(emulator.queries())))
}

async fn put_faults(State(emulator): State<Emulator>, body: Bytes) -> Result<Response, ApiError> {
    let invalid = |message: String| ApiError::bad_request(format!("invalid faults: {message}"));
    let faults: Faults = serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
    faults.validate().map_err(invalid)?;
    emulator.set_faults(faults);
    Ok(Json(emulator.faults()).into_response())
}

async fn get_faults(State(emulator): State<Emulator>) -> Response {
    Json(emulator.faults()).into_response()
}

async fn delete_faults(State(emulator): State<Emulator>) -> Response {
    emulator.set_faults(Faults::default());
    Json(emulator.faults()).into_response()
}

async fn stats(State(emulator): State<Emulator>) -> Response {
    Json(emulator.stats()).into_response()
}

async fn reset(State(emulator): State<Emulator>) -> Response {
    emulator.reset();
    Json(json!({"status": 200, "message": "success"})).into_response()
}

async fn not_found(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for `{method} {}`", uri.path()),
    )
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::lql::tests::CUSTOMERIO_QUERY;
    use super::super::{EmulatorConfig, EmulatorStats};
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token";
    const ACCOUNT: &str = "acct-1";

    /// An emulator served on a loopback port 0, stopped when dropped.
    struct TestServer {
        base: String,
        emulator: Emulator,
        client: reqwest::Client,
        stop: Option<oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    }

    impl TestServer {
        async fn start() -> TestServer {
            Self::serve(Emulator::new(Self::config())).await
        }

        fn config() -> EmulatorConfig {
            EmulatorConfig {
                api_token: TOKEN.into(),
                account_id: ACCOUNT.into(),
                streams: vec!["default".into(), "customerio_events".into()],
            }
        }

        async fn serve(emulator: Emulator) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(emulator.clone().serve(listener, async {
                let _ = stopped.await;
            }));
            TestServer {
                base,
                emulator,
                client: reqwest::Client::new(),
                stop: Some(stop),
                task: Some(task),
            }
        }

        fn url(&self, path: &str) -> String {
            format!("{}{path}", self.base)
        }

        async fn collect(&self, path_and_query: &str, body: &Value) -> (u16, Value) {
            self.send(
                self.client
                    .post(self.url(path_and_query))
                    .header("Authorization", TOKEN)
                    .json(body),
            )
            .await
        }

        async fn get(&self, path: &str) -> (u16, Value) {
            self.send(self.client.get(self.url(path)).header("Authorization", TOKEN))
                .await
        }

        async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
            let response = request.send().await.expect("request answered");
            let status = response.status().as_u16();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            (status, body)
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(task) = self.task.take() {
                let done = tokio::time::timeout(Duration::from_secs(10), task).await;
                assert!(matches!(done, Ok(Ok(Ok(())))), "serve returned after shutdown");
            }
        }
    }

    #[tokio::test]
    async fn collect_requires_the_token_and_accepts_header_bearer_and_query_forms() {
        let server = TestServer::start().await;
        let url = server.url("/collect/json/default");
        let body = json!({"user_id": "u1"});
        let (status, missing) = server.send(server.client.post(&url).json(&body)).await;
        assert_eq!(status, 401);
        assert_eq!(missing["status"], 401);
        assert!(
            missing["message"]
                .as_str()
                .is_some_and(|m| m.contains("missing api token"))
        );
        assert!(missing["request_id"].is_string());
        let (status, wrong) = server
            .send(
                server
                    .client
                    .post(&url)
                    .header("Authorization", "nope")
                    .json(&body),
            )
            .await;
        assert_eq!(status, 401);
        assert!(
            wrong["message"]
                .as_str()
                .is_some_and(|m| m.contains("invalid api token"))
        );
        for request in [
            server.client.post(&url).header("Authorization", TOKEN),
            server
                .client
                .post(&url)
                .header("Authorization", format!("Bearer {TOKEN}")),
            server.client.post(format!("{url}?access_token={TOKEN}")),
        ] {
            let (status, ok) = server.send(request.json(&body)).await;
            assert_eq!(status, 200, "{ok}");
        }
        assert_eq!(server.emulator.stream_events("default").len(), 3);
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_stream_is_404_and_names_are_case_sensitive() {
        let server = TestServer::start().await;
        let (status, body) = server.collect("/collect/json/Default", &json!({"a": 1})).await;
        assert_eq!(status, 404);
        assert_eq!(body["status"], 404);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("stream `Default` not found"))
        );
        server.emulator.add_stream("Default");
        let (status, _) = server.collect("/collect/json/Default", &json!({"a": 1})).await;
        assert_eq!(status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_different_account_id_is_400_and_the_right_one_passes() {
        let server = TestServer::start().await;
        let (status, body) = server
            .collect("/collect/json/default?account_id=other", &json!({"a": 1}))
            .await;
        assert_eq!(status, 400);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("invalid account id `other`"))
        );
        let (status, _) = server
            .collect(
                &format!("/collect/json/default?account_id={ACCOUNT}"),
                &json!({"a": 1}),
            )
            .await;
        assert_eq!(status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn success_answers_have_the_lytics_shape_for_objects_and_arrays() {
        let server = TestServer::start().await;
        let (status, one) = server
            .collect(
                "/collect/json/default?timestamp_field=ts&filename=f.json",
                &json!({"ts": 1}),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            one,
            json!({"status": 200, "message": "success", "data": {
                "message_count": 1, "rejected_count": 0, "content-type": "application/json",
                "droperrors": false, "dryrun": false, "timestamp_field": "ts", "filename": "f.json"
            }})
        );
        let (status, many) = server
            .collect("/collect/json/default", &json!([{"a": 1}, {"a": 2}]))
            .await;
        assert_eq!(status, 200);
        assert_eq!(many["data"]["message_count"], 2);
        assert_eq!(many["data"]["timestamp_field"], "");
        assert_eq!(server.emulator.stream_events("default").len(), 3);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_sink_answers_as_the_full_emulator_and_only_counts_records() {
        let full = TestServer::start().await;
        let sink = TestServer::serve(Emulator::sink(TestServer::config())).await;
        let big = |n: usize| json!({"pad": "x".repeat(n)});
        let requests = [
            ("/collect/json/default?timestamp_field=ts", json!({"ts": 1})),
            (
                "/collect/json/default",
                json!([big(5000), big(20_000), 7, {"ok": true}]),
            ),
            ("/collect/json/default", json!(3)),
            ("/collect/json/nope", json!({"a": 1})),
            ("/collect/json/default?account_id=999", json!({"a": 1})),
            ("/collect/json/default?dryrun=true", json!([{"a": 1}])),
        ];
        // Error answers carry a request id of their own.
        let answer = |(status, mut body): (u16, Value)| {
            if let Some(m) = body.as_object_mut() {
                m.remove("request_id");
            }
            (status, body)
        };
        for (path, body) in &requests {
            let want = answer(full.collect(path, body).await);
            assert_eq!(answer(sink.collect(path, body).await), want, "{path} {body:.60}");
        }
        let not_json = |server: &TestServer| {
            server
                .client
                .post(server.url("/collect/json/default"))
                .header("Authorization", TOKEN)
                .body("{nope")
        };
        let want = answer(full.send(not_json(&full)).await);
        assert_eq!(want.0, 400);
        assert_eq!(answer(sink.send(not_json(&sink)).await), want);
        assert_eq!(sink.emulator.stats(), full.emulator.stats());
        assert_eq!(sink.emulator.stats().records, 3);
        assert_eq!(sink.emulator.stats().rejected, 2);
        assert!(sink.emulator.stream_events("default").is_empty());
        assert_eq!(full.emulator.stream_events("default").len(), 3);
        full.stop().await;
        sink.stop().await;
    }

    #[tokio::test]
    async fn oversized_and_non_object_records_are_counted_in_rejected_count() {
        let server = TestServer::start().await;
        let big = |n: usize| json!({"pad": "x".repeat(n)});
        let (status, single) = server.collect("/collect/json/default", &big(5000)).await;
        assert_eq!(status, 200);
        assert_eq!(single["data"]["message_count"], 0);
        assert_eq!(single["data"]["rejected_count"], 1);
        let (_, batch) = server
            .collect(
                "/collect/json/default",
                &json!([big(5000), big(20_000), 7, {"ok": true}]),
            )
            .await;
        assert_eq!(batch["data"]["message_count"], 2);
        assert_eq!(batch["data"]["rejected_count"], 2);
        assert_eq!(server.emulator.stream_events("default").len(), 2);
        assert_eq!(server.emulator.stats().rejected, 3);
        server.stop().await;
    }

    #[tokio::test]
    async fn bodies_that_are_not_objects_or_too_large_are_refused() {
        let server = TestServer::start().await;
        let (status, body) = server.collect("/collect/json/default", &json!("text")).await;
        assert_eq!(status, 400);
        assert_eq!(body["status"], 400);
        let (status, _) = server
            .send(
                server
                    .client
                    .post(server.url("/collect/json/default"))
                    .header("Authorization", TOKEN)
                    .body("{not json"),
            )
            .await;
        assert_eq!(status, 400);
        let huge = vec![b' '; MAX_REQUEST_BYTES + 1];
        let (status, body) = server
            .send(
                server
                    .client
                    .post(server.url("/collect/json/default"))
                    .header("Authorization", TOKEN)
                    .body(huge),
            )
            .await;
        assert_eq!(status, 413);
        assert_eq!(body["status"], 413);
        server.stop().await;
    }

    #[tokio::test]
    async fn dryrun_validates_but_stores_nothing() {
        let server = TestServer::start().await;
        let (status, body) = server
            .collect(
                "/collect/json/default?dryrun=true",
                &json!([{"user_id": "u1"}, 5]),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["dryrun"], true);
        assert_eq!(body["data"]["message_count"], 1);
        assert_eq!(body["data"]["rejected_count"], 1);
        assert!(server.emulator.stream_events("default").is_empty());
        assert_eq!(server.emulator.profile("user_id", "u1"), None);
        assert_eq!(server.emulator.stats().records, 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn timestamp_field_sets_event_times_and_events_list_newest_first() {
        let server = TestServer::start().await;
        let before = Utc::now().timestamp_millis();
        let records = json!([
            {"n": 1, "ts": 1_613_063_089_000_i64},
            {"n": 2, "ts": 1_613_063_089},
            {"n": 3, "ts": "1613063089000"},
            {"n": 4, "ts": "2021-02-11T17:04:49Z"},
            {"n": 5}
        ]);
        server
            .collect("/collect/json/default?timestamp_field=ts", &records)
            .await;
        let stored = server.emulator.stream_events("default");
        let t = 1_613_063_089_000;
        assert_eq!(
            stored[..4].iter().map(|e| e.event_time_ms).collect::<Vec<_>>(),
            [t, t, t, t]
        );
        assert!(stored[4].event_time_ms >= before);

        let (status, listed) = server.get("/v2/stream/default/events?limit=2").await;
        assert_eq!(status, 200);
        let data = listed["data"].as_array().expect("array");
        assert_eq!(data.len(), 2);
        assert_eq!(data[0]["record"]["n"], 5);
        assert_eq!(data[1]["record"]["n"], 4);
        assert_eq!(data[1]["event_time_ms"], t);
        let received = data[0]["received_at"].as_str().expect("string");
        assert!(chrono::DateTime::parse_from_rfc3339(received).is_ok());

        for i in 0..120 {
            server.collect("/collect/json/default", &json!({"i": i})).await;
        }
        let (_, default_limit) = server.get("/v2/stream/default/events").await;
        assert_eq!(default_limit["data"].as_array().map(Vec::len), Some(100));
        let (_, all) = server.get("/v2/stream/default/events?limit=0").await;
        assert_eq!(all["data"].as_array().map(Vec::len), Some(125));
        let (status, _) = server.get("/v2/stream/nope/events").await;
        assert_eq!(status, 404);
        let (status, _) = server.get("/v2/stream/default/events?limit=x").await;
        assert_eq!(status, 400);
        let (status, _) = server
            .send(server.client.get(server.url("/v2/stream/default/events")))
            .await;
        assert_eq!(status, 200, "local inspection needs no token");
        let (status, _) = server
            .send(
                server
                    .client
                    .get(server.url("/v2/stream/default/events"))
                    .header("Authorization", "wrong"),
            )
            .await;
        assert_eq!(status, 401);
        server.stop().await;
    }

    #[tokio::test]
    async fn profiles_stitch_records_and_merge_when_a_record_links_them() {
        let server = TestServer::start().await;
        let srv = &server;
        let post = |body: Value| async move {
            srv.collect("/collect/json/default?timestamp_field=ts", &body)
                .await
        };
        post(json!({"email": "Ann@Example.com", "plan": "free", "ts": 100})).await;
        post(json!({"user_id": "u1", "city": "Oslo", "ts": 200})).await;
        let (status, unknown) = server.get("/api/entity/user/user_id/u1").await;
        assert_eq!(status, 200);
        assert!(unknown["data"].get("plan").is_none());
        // Both identities in one record: the two profiles merge.
        post(json!({"email": "ann@example.com", "user_id": "u1", "plan": "pro", "ts": 300})).await;
        let (status, by_user) = server.get("/api/entity/user/user_id/u1").await;
        assert_eq!(status, 200);
        assert_eq!(by_user["message"], "success");
        assert_eq!(by_user["data"]["plan"], "pro");
        assert_eq!(by_user["data"]["city"], "Oslo");
        let (_, by_email) = server.get("/api/entity/user/email/ANN@example.com").await;
        assert_eq!(by_email["data"], by_user["data"]);
        let (_, by_field) = server.get("/api/entity/user/city/Oslo").await;
        assert_eq!(by_field["data"], by_user["data"]);

        let (status, missing) = server.get("/api/entity/user/email/nobody@x.io").await;
        assert_eq!(status, 200);
        assert_eq!(
            missing,
            json!({"status": 200, "message": "Not Found", "data": null})
        );
        let (status, _) = server
            .send(server.client.get(server.url("/api/entity/user/user_id/u1")))
            .await;
        assert_eq!(status, 200, "local inspection needs no token");
        let (status, _) = server
            .send(
                server
                    .client
                    .get(server.url("/api/entity/user/user_id/u1"))
                    .header("Authorization", "wrong"),
            )
            .await;
        assert_eq!(status, 401);
        server.stop().await;
    }

    #[tokio::test]
    async fn registered_lql_maps_stream_records_onto_user_fields() {
        let server = TestServer::start().await;
        let srv = &server;
        let register = |text: &'static str| async move {
            srv.send(
                srv.client
                    .post(srv.url("/api/query"))
                    .header("Authorization", TOKEN)
                    .header("Content-Type", "text/plain")
                    .body(text),
            )
            .await
        };
        let (status, registered) = register(CUSTOMERIO_QUERY).await;
        assert_eq!(status, 200, "{registered}");
        assert_eq!(registered["data"]["alias"], "customerio_user_fields");
        assert_eq!(registered["data"]["from"], "customerio_events");
        assert_eq!(registered["data"]["fields"].as_array().map(Vec::len), Some(7));

        let (status, bad) = register("SELECT x AS y FROM s INTO user BY y ALIAS").await;
        assert_eq!(status, 400);
        assert!(
            bad["message"]
                .as_str()
                .is_some_and(|m| m.contains("line 1, column 42")),
            "{bad}"
        );

        let record = json!({
            "email": "Test@Example.com", "cio_events": "email_opened", "cio_hourlyopens": "17",
            "cio_last_open_ts": 1_613_063_089_000_i64, "last_active_ts": 1_613_063_089_000_i64,
            "cio_campaign_ids": "123", "cio_subjects": "Test Email", "ignored": "x"
        });
        let (status, _) = server
            .collect(
                "/collect/json/customerio_events?timestamp_field=last_active_ts",
                &json!([record, record]),
            )
            .await;
        assert_eq!(status, 200);
        let (_, profile) = server.get("/api/entity/user/email/test@example.com").await;
        assert_eq!(
            profile["data"],
            json!({
                "cio_campaign_ids": ["123"],
                "cio_events": {"email_opened": 2},
                "cio_hourlyopens": {"17": 2},
                "cio_last_open_ts": "2021-02-11T17:04:49Z",
                "cio_subjects": ["Test Email"],
                "email": "test@example.com",
                "last_active_ts": "2021-02-11T17:04:49Z",
                // A field no query selects is copied as it is (latest wins), as on a stream
                // without queries.
                "ignored": "x"
            })
        );

        let (status, listed) = server.get("/api/query").await;
        assert_eq!(status, 200);
        assert_eq!(listed["data"][0]["alias"], "customerio_user_fields");
        assert_eq!(listed["data"][0]["from"], "customerio_events");
        assert_eq!(listed["data"][0]["text"], CUSTOMERIO_QUERY);
        server.stop().await;
    }

    #[tokio::test]
    async fn error_and_throttle_faults_answer_5xx_and_429_on_collect_only() {
        let server = TestServer::start().await;
        let srv = &server;
        let put = |faults: Value| async move {
            srv.send(srv.client.put(srv.url("/_emulator/faults")).json(&faults))
                .await
        };
        let (status, set) = put(json!({"error_rate": 1.0})).await;
        assert_eq!(status, 200);
        assert_eq!(set["error_rate"], 1.0);
        assert_eq!(set["drop_rate"], 0.0);
        for _ in 0..5 {
            let (status, body) = server.collect("/collect/json/default", &json!({"a": 1})).await;
            assert!([500, 502, 503].contains(&status), "{status}");
            assert_eq!(body["status"], status);
        }
        // Other paths are never faulted.
        let (status, _) = server.get("/v2/stream/default/events").await;
        assert_eq!(status, 200);

        put(json!({"throttle_rate": 1.0})).await;
        let response = server
            .client
            .post(server.url("/collect/json/default"))
            .header("Authorization", TOKEN)
            .json(&json!({"a": 1}))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status().as_u16(), 429);
        assert!(response.headers().get("retry-after").is_none());

        let (status, bad) = put(json!({"error_rate": 2})).await;
        assert_eq!(status, 400);
        assert!(bad["message"].as_str().is_some_and(|m| m.contains("error_rate")));
        let (status, _) = put(json!({"eror_rate": 0.5})).await;
        assert_eq!(status, 400);

        let (status, cleared) = server
            .send(server.client.delete(server.url("/_emulator/faults")))
            .await;
        assert_eq!(status, 200);
        assert_eq!(cleared, json!(Faults::default()));
        let (status, _) = server.collect("/collect/json/default", &json!({"a": 1})).await;
        assert_eq!(status, 200);
        let (_, stats) = server
            .send(server.client.get(server.url("/_emulator/stats")))
            .await;
        assert_eq!(
            stats,
            json!({"collect_requests": 7, "records": 1, "rejected": 0, "faulted": 6})
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn drop_fault_closes_the_connection_without_a_response() {
        let server = TestServer::start().await;
        server.emulator.set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        });
        for _ in 0..3 {
            let result = server
                .client
                .post(server.url("/collect/json/default"))
                .header("Authorization", TOKEN)
                .json(&json!({"a": 1}))
                .send()
                .await;
            let error = result.expect_err("the connection is dropped");
            // hyper reports the closed connection as an incomplete message: no status, no body.
            assert!(
                error.is_request() && !error.is_status() && !error.is_timeout(),
                "{error:?}"
            );
        }
        let (_, faults) = server
            .send(server.client.get(server.url("/_emulator/faults")))
            .await;
        assert_eq!(faults["drop_rate"], 1.0);
        server
            .send(server.client.delete(server.url("/_emulator/faults")))
            .await;
        let (status, _) = server.collect("/collect/json/default", &json!({"a": 1})).await;
        assert_eq!(status, 200);
        assert_eq!(
            server.emulator.stats(),
            EmulatorStats {
                collect_requests: 4,
                records: 1,
                rejected: 0,
                faulted: 3
            }
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn latency_fault_delays_collect_calls() {
        let server = TestServer::start().await;
        server.emulator.set_faults(Faults {
            latency_ms: 150,
            ..Faults::default()
        });
        let started = Instant::now();
        let (status, _) = server.collect("/collect/json/default", &json!({"a": 1})).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() >= Duration::from_millis(150));
        server.stop().await;
    }

    #[tokio::test]
    async fn reset_clears_streams_profiles_and_stats_but_keeps_queries() {
        let server = TestServer::start().await;
        server
            .emulator
            .register_lql(CUSTOMERIO_QUERY)
            .expect("valid query");
        server
            .collect("/collect/json/default", &json!({"user_id": "u1"}))
            .await;
        let (status, body) = server
            .send(server.client.post(server.url("/_emulator/reset")))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["message"], "success");
        assert!(server.emulator.stream_events("default").is_empty());
        assert_eq!(server.emulator.profile("user_id", "u1"), None);
        assert_eq!(server.emulator.stats(), EmulatorStats::default());
        assert_eq!(server.emulator.queries().len(), 1);
        let (status, _) = server.collect("/collect/json/default", &json!({"a": 1})).await;
        assert_eq!(status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_answer_a_lytics_404() {
        let server = TestServer::start().await;
        let (status, body) = server.get("/api/nothing").await;
        assert_eq!(status, 404);
        assert_eq!(body["status"], 404);
        server.stop().await;
    }

    #[tokio::test]
    async fn router_alone_answers_a_drop_fault_with_502() {
        let emulator = Emulator::new(EmulatorConfig {
            api_token: TOKEN.into(),
            account_id: ACCOUNT.into(),
            streams: vec!["default".into()],
        });
        emulator.set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        });
        let request = http::Request::post("/collect/json/default")
            .header("Authorization", TOKEN)
            .body(Body::from("{}"))
            .expect("request");
        let Ok(response) = emulator.router().oneshot(request).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(emulator.stats().faulted, 1);
    }
}
