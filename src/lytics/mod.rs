//! The Lytics collect API client: build the request (pure), send it, classify the answer.
//!
//! Input: serialised records and an integration's target. Output: an [`Outcome`]: delivered
//! (with `message_count` / `rejected_count` from the body), retry, setup error (with the seed's
//! troubleshooting text) or bad payload. The token travels only in the `Authorization` header,
//! never in a URL. This module never decides *when* to retry; delivery does.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use reqwest::Url;
use serde::Deserialize;

use crate::integration::Secret;

/// Lytics caps one request at 10 MB.
pub const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// Lytics caps a record sent alone at 4 KB.
pub const MAX_SINGLE_RECORD_BYTES: usize = 4 * 1024;
/// Lytics caps a record inside a batch at 16 KB.
pub const MAX_BATCH_RECORD_BYTES: usize = 16 * 1024;

/// The seed's troubleshooting text for a 401.
pub const HINT_401: &str = "invalid API token: regenerate the token in Lytics Account > API Tokens and update the integration config";
/// For a 403.
pub const HINT_403: &str = "the API token lacks the data-write permission: create a token with data write permission in Lytics Account > API Tokens and update the integration config";
/// For a 404.
pub const HINT_404: &str = "incorrect stream name: verify the stream name exactly matches (case-sensitive) the stream in Lytics Data > Data Streams";
/// For a 400 naming the account.
pub const HINT_400_ACCOUNT: &str =
    "invalid account ID: verify the account ID in Lytics Account > Account Settings";

/// Where a collect call goes.
#[derive(Debug, Clone, Copy)]
pub struct CollectTarget<'a> {
    /// `https://api.lytics.io` or the emulator.
    pub base_url: &'a str,
    /// The stream.
    pub stream: &'a str,
    /// The account id, sent as `account_id`.
    pub account_id: &'a str,
    /// The record field holding the event time.
    pub timestamp_field: &'a str,
    /// Validate only.
    pub dryrun: bool,
}

/// The collect URL: `{base}/collect/json/{stream}?timestamp_field=…&account_id=…`. It never
/// carries the token, so it is safe to log and to put on spans.
pub fn collect_url(target: &CollectTarget<'_>) -> Result<Url, String> {
    let mut url =
        Url::parse(target.base_url).map_err(|e| format!("invalid Lytics URL `{}`: {e}", target.base_url))?;
    url.path_segments_mut()
        .map_err(|_| format!("invalid Lytics URL `{}`", target.base_url))?
        .pop_if_empty()
        .extend(["collect", "json", target.stream]);
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("timestamp_field", target.timestamp_field);
        q.append_pair("account_id", target.account_id);
        if target.dryrun {
            q.append_pair("dryrun", "true");
        }
    }
    Ok(url)
}

/// A JSON array of the records, which are each a serialised JSON object.
pub fn batch_body<'a>(records: impl IntoIterator<Item = &'a Bytes> + Clone) -> Bytes {
    let size: usize = records.clone().into_iter().map(|r| r.len() + 1).sum();
    let mut out = BytesMut::with_capacity(size + 2);
    out.put_u8(b'[');
    for (i, r) in records.into_iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.extend_from_slice(r);
    }
    out.put_u8(b']');
    out.freeze()
}

/// What Lytics answered.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Bytes,
    /// How long the call took.
    pub latency: Duration,
}

/// Why no answer came.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The call timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection failed or was dropped.
    #[error("connection failed: {0}")]
    Connect(String),
    /// Anything else on the way.
    #[error("request failed: {0}")]
    Other(String),
}

impl TransportError {
    /// The `error.type` span attribute.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "timeout",
            TransportError::Connect(_) => "connection_error",
            TransportError::Other(_) => "request_error",
        }
    }
}

/// What delivery sends collect calls with: the HTTP client, or a scripted one in tests.
#[async_trait::async_trait]
pub trait CollectSender: Send + Sync + 'static {
    /// Posts `body` to `url` with the token.
    async fn post(&self, url: Url, token: &Secret, body: Bytes) -> Result<Reply, TransportError>;
}

#[async_trait::async_trait]
impl CollectSender for LyticsClient {
    async fn post(&self, url: Url, token: &Secret, body: Bytes) -> Result<Reply, TransportError> {
        LyticsClient::post(self, url, token, body).await
    }
}

