//! One small error-code type for every API boundary, so gRPC and HTTP always agree.
//!
//! Input: a failure an API reports to its caller. Output: a gRPC `Status` (with
//! `google.rpc.BadRequest` field violations that grpcurl decodes) or an HTTP JSON error body
//! `{"error":{"code":"…","message":"…","violations":[…]}}` (REFERENCE §2).

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;
use tonic_types::{ErrorDetails, StatusExt};

/// The error codes the relay answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or fails validation.
    InvalidArgument,
    /// Credentials are missing or wrong.
    Unauthenticated,
    /// The thing asked for does not exist.
    NotFound,
    /// The path exists, but not for this HTTP method.
    MethodNotAllowed,
    /// The thing to create exists already.
    AlreadyExists,
    /// The request body is too large.
    PayloadTooLarge,
    /// The request body did not arrive in time.
    RequestTimeout,
    /// The queue is full; retry later.
    ResourceExhausted,
    /// The relay cannot accept work right now (shutting down, store unavailable).
    Unavailable,
    /// The request conflicts with the current state.
    FailedPrecondition,
    /// A bug or an unexpected failure.
    Internal,
}

impl ErrorCode {
    /// The gRPC code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::MethodNotAllowed => tonic::Code::Unimplemented,
            ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorCode::PayloadTooLarge => tonic::Code::InvalidArgument,
            ErrorCode::RequestTimeout => tonic::Code::DeadlineExceeded,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status.
    pub fn http(self) -> StatusCode {
        match self {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Internal => "internal",
        }
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldViolation {
    /// The field's path, for example `event.type`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// An error answered to an API caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The code.
    pub code: ErrorCode,
    /// A readable message.
    pub message: String,
    /// The invalid fields, for validation errors.
    pub violations: Vec<FieldViolation>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
        }
    }

    /// A validation error listing the invalid fields.
    pub fn invalid(message: impl Into<String>, violations: Vec<FieldViolation>) -> Self {
        ApiError {
            violations,
            ..ApiError::new(ErrorCode::InvalidArgument, message)
        }
    }

    /// A validation error whose message lists every violation: "invalid `what`: `f` is …; …".
    pub fn violations(what: &str, violations: Vec<FieldViolation>) -> Self {
        let list: Vec<String> = violations
            .iter()
            .map(|v| format!("`{}` {}", v.field, v.description))
            .collect();
        ApiError::invalid(format!("invalid {what}: {}", list.join("; ")), violations)
    }

    /// A validation error about a single field.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let v = FieldViolation::new(field, description);
        let message = format!("invalid `{}`: {}", v.field, v.description);
        ApiError::invalid(message, vec![v])
    }

    /// An internal failure; the message is logged, the caller sees a generic text.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, message)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let mut details = ErrorDetails::new();
        let any = !e.violations.is_empty() || e.retry_after.is_some();
        for v in &e.violations {
            details.add_bad_request_violation(v.field.clone(), v.description.clone());
        }
        if let Some(secs) = e.retry_after {
            details.set_retry_info(Some(std::time::Duration::from_secs(secs)));
        }
        if !any {
            tonic::Status::new(e.code.grpc(), e.message)
        } else {
            tonic::Status::with_error_details(e.code.grpc(), e.message, details)
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    violations: &'a [FieldViolation],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorInner {
                code: self.code.as_str(),
                message: &self.message,
                violations: &self.violations,
            },
        };
        let mut response = (self.code.http(), Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = http::HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        response
    }
}

/// A JSON decoding error's text without the value it quotes: `invalid type: string "…",
/// expected …` becomes `invalid type: string, expected …`, so that a secret sent in the wrong
/// shape (an `api_token` as a number, a `config` as a string) is not repeated in the answer.
pub fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = text.strip_prefix(prefix) else {
            continue;
        };
        let Some(expected) = rest.find(", expected ") else {
            continue;
        };
        let kind = ["string", "integer", "floating point", "boolean", "character"]
            .into_iter()
            .find(|k| rest.starts_with(&format!("{k} ")));
        if let Some(kind) = kind {
            return format!("{prefix}{kind}{}", &rest[expected..]);
        }
    }
    text
}

/// The answer to a path no HTTP route serves, in the error shape of every other refusal.
pub async fn no_route(uri: http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route `{}` (the README lists the HTTP API)", uri.path()),
    )
}

/// The answer to a method a route does not take (axum adds the `Allow` header).
pub async fn wrong_method(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("`{}` does not take {method}", uri.path()),
    )
}

/// axum's `Query`, refusing a query string that does not fit (`?limit=abc`) with the JSON error
/// body every other refusal has, instead of axum's plain text.
pub struct QueryOf<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for QueryOf<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryOf(v)),
            Err(e) => Err(query_error(&e.body_text())),
        }
    }
}

/// A query-string refusal on the parameter it is about: axum says "Failed to deserialize query
/// string: limit: invalid digit found in string"; the violation is on `limit`.
fn query_error(text: &str) -> ApiError {
    let detail = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(text);
    match detail.split_once(": ") {
        Some((name, why))
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') =>
        {
            ApiError::field(name, why)
        }
        _ => ApiError::field("query", detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_refusal_names_its_parameter() {
        let e = query_error("Failed to deserialize query string: limit: invalid digit found in string");
        assert_eq!(
            (
                e.violations[0].field.as_str(),
                e.violations[0].description.as_str()
            ),
            ("limit", "invalid digit found in string")
        );
        let e = query_error("Failed to deserialize query string: expected `,` or `}`");
        assert_eq!(e.violations[0].field, "query");
    }

    #[test]
    fn grpc_and_http_agree_on_every_code() {
        let pairs = [
            (ErrorCode::InvalidArgument, tonic::Code::InvalidArgument, 400),
            (ErrorCode::Unauthenticated, tonic::Code::Unauthenticated, 401),
            (ErrorCode::ResourceExhausted, tonic::Code::ResourceExhausted, 429),
            (ErrorCode::Unavailable, tonic::Code::Unavailable, 503),
        ];
        for (code, grpc, http) in pairs {
            assert_eq!(code.grpc(), grpc);
            assert_eq!(code.http().as_u16(), http);
        }
    }

    #[test]
    fn violations_travel_as_bad_request_details() {
        let status: tonic::Status = ApiError::field("event.type", "is required").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations[0].field, "event.type");
    }

    #[test]
    fn json_errors_do_not_repeat_the_value_they_refuse() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code, reason = "only decoded")]
        struct Config {
            api_token: String,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code, reason = "only decoded")]
        struct Install {
            config: Config,
        }
        let text = |json: &str| json_error_text(&serde_json::from_str::<Install>(json).unwrap_err());
        let t = text(r#"{"config": "{\"api_token\":\"SECRET_1\"}"}"#);
        assert!(
            t.starts_with("invalid type: string, expected struct Config"),
            "{t}"
        );
        let t = text(r#"{"config": {"api_token": 98765432123}}"#);
        assert!(t.starts_with("invalid type: integer, expected a string"), "{t}");
        let t = text(r#"{"config": {"api_token": true}}"#);
        assert!(!t.contains("true"), "{t}");
        // Errors that quote nothing keep their text.
        let t = text(r#"{"config": {}}"#);
        assert!(t.starts_with("missing field `api_token`"), "{t}");
    }
}
