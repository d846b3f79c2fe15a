//! Trying and reloading rules: `lytics_relay.v1.RulesService` and its HTTP twin under
//! `/v1/admin/rules`.
//!
//! Input: an event to try (validated like a live one), or a reload request. Output: the records
//! the rules would build with an explanation of every field, or the reload's outcome. A dry
//! run never queues or delivers.

use serde::Serialize;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::integration::Integrations;
use crate::normalize::{self, json_to_struct};
use crate::proto::raw;
use crate::proto::servers::rules_service_server::RulesService;
use crate::proto::v1 as pb;
use crate::reload::{ReloadOutcome, Reloader};
use crate::rules::{IntegrationContext, Source};
use crate::timefmt::now_ms;

/// A dry run's answer.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// The rule-set version used.
    pub rules_version: String,
    /// Records that would be queued: rule, stream, record.
    pub records: Vec<Value>,
    /// Records refused: rule, reason.
    pub dropped: Vec<Value>,
    /// Where each output field came from: rule, field, source, transforms.
    pub fields: Vec<Value>,
    /// Paths that matched nothing: rule, field, path.
    pub unmatched: Vec<Value>,
    /// Rules whose `when` did not hold.
    pub skipped_rules: Vec<String>,
    /// The same rules with the test that failed: rule, reason.
    pub skipped: Vec<Value>,
}

/// Rule operations shared by gRPC and HTTP.
#[derive(Clone)]
pub struct RulesAdmin {
    reloader: Reloader,
    integrations: Integrations,
    max_event_bytes: usize,
}

impl RulesAdmin {
    /// Wires the operations.
    pub fn new(reloader: Reloader, integrations: Integrations, max_event_bytes: usize) -> Self {
        RulesAdmin {
            reloader,
            integrations,
            max_event_bytes,
        }
    }

    /// Maps `doc` (a Signal event or a Customer.io webhook) and explains it.
    pub fn dry_run(&self, source: Source, doc: Value, integration: Option<&str>) -> Result<DryRun, ApiError> {
        let event = match source {
            Source::Signal => normalize::signal_event(doc, "event", self.max_event_bytes, now_ms())?,
            Source::CustomerIo => {
                normalize::customerio_event(doc, "customerio_webhook", normalize::MAX_WEBHOOK_BYTES)?
            }
        };
        self.explain(source, event.doc.json(), integration)
    }

    /// Maps a validated event's document and explains it.
    fn explain(&self, source: Source, doc: &Value, integration: Option<&str>) -> Result<DryRun, ApiError> {
        let ctx = match integration.filter(|i| !i.is_empty()) {
            Some(id) => self
                .integrations
                .get(id)
                .ok_or_else(|| ApiError::field("integration", format!("no integration `{id}`")))?
                .context(),
            None => self
                .integrations
                .snapshot()
                .first()
                .map(|i| i.context())
                .unwrap_or_else(|| IntegrationContext {
                    stream_name: "datafly_events".into(),
                    ..Default::default()
                }),
        };
        let rules = self.reloader_rules();
        let (mapping, explain) = rules.explain(source, doc, &ctx);
        Ok(DryRun {
            rules_version: rules.version().to_string(),
            records: mapping
                .records
                .iter()
                .map(|r| serde_json::json!({"rule": &*r.rule, "stream": &*r.stream, "record": r.fields}))
                .collect(),
            dropped: mapping.dropped.iter().map(|d| serde_json::json!({"rule": &*d.rule, "reason": d.reason})).collect(),
            fields: explain
                .fields
                .iter()
                .map(|f| serde_json::json!({"rule": &*f.rule, "field": f.field, "source": f.source, "transforms": f.transforms}))
                .collect(),
            unmatched: explain
                .unmatched
                .iter()
                .map(|u| serde_json::json!({"rule": &*u.rule, "field": u.field, "path": u.path}))
                .collect(),
            skipped_rules: explain.skipped_rules.iter().map(|s| s.rule.to_string()).collect(),
            skipped: explain
                .skipped_rules
                .iter()
                .map(|s| serde_json::json!({"rule": &*s.rule, "reason": s.reason}))
                .collect(),
        })
    }