/// Sends collect calls.
#[derive(Debug, Clone)]
pub struct LyticsClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl LyticsClient {
    /// A client with a per-call timeout.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(32)
            .user_agent(concat!("lytics-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(LyticsClient { http, timeout })
    }

    /// Posts `body` to `url` with the bare token in `Authorization`.
    pub async fn post(&self, url: Url, token: &Secret, body: Bytes) -> Result<Reply, TransportError> {
        let started = Instant::now();
        let result = self
            .http
            .post(url)
            .header(http::header::AUTHORIZATION, token.expose())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = result.map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| self.transport(e))?;
        Ok(Reply {
            status,
            body,
            latency: started.elapsed(),
        })
    }

    /// Registers an LQL query: `POST {base}/api/query` with the query as `text/plain`.
    pub async fn push_query(
        &self,
        base_url: &str,
        token: &Secret,
        account_id: &str,
        lql: &str,
    ) -> Result<(), String> {
        let mut url = Url::parse(base_url).map_err(|e| format!("invalid Lytics URL `{base_url}`: {e}"))?;
        url.path_segments_mut()
            .map_err(|_| format!("invalid Lytics URL `{base_url}`"))?
            .pop_if_empty()
            .extend(["api", "query"]);
        url.query_pairs_mut().append_pair("account_id", account_id);
        let response = self
            .http
            .post(url.clone())
            .header(http::header::AUTHORIZATION, token.expose())
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(lql.to_string())
            .send()
            .await
            .map_err(|e| format!("POST {url}: {}", self.transport(e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        Err(format!(
            "POST {url} answered {status}: {}",
            body.chars().take(500).collect::<String>()
        ))
    }

    fn transport(&self, e: reqwest::Error) -> TransportError {
        if e.is_timeout() {
            TransportError::Timeout(self.timeout)
        } else if e.is_connect() || e.is_request() || e.is_body() {
            TransportError::Connect(error_chain(&e))
        } else {
            TransportError::Other(error_chain(&e))
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What a collect call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Lytics took the batch; `rejected_count > 0` is a partial failure.
    Delivered {
        /// Records Lytics accepted.
        message_count: Option<u64>,
        /// Records Lytics refused inside a 200.
        rejected_count: u64,
    },
    /// A passing failure: retry with backoff.
    Retry {
        /// The status, when Lytics answered.
        status: Option<u16>,
        /// What happened.
        reason: String,
    },
    /// The integration is set up wrong; retrying the same call cannot help.
    Setup {
        /// The status.
        status: u16,
        /// The seed's troubleshooting text.
        hint: &'static str,
        /// Lytics' own message.
        message: String,
    },
    /// Lytics refused the payload itself (400 not about the account, 413).
    BadPayload {
        /// The status.
        status: u16,
        /// Lytics' message.
        message: String,
    },
}

#[derive(Deserialize)]
struct Body {
    status: Option<u16>,
    message: Option<String>,
    data: Option<BodyData>,
}

#[derive(Deserialize)]
struct BodyData {
    message_count: Option<u64>,
    rejected_count: Option<u64>,
}

/// Whether a 400's message is about the account (the `account_id` sent), not the payload:
/// "invalid account id", "unknown account", "account not found". A payload error that merely
/// mentions a record field called `account` is not.
fn names_the_account(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "account id",
        "account_id",
        "accountid",
        "invalid account",
        "unknown account",
        "account not found",
        "no such account",
    ]
    .iter()
    .any(|phrase| m.contains(phrase))
}

/// Classifies an answer, reading the body of a 2xx too (a 200 whose body reports an error is
/// not a success).
pub fn classify(result: &Result<Reply, TransportError>) -> Outcome {
    let reply = match result {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Retry {
                status: None,
                reason: e.to_string(),
            };
        }
    };
    let body: Option<Body> = serde_json::from_slice(&reply.body).ok();
    let message = body
        .as_ref()
        .and_then(|b| b.message.clone())
        .unwrap_or_else(|| String::from_utf8_lossy(&reply.body).chars().take(300).collect());
    let status = match (reply.status, body.as_ref().and_then(|b| b.status)) {
        (200..=299, Some(inner)) if inner >= 400 => inner,
        (s, _) => s,
    };
    match status {
        200..=299 => {
            let data = body.as_ref().and_then(|b| b.data.as_ref());
            Outcome::Delivered {
                message_count: data.and_then(|d| d.message_count),
                rejected_count: data.and_then(|d| d.rejected_count).unwrap_or(0),
            }
        }
        401 => Outcome::Setup {
            status,
            hint: HINT_401,
            message,
        },
        403 => Outcome::Setup {
            status,
            hint: HINT_403,
            message,
        },
        404 => Outcome::Setup {
            status,
            hint: HINT_404,
            message,
        },
        400 if names_the_account(&message) => Outcome::Setup {
            status,
            hint: HINT_400_ACCOUNT,
            message,
        },
        400 | 413 | 422 => Outcome::BadPayload { status, message },
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            status: Some(status),
            reason: format!("Lytics answered {status}: {message}"),
        },
        other => Outcome::BadPayload {
            status: other,
            message: format!("unexpected status {other}: {message}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Result<Reply, TransportError> {
        Ok(Reply {
            status,
            body: Bytes::from(body.to_string()),
            latency: Duration::ZERO,
        })
    }

    #[test]
    fn url_carries_stream_timestamp_field_and_account_but_no_token() {
        let url = collect_url(&CollectTarget {
            base_url: "https://api.lytics.io/",
            stream: "Datafly Events",
            account_id: "1234",
            timestamp_field: "_ts",
            dryrun: true,
        })
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.lytics.io/collect/json/Datafly%20Events?timestamp_field=_ts&account_id=1234&dryrun=true"
        );
    }

    #[test]
    fn batch_body_is_a_json_array() {
        let a = Bytes::from_static(br#"{"a":1}"#);
        let b = Bytes::from_static(br#"{"b":2}"#);
        let body = batch_body([&a, &b]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!([{"a":1},{"b":2}]));
        assert_eq!(&batch_body([])[..], b"[]");
    }

    #[test]
    fn delivered_reads_counts_from_the_body() {
        let body = std::fs::read_to_string("tests/fixtures/lytics_collect_success.json").unwrap();
        assert_eq!(
            classify(&reply(200, &body)),
            Outcome::Delivered {
                message_count: Some(2),
                rejected_count: 0
            }
        );
        let partial = r#"{"status":200,"message":"success","data":{"message_count":3,"rejected_count":1}}"#;
        assert_eq!(
            classify(&reply(200, partial)),
            Outcome::Delivered {
                message_count: Some(3),
                rejected_count: 1
            }
        );
    }

    #[test]
    fn a_200_whose_body_reports_an_error_is_not_delivered() {
        let body = r#"{"status":401,"message":"invalid token"}"#;
        assert!(matches!(
            classify(&reply(200, body)),
            Outcome::Setup { status: 401, .. }
        ));
    }

    #[test]
    fn setup_errors_carry_the_seed_troubleshooting_text() {
        let cases = [
            (401, "{}", HINT_401),
            (403, "{}", HINT_403),
            (404, r#"{"status":404,"message":"stream not found"}"#, HINT_404),
            (
                400,
                r#"{"status":400,"message":"invalid account id 99"}"#,
                HINT_400_ACCOUNT,
            ),
        ];
        for (status, body, want) in cases {
            match classify(&reply(status, body)) {
                Outcome::Setup { hint, .. } => assert_eq!(hint, want),
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_400_about_the_payload_that_mentions_an_account_field_is_not_a_setup_error() {
        for (message, setup) in [
            ("field `account` must be a string", false),
            ("record 3: account is too long", false),
            (
                "invalid account id `other`: check Account > Account Settings",
                true,
            ),
            ("Unknown account", true),
            ("account not found", true),
        ] {
            let body = format!(r#"{{"status":400,"message":"{message}"}}"#);
            let outcome = classify(&reply(400, &body));
            assert_eq!(
                matches!(outcome, Outcome::Setup { .. }),
                setup,
                "{message}: {outcome:?}"
            );
            assert_eq!(matches!(outcome, Outcome::BadPayload { .. }), !setup, "{message}");
        }
    }

    #[test]
    fn retries_on_temporary_errors_and_refuses_bad_payloads() {
        for status in [408, 429, 500, 502, 503] {
            assert!(
                matches!(classify(&reply(status, "")), Outcome::Retry { .. }),
                "{status}"
            );
        }
        assert!(matches!(
            classify(&Err(TransportError::Timeout(Duration::from_secs(1)))),
            Outcome::Retry { status: None, .. }
        ));
        assert!(matches!(
            classify(&reply(400, r#"{"status":400,"message":"invalid json"}"#)),
            Outcome::BadPayload { status: 400, .. }
        ));
    }
}
