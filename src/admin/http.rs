//! The HTTP admin API under `/v1/admin` (Signal's management API shape, REFERENCE §2).
//!
//! Input: HTTP requests with `Authorization: Bearer <admin token>`. Output: JSON; errors in the
//! one shape `{"error":{"code":"…","message":"…"}}`; lists page with `next_cursor` / `has_more`.

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminToken;
use super::catalog;
use super::integrations::{InstallRequest, IntegrationAdmin, UpdateRequest};
use super::rules::RulesAdmin;
use crate::error::{ApiError, ErrorCode, QueryOf, json_error_text};
use crate::rules::Source;

#[derive(Clone)]
struct AdminState {
    admin: IntegrationAdmin,
    rules: RulesAdmin,
}

/// The admin routes, behind the token.
pub fn router(admin: IntegrationAdmin, rules: RulesAdmin, token: AdminToken) -> Router {
    Router::new()
        .route("/v1/admin/integration-catalog", get(list_catalog))
        .route("/v1/admin/integration-catalog/{key}", get(get_entry))
        .route("/v1/admin/integration-catalog/{key}/install", post(install))
        .route("/v1/admin/integrations", get(list))
        .route(
            "/v1/admin/integrations/{id}",
            get(get_one).patch(update).delete(uninstall),
        )
        .route("/v1/admin/integrations/{id}/pause", post(pause))
        .route("/v1/admin/integrations/{id}/resume", post(resume))
        .route("/v1/admin/integrations/{id}/test", post(test))
        .route("/v1/admin/rules", get(rules_status))
        .route("/v1/admin/rules/dry-run", post(dry_run))
        .route("/v1/admin/rules/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(token, authorize))
        .with_state(AdminState { admin, rules })
}

async fn authorize(State(token): State<AdminToken>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if token.check(header) {
        next.run(request).await
    } else {
        let mut refused = ApiError::new(
            ErrorCode::Unauthenticated,
            "missing or wrong admin token: send `Authorization: Bearer <admin token>`",
        )
        .into_response();
        refused.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"lytics-relay admin\""),
        );
        refused
    }
}

fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return serde_json::from_str("{}").map_err(|e| ApiError::field("body", e.to_string()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| (e.path().to_string(), e.into_inner()))
        .and_then(|v| de.end().map(|()| v).map_err(|e| (".".to_string(), e)));
    parsed.map_err(|(path, e)| {
        if e.to_string().starts_with("recursion limit exceeded") {
            return crate::normalize::too_deep("body");
        }
        // A value of the wrong type names its field (`config.api_token`); JSON that does not
        // parse names the body.
        match e.classify() {
            serde_json::error::Category::Data if path != "." => ApiError::field(path, json_error_text(&e)),
            _ => ApiError::field("body", format!("is not a valid request: {}", json_error_text(&e))),
        }
    })
}

async fn list_catalog() -> Json<Value> {
    Json(json!({"integrations": catalog::catalog(), "next_cursor": null, "has_more": false}))
}

async fn get_entry(Path(key): Path<String>) -> Result<Json<Value>, ApiError> {
    let entry = catalog::entry(&key)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no catalog entry `{key}`")))?;
    Ok(Json(json!(entry)))
}

async fn install(
    State(s): State<AdminState>,
    Path(key): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let req: InstallRequest = body(&bytes)?;
    let view = s.admin.install(&key, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Deserialize)]
struct Page {
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list(State(s): State<AdminState>, QueryOf(p): QueryOf<Page>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(
        // 0 is the default page, as `page_size: 0` is over gRPC.
        s.admin
            .list(p.cursor.as_deref(), p.limit.filter(|n| *n > 0).unwrap_or(50))
            .await?
    )))
}

async fn get_one(State(s): State<AdminState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(s.admin.get(&id).await?)))
}

async fn update(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UpdateRequest = body(&bytes)?;
    Ok(Json(json!(s.admin.update(&id, req).await?)))
}

async fn uninstall(State(s): State<AdminState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.admin.uninstall(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(State(s): State<AdminState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(s.admin.set_paused(&id, true).await?)))
}

async fn resume(State(s): State<AdminState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(s.admin.set_paused(&id, false).await?)))
}

async fn test(State(s): State<AdminState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(s.admin.test_connection(&id).await?)))
}

async fn rules_status(State(s): State<AdminState>) -> Json<Value> {
    Json(json!(s.rules.reloader().status()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunBody {
    /// `signal` (default) or `customerio`.
    #[serde(default)]
    source: Option<String>,
    /// The event or webhook.
    event: Value,
    /// The integration whose settings the rules see.
    #[serde(default)]
    integration: Option<String>,
}

async fn dry_run(State(s): State<AdminState>, bytes: Bytes) -> Result<Json<Value>, ApiError> {
    let b: DryRunBody = body(&bytes)?;
    let source = match b.source.as_deref().unwrap_or("signal") {
        "signal" => Source::Signal,
        "customerio" => Source::CustomerIo,
        other => {
            return Err(ApiError::field(
                "source",
                format!("unknown source `{other}`; use `signal` or `customerio`"),
            ));
        }
    };
    Ok(Json(json!(s.rules.dry_run(
        source,
        b.event,
        b.integration.as_deref()
    )?)))
}

async fn reload(State(s): State<AdminState>) -> Json<Value> {
    let o = s.rules.reload("POST /v1/admin/rules/reload").await;
    Json(json!({
        "swapped": o.swapped,
        "version": o.version,
        "previous_version": o.previous_version,
        "problems": o.problems,
        "test_cases": o.test_cases,
    }))
}