    fn reloader_rules(&self) -> std::sync::Arc<crate::rules::RuleSet> {
        self.reloader.live().current()
    }

    /// Reloads now; `trigger` names the call in the log.
    pub async fn reload(&self, trigger: &str) -> ReloadOutcome {
        self.reloader.reload(trigger).await
    }

    /// The reloader.
    pub fn reloader(&self) -> &Reloader {
        &self.reloader
    }
}

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

#[tonic::async_trait]
impl RulesService for RulesAdmin {
    async fn dry_run(
        &self,
        request: Request<raw::DryRunRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        let r = request.into_inner();
        // Decoded here, as `Send` decodes events: one that does not decode is a field violation.
        let (source, event) = match (r.event, r.customerio_webhook) {
            (Some(e), None) => (
                Source::Signal,
                normalize::signal_proto_event(&e, "event", self.max_event_bytes, now_ms())?,
            ),
            (None, Some(w)) => (
                Source::CustomerIo,
                normalize::customerio_proto_webhook(&w, "customerio_webhook", normalize::MAX_WEBHOOK_BYTES)?,
            ),
            _ => {
                return Err(
                    ApiError::field("event", "give exactly one of `event` and `customerio_webhook`").into(),
                );
            }
        };
        let d = self.explain(source, event.doc.json(), Some(&r.integration))?;
        Ok(Response::new(pb::DryRunResponse {
            rules_version: d.rules_version,
            records: d
                .records
                .iter()
                .map(|r| pb::DryRunRecord {
                    rule: text(r, "rule"),
                    stream: text(r, "stream"),
                    record: r.get("record").and_then(json_to_struct),
                })
                .collect(),
            dropped: d
                .dropped
                .iter()
                .map(|x| pb::DroppedRecord {
                    rule: text(x, "rule"),
                    reason: text(x, "reason"),
                    integration: text(x, "integration"),
                })
                .collect(),
            fields: d
                .fields
                .iter()
                .map(|f| pb::FieldOrigin {
                    rule: text(f, "rule"),
                    field: text(f, "field"),
                    source: text(f, "source"),
                    transforms: f["transforms"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect())
                        .unwrap_or_default(),
                })
                .collect(),
            unmatched: d
                .unmatched
                .iter()
                .map(|u| pb::UnmatchedPath {
                    rule: text(u, "rule"),
                    field: text(u, "field"),
                    path: text(u, "path"),
                })
                .collect(),
            skipped_rules: d.skipped_rules,
            skipped: d
                .skipped
                .iter()
                .map(|s| pb::SkippedRule {
                    rule: text(s, "rule"),
                    reason: text(s, "reason"),
                })
                .collect(),
        }))
    }

    async fn reload(&self, _: Request<pb::ReloadRequest>) -> Result<Response<pb::ReloadResponse>, Status> {
        let o = RulesAdmin::reload(self, "RulesService/Reload").await;
        Ok(Response::new(pb::ReloadResponse {
            swapped: o.swapped,
            version: o.version,
            previous_version: o.previous_version,
            problems: o.problems,
            test_cases: u32::try_from(o.test_cases).unwrap_or(u32::MAX),
        }))
    }

    async fn get_rules_status(
        &self,
        _: Request<pb::GetRulesStatusRequest>,
    ) -> Result<Response<pb::GetRulesStatusResponse>, Status> {
        let s = self.reloader.status();
        Ok(Response::new(pb::GetRulesStatusResponse {
            version: s.version,
            loaded_ms: s.loaded_ms,
            reloads: s.reloads,
            failures: s.failures,
            last_error: s.last_error,
        }))
    }
}
