//! `lytics_relay.v1.DeadLetterService`: list dead letters with their context, replay them.
//!
//! Input: filters and ids from an operator. Output: dead letters with the original input, the
//! mapped record, the attempt history and the reason; replays put them back in the queue.

use std::sync::Arc;

use crate::error::{ApiError, ErrorCode, FieldViolation};
use crate::integration::Integrations;
use crate::normalize::json_to_struct;
use crate::proto::v1 as pb;
use crate::proto::v1::dead_letter_service_server::DeadLetterService;
use crate::queue::{DeadLetter, DeadLetterFilter, Queue, QueueError};
use crate::telemetry::parse_traceparent;

/// Dead letters per page by default, and at most.
const PAGE: usize = 50;
const PAGE_MAX: usize = 500;
/// Dead letters one replay call puts back at most.
pub const REPLAY_MAX: usize = 10_000;

/// The service.
#[derive(Clone)]
pub struct DeadLetters {
    queue: Arc<dyn Queue>,
    /// The integrations in force, when known: a replay for one that is gone is refused.
    integrations: Option<Integrations>,
}

impl DeadLetters {
    /// Wires the service.
    pub fn new(queue: Arc<dyn Queue>) -> Self {
        DeadLetters {
            queue,
            integrations: None,
        }
    }

    /// Refuses replays filtered to an integration not in `integrations`.
    pub fn with_integrations(mut self, integrations: Integrations) -> Self {
        self.integrations = Some(integrations);
        self
    }
}

fn filter(f: Option<pb::DeadLetterFilter>) -> Result<DeadLetterFilter, ApiError> {
    let f = f.unwrap_or_default();
    let text = |s: String| (!s.is_empty()).then_some(s);
    let mut violations = Vec::new();
    for (field, ms) in [("filter.since_ms", f.since_ms), ("filter.until_ms", f.until_ms)] {
        if ms < 0 {
            violations.push(FieldViolation::new(
                field,
                "must not be negative (unix ms; 0 for no bound)",
            ));
        }
    }
    if f.since_ms > 0 && f.until_ms > 0 && f.until_ms < f.since_ms {
        violations.push(FieldViolation::new(
            "filter.until_ms",
            "is before filter.since_ms: the range holds nothing",
        ));
    }
    if !violations.is_empty() {
        return Err(ApiError::invalid("invalid dead-letter filter", violations));
    }
    Ok(DeadLetterFilter {
        integration: text(f.integration),
        stream: text(f.stream),
        reason: text(f.reason),
        since_ms: (f.since_ms > 0).then_some(f.since_ms),
        until_ms: (f.until_ms > 0).then_some(f.until_ms),
        before_id: None,
        limit: PAGE,
    })
}

/// The protobuf form of a dead letter.
pub fn dead_letter_pb(d: &DeadLetter) -> pb::DeadLetter {
    let r = &d.queued.record;
    let json = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .and_then(|v| json_to_struct(&v))
    };
    pb::DeadLetter {
        id: d.id,
        integration: r.integration.to_string(),
        stream: r.stream.to_string(),
        rule: r.rule.to_string(),
        rules_version: r.rules_version.to_string(),
        source: r.source.as_str().to_string(),
        event_id: r.event_id.to_string(),
        event_type: r.event_type.to_string(),
        input: crate::normalize::input_struct(&r.input),
        record: json(&r.body),
        reason: d.reason.clone(),
        dead_lettered_ms: d.at_ms,
        accepted_ms: r.accepted_ms,
        attempts: d
            .queued
            .history
            .iter()
            .map(|a| pb::DeliveryAttempt {
                at_ms: a.at_ms,
                status: a.status.map(u32::from).unwrap_or(0),
                detail: a.detail.clone(),
                kind: a.kind.as_str().into(),
            })
            .collect(),
        trace_id: r
            .traceparent
            .as_deref()
            .and_then(parse_traceparent)
            .map(|sc| sc.trace_id().to_string())
            .unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetters {
    async fn list_dead_letters(
        &self,
        request: tonic::Request<pb::ListDeadLettersRequest>,
    ) -> Result<tonic::Response<pb::ListDeadLettersResponse>, tonic::Status> {
        let req = request.into_inner();
        let mut f = filter(req.filter)?;
        f.limit = match usize::try_from(req.page_size) {
            Ok(0) => PAGE,
            Ok(n) => n.min(PAGE_MAX),
            Err(_) => {
                return Err(ApiError::field("page_size", "must not be negative (0 for the default)").into());
            }
        };
        if !req.page_token.is_empty() {
            f.before_id = Some(
                req.page_token
                    .parse()
                    .map_err(|_| ApiError::field("page_token", "is not a token this service issued"))?,
            );
        }
        let limit = f.limit;
        let found = self
            .queue
            .dead_letters(f)
            .await
            .map_err(crate::ingest::queue_error)?;
        let next_page_token = if found.len() == limit {
            found.last().map(|d| d.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(tonic::Response::new(pb::ListDeadLettersResponse {
            dead_letters: found.iter().map(dead_letter_pb).collect(),
            next_page_token,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: tonic::Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<tonic::Response<pb::ReplayDeadLettersResponse>, tonic::Status> {
        let req = request.into_inner();
        // Replays obey the queue's bound as ingest does.
        let capacity = self.queue.capacity();
        let room = capacity.saturating_sub(self.queue.depth());
        let short_of_room = |n: String, room: usize| -> tonic::Status {
            ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "replaying {n} dead letter(s) would put the queue past its capacity of \
                         {capacity} records (room for {room} now); replay fewer, or again as the \
                         queue drains"
                    ),
                )
            }
            .into()
        };
        let by_id = !req.ids.is_empty();
        let (ids, more) = if req.ids.is_empty() {
            let Some(f) = req.filter else {
                return Err(ApiError::field(
                    "ids",
                    "give dead letter ids, or a filter to replay everything it matches",
                )
                .into());
            };
            let allowed = room.min(REPLAY_MAX);
            let mut f = filter(Some(f))?;
            // Replaying for an integration that is gone could only dead-letter them again. On a
            // shared queue one this relay does not have may be another replica's: gone means
            // uninstalled.
            if let (Some(id), Some(integrations)) = (&f.integration, &self.integrations) {
                let gone = match integrations.retired(id) {
                    Some(r) => r.uninstalled || !self.queue.shared(),
                    None => integrations.get(id).is_none() && !self.queue.shared(),
                };
                if gone {
                    return Err(ApiError::new(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "integration `{id}` is not in force: its dead letters would be \
                             dead-lettered again; re-send their inputs instead"
                        ),
                    )
                    .into());
                }
            }
            f.limit = allowed + 1;
            let mut ids = self
                .queue
                .dead_letter_ids(f)
                .await
                .map_err(crate::ingest::queue_error)?;
            let more = ids.len() > allowed;
            if more && allowed == 0 {
                return Err(short_of_room("the matching".into(), room));
            }
            ids.truncate(allowed);
            (ids, more)
        } else if req.ids.len() > REPLAY_MAX {
            return Err(ApiError::field(
                "ids",
                format!(
                    "holds {} ids; at most {REPLAY_MAX} are replayed per call",
                    req.ids.len()
                ),
            )
            .into());
        } else {
            // Each id once; the queue checks the room against the dead letters among them.
            let mut seen = std::collections::HashSet::new();
            let ids: Vec<i64> = req.ids.into_iter().filter(|id| seen.insert(*id)).collect();
            (ids, false)
        };
        let replayed = match self.queue.replay(&ids).await {
            Ok(r) => r,
            Err(QueueError::Full { .. }) => {
                let room = capacity.saturating_sub(self.queue.depth());
                return Err(short_of_room(ids.len().to_string(), room));
            }
            Err(e) => return Err(crate::ingest::queue_error(e).into()),
        };
        let found: std::collections::HashSet<i64> = replayed.iter().copied().collect();
        let not_found: Vec<i64> = if by_id {
            ids.iter().copied().filter(|id| !found.contains(id)).collect()
        } else {
            Vec::new()
        };
        tracing::info!(
            replayed = replayed.len(),
            more,
            not_found = not_found.len(),
            "dead letters replayed"
        );
        Ok(tonic::Response::new(pb::ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed.len()).unwrap_or(u32::MAX),
            more,
            not_found,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test should fail loudly at the broken step")]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::queue::{EventRecords, MemoryQueue, NewRecord};

    async fn dead_letter(queue: &MemoryQueue, n: usize, tag: &str) {
        let events = (0..n)
            .map(|i| EventRecords {
                dedup_key: Some(Arc::from(format!("{tag}{i}"))),
                records: vec![NewRecord::sample("lytics")],
            })
            .collect();
        queue.enqueue(events).await.unwrap();
        let leased = queue.lease(n, &HashSet::new()).await.unwrap();
        queue.dead_letter(leased, "gave up".into()).await.unwrap();
    }

    async fn replay(
        svc: &DeadLetters,
        ids: Vec<i64>,
    ) -> Result<pb::ReplayDeadLettersResponse, tonic::Status> {
        let filter = ids.is_empty().then(pb::DeadLetterFilter::default);
        svc.replay_dead_letters(tonic::Request::new(pb::ReplayDeadLettersRequest { ids, filter }))
            .await
            .map(tonic::Response::into_inner)
    }

    #[tokio::test]
    async fn replays_keep_within_the_queues_capacity() {
        let queue = Arc::new(MemoryQueue::new(5, Duration::from_secs(60)));
        dead_letter(&queue, 5, "a").await;
        dead_letter(&queue, 3, "b").await;
        queue
            .enqueue(vec![EventRecords {
                dedup_key: None,
                records: vec![NewRecord::sample("lytics"), NewRecord::sample("lytics")],
            }])
            .await
            .unwrap();
        let svc = DeadLetters::new(queue.clone());
        // Room for 3: by ids, 4 are refused whole.
        let ids: Vec<i64> = queue
            .dead_letter_ids(DeadLetterFilter {
                limit: 4,
                ..Default::default()
            })
            .await
            .unwrap();
        let refused = replay(&svc, ids).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("capacity of 5 records (room for 3 now)"),
            "{}",
            refused.message()
        );
        assert_eq!(queue.depth(), 2);
        // By filter: as many as there is room for, and `more`.
        let r = replay(&svc, Vec::new()).await.unwrap();
        assert_eq!((r.replayed, r.more), (3, true));
        assert_eq!(queue.depth(), 5);
        let full = replay(&svc, Vec::new()).await.unwrap_err();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        // Drained: the rest goes back, and nothing more matches.
        let leased = queue.lease(5, &HashSet::new()).await.unwrap();
        queue
            .ack(&leased.iter().map(|r| r.id).collect::<Vec<_>>())
            .await
            .unwrap();
        let r = replay(&svc, Vec::new()).await.unwrap();
        assert_eq!((r.replayed, r.more), (5, false));
        let too_many = replay(&svc, (0..=REPLAY_MAX as i64).collect()).await.unwrap_err();
        assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_filter_or_page_size_that_cannot_mean_anything_is_refused() {
        let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
        let svc = DeadLetters::new(queue);
        let list = |filter: pb::DeadLetterFilter, page_size: i32| {
            svc.list_dead_letters(tonic::Request::new(pb::ListDeadLettersRequest {
                filter: Some(filter),
                page_size,
                page_token: String::new(),
            }))
        };
        let fields = |e: tonic::Status| -> Vec<String> {
            use tonic_types::StatusExt as _;
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            e.get_details_bad_request()
                .unwrap()
                .field_violations
                .into_iter()
                .map(|v| v.field)
                .collect()
        };
        let backwards = pb::DeadLetterFilter {
            since_ms: 5,
            until_ms: 1,
            ..Default::default()
        };
        assert_eq!(
            fields(list(backwards, 0).await.unwrap_err()),
            vec!["filter.until_ms"]
        );
        let negative = pb::DeadLetterFilter {
            since_ms: -1,
            ..Default::default()
        };
        assert_eq!(
            fields(list(negative, 0).await.unwrap_err()),
            vec!["filter.since_ms"]
        );
        assert_eq!(
            fields(list(pb::DeadLetterFilter::default(), -5).await.unwrap_err()),
            vec!["page_size"]
        );
        let fine = pb::DeadLetterFilter {
            since_ms: 1,
            until_ms: 5,
            ..Default::default()
        };
        assert!(list(fine, 0).await.unwrap().into_inner().dead_letters.is_empty());
    }

    #[tokio::test]
    async fn a_replay_by_ids_names_the_ids_it_did_not_find() {
        let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
        dead_letter(&queue, 2, "a").await;
        let svc = DeadLetters::new(queue.clone());
        let ids = queue
            .dead_letter_ids(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        let r = replay(&svc, vec![ids[0], 4242, ids[1]]).await.unwrap();
        assert_eq!((r.replayed, r.not_found), (2, vec![4242]));
        // Replayed already: nothing left under those ids.
        let r = replay(&svc, ids.clone()).await.unwrap();
        assert_eq!((r.replayed, r.not_found), (0, ids));
    }
}
