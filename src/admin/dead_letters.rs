//! `lytics_relay.v1.DeadLetterService`: list dead letters with their context, replay them.
//!
//! Input: filters and ids from an operator. Output: dead letters with the original input, the
//! mapped record, the attempt history and the reason; replays put them back in the queue.

use std::sync::Arc;

use crate::error::{ApiError, ErrorCode, FieldViolation};
use crate::integration::Integrations;
use crate::normalize::{self, json_to_struct};
use crate::proto::servers::dead_letter_service_server::DeadLetterService;
use crate::proto::v1 as pb;
use crate::queue::{DeadLetter, DeadLetterFilter, INTEGRATION_STREAM, NewRecord, Queue, QueueError, Replay};
use crate::rules::{LiveRules, RuleSet, Source};
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
    /// The rules in force, for replays that map the input again.
    rules: Option<LiveRules>,
}

impl DeadLetters {
    /// Wires the service.
    pub fn new(queue: Arc<dyn Queue>) -> Self {
        DeadLetters {
            queue,
            integrations: None,
            rules: None,
        }
    }

    /// Refuses replays filtered to an integration not in `integrations`.
    pub fn with_integrations(mut self, integrations: Integrations) -> Self {
        self.integrations = Some(integrations);
        self
    }

    /// Lets replays map dead letters' inputs again with the rules in force.
    pub fn with_rules(mut self, rules: LiveRules) -> Self {
        self.rules = Some(rules);
        self
    }
}

/// The record the rules in force make of dead letter `d`'s input, for its integration and by
/// its rule, or why there is none.
fn remap(d: &DeadLetter, rules: &RuleSet, integrations: &Integrations) -> Result<NewRecord, String> {
    let r = &d.queued.record;
    let integration = integrations
        .get(&r.integration)
        .ok_or_else(|| format!("integration `{}` is not in force", r.integration))?;
    let doc = normalize::input_json(&r.input).ok_or("its stored input cannot be read")?;
    let event = match r.source {
        Source::Signal => normalize::signal_event(doc, "input", usize::MAX, r.accepted_ms),
        Source::CustomerIo => normalize::customerio_event(doc, "input", usize::MAX),
    }
    .map_err(|e| format!("its input no longer passes validation: {e}"))?;
    let mapping = rules.evaluate(r.source, &event.doc, &integration.context());
    let Some(record) = mapping.records.into_iter().find(|m| m.rule == r.rule) else {
        return Err(mapping
            .dropped
            .iter()
            .find(|dropped| dropped.rule == r.rule)
            .map(|dropped| format!("rule `{}` drops it: {}", r.rule, dropped.reason))
            .unwrap_or_else(|| format!("rule `{}` no longer maps it", r.rule)));
    };
    let body = record.body;
    Ok(NewRecord {
        // As ingest does: a record for the integration's own stream follows the integration.
        stream: if *record.stream == *integration.stream_name.as_str() {
            Arc::from(INTEGRATION_STREAM)
        } else {
            record.stream
        },
        timestamp_field: record.timestamp_field,
        rule: record.rule,
        rules_version: rules.version().clone(),
        body,
        ..r.clone()
    })
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
        return Err(ApiError::violations("dead-letter filter", violations));
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
        if by_id && req.filter.is_some() {
            return Err(ApiError::field(
                "filter",
                "give dead letter ids or a filter, not both (a filter is not applied to ids)",
            )
            .into());
        }
        // With a filter: the replays and the dead letters left in place, found by paging.
        let mut mapped: Option<(Vec<Replay>, Vec<pb::UnmappedDeadLetter>)> = None;
        let (ids, more) = if req.ids.is_empty() {
            let Some(f) = req.filter else {
                return Err(ApiError::field(
                    "ids",
                    "give dead letter ids, or a filter to replay everything it matches",
                )
                .into());
            };
            let allowed = room.min(REPLAY_MAX);
            let f = filter(Some(f))?;
            // Replaying for an integration that is gone could only dead-letter them again.
            if let Some(id) = &f.integration
                && self.gone(id)
            {
                return Err(ApiError::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "integration `{id}` is not in force: its dead letters would be \
                             dead-lettered again (their inputs are kept in them)"
                    ),
                )
                .into());
            }
            let (replays, unmapped, more) = self.matching(f, allowed, req.remap).await?;
            if more && allowed == 0 {
                return Err(short_of_room("the matching".into(), room));
            }
            let ids = replays.iter().map(|r| r.id).collect();
            mapped = Some((replays, unmapped));
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
        let (replays, unmapped) = if let Some(mapped) = mapped {
            mapped
        } else if req.remap || self.integrations.is_some() {
            let found = self
                .queue
                .dead_letters_by_id(&ids)
                .await
                .map_err(crate::ingest::queue_error)?;
            self.classified(&found, req.remap)?
        } else {
            let replays = ids.iter().map(|&id| Replay { id, remapped: None }).collect();
            (replays, Vec::new())
        };
        let replayed = match self.queue.replay_records(&replays).await {
            Ok(r) => r,
            Err(QueueError::Full { .. }) => {
                let room = capacity.saturating_sub(self.queue.depth());
                return Err(short_of_room(ids.len().to_string(), room));
            }
            Err(e) => return Err(crate::ingest::queue_error(e).into()),
        };
        let found: std::collections::HashSet<i64> = replayed.iter().copied().collect();
        let left: std::collections::HashSet<i64> = unmapped.iter().map(|u| u.id).collect();
        let not_found: Vec<i64> = if by_id {
            ids.iter()
                .copied()
                .filter(|id| !found.contains(id) && !left.contains(id))
                .collect()
        } else {
            Vec::new()
        };
        tracing::info!(
            replayed = replayed.len(),
            remapped = req.remap,
            unmapped = unmapped.len(),
            more,
            not_found = not_found.len(),
            "dead letters replayed"
        );
        Ok(tonic::Response::new(pb::ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed.len()).unwrap_or(u32::MAX),
            more,
            not_found,
            unmapped,
        }))
    }
}

impl DeadLetters {
    /// Whether integration `id` is gone, so that its dead letters could only be dead-lettered
    /// again. On a shared queue one this relay does not have may be another replica's: gone
    /// means uninstalled. Unknown without the integrations.
    fn gone(&self, id: &str) -> bool {
        let Some(integrations) = &self.integrations else {
            return false;
        };
        match integrations.retired(id) {
            Some(r) => r.uninstalled || !self.queue.shared(),
            None => integrations.get(id).is_none() && !self.queue.shared(),
        }
    }

    /// The dead letters `f` matches, newest first, as replays ([`Self::classified`]): up to
    /// `allowed` replays, the dead letters left in place on the way, and whether more match.
    /// Paged past the ones left in place, which stay the newest and would otherwise fill every
    /// call.
    async fn matching(
        &self,
        f: DeadLetterFilter,
        allowed: usize,
        remap: bool,
    ) -> Result<(Vec<Replay>, Vec<pb::UnmappedDeadLetter>, bool), tonic::Status> {
        // Dead letters looked at per call, at most: the rest waits for the next call.
        const EXAMINED_MAX: usize = 10 * REPLAY_MAX;
        let mut replays = Vec::new();
        let mut unmapped = Vec::new();
        let mut cursor = f.before_id;
        let mut examined = 0;
        loop {
            let page = self
                .queue
                .dead_letters(DeadLetterFilter {
                    before_id: cursor,
                    limit: PAGE_MAX,
                    ..f.clone()
                })
                .await
                .map_err(crate::ingest::queue_error)?;
            let last_page = page.len() < PAGE_MAX;
            for d in page {
                if replays.len() >= allowed || examined >= EXAMINED_MAX {
                    return Ok((replays, unmapped, true));
                }
                examined += 1;
                cursor = Some(d.id);
                let (mut r, mut u) = self.classified(std::slice::from_ref(&d), remap)?;
                replays.append(&mut r);
                unmapped.append(&mut u);
            }
            if last_page {
                return Ok((replays, unmapped, false));
            }
        }
    }

    /// Dead letters as replays: mapped again by the rules in force with `remap`, as they are
    /// without. Those the rules make no record of, and those of an integration that is gone
    /// (which could only be dead-lettered again), are left in place, with the reason.
    fn classified(
        &self,
        found: &[DeadLetter],
        remap: bool,
    ) -> Result<(Vec<Replay>, Vec<pb::UnmappedDeadLetter>), tonic::Status> {
        if remap {
            return self.remapped(found);
        }
        let mut replays = Vec::with_capacity(found.len());
        let mut left = Vec::new();
        for d in found {
            let id = &d.queued.record.integration;
            if self.gone(id) {
                left.push(pb::UnmappedDeadLetter {
                    id: d.id,
                    reason: format!("integration `{id}` is not in force: it would be dead-lettered again"),
                });
            } else {
                replays.push(Replay {
                    id: d.id,
                    remapped: None,
                });
            }
        }
        Ok((replays, left))
    }

    /// Dead letters `ids` mapped again by the rules in force: the replays, and those the rules
    /// make no record of (left in place).
    fn remapped(
        &self,
        found: &[DeadLetter],
    ) -> Result<(Vec<Replay>, Vec<pb::UnmappedDeadLetter>), tonic::Status> {
        let (Some(rules), Some(integrations)) = (&self.rules, &self.integrations) else {
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                "this relay cannot map dead letters again (no rules given to the service)",
            )
            .into());
        };
        let rules = rules.current();
        let mut replays = Vec::with_capacity(found.len());
        let mut unmapped = Vec::new();
        for d in found {
            match remap(d, &rules, integrations) {
                Ok(record) => replays.push(Replay {
                    id: d.id,
                    remapped: Some(record),
                }),
                Err(reason) => unmapped.push(pb::UnmappedDeadLetter { id: d.id, reason }),
            }
        }
        Ok((replays, unmapped))
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
        svc.replay_dead_letters(tonic::Request::new(pb::ReplayDeadLettersRequest {
            ids,
            filter,
            remap: false,
        }))
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
        let e = list(backwards, 0).await.unwrap_err();
        // The message says what is wrong, not only the details.
        assert!(e.message().contains("`filter.until_ms`"), "{e:?}");
        assert_eq!(fields(e), vec!["filter.until_ms"]);
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
        // A replay given ids and a filter would ignore the filter: refused.
        let both = svc
            .replay_dead_letters(tonic::Request::new(pb::ReplayDeadLettersRequest {
                ids: vec![1],
                filter: Some(pb::DeadLetterFilter::default()),
                remap: false,
            }))
            .await
            .unwrap_err();
        assert_eq!(fields(both), vec!["filter"]);
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

    #[test]
    fn a_dead_letter_the_rules_in_force_do_not_map_says_why() {
        use crate::integration::{AccountId, Integration, IntegrationId, Secret, StreamName};
        let rules = RuleSet::embedded().unwrap();
        let integrations = Integrations::new(vec![Integration {
            id: IntegrationId::new("lytics").unwrap(),
            name: "Lytics".into(),
            account_id: AccountId::new("1").unwrap(),
            stream_name: StreamName::new("datafly_events").unwrap(),
            api_token: Secret::new("t"),
            base_url: "http://127.0.0.1:9".into(),
            enabled: true,
        }]);
        let dead = |integration: &str, rule: &str, input: &serde_json::Value| DeadLetter {
            id: 7,
            queued: crate::queue::QueuedRecord {
                id: 1,
                record: NewRecord {
                    rule: Arc::from(rule),
                    input: bytes::Bytes::from(input.to_string()),
                    ..NewRecord::sample(integration)
                },
                attempts: 0,
                history: Vec::new(),
            },
            reason: "refused".into(),
            at_ms: 0,
        };
        let track = serde_json::json!({"type": "track", "event": "Clicked", "userId": "u1",
            "messageId": "m1", "timestamp": "2026-02-25T14:30:00Z", "properties": {"plan": "pro"}});
        // Mapped again: the record the track rule makes now, for the integration's own stream.
        let record = remap(&dead("lytics", "track_event", &track), &rules, &integrations).unwrap();
        assert_eq!(&*record.rule, "track_event");
        assert_eq!(&*record.stream, INTEGRATION_STREAM);
        assert_eq!(&record.rules_version, rules.version());
        let body: serde_json::Value = serde_json::from_slice(&record.body).unwrap();
        assert_eq!(
            (body["_e"].as_str(), body["plan"].as_str()),
            (Some("Clicked"), Some("pro"))
        );
        // A rule that no longer maps the input, an integration gone, an input that is not one.
        let e = remap(&dead("lytics", "page_view", &track), &rules, &integrations).unwrap_err();
        assert_eq!(e, "rule `page_view` no longer maps it");
        let e = remap(&dead("gone", "track_event", &track), &rules, &integrations).unwrap_err();
        assert_eq!(e, "integration `gone` is not in force");
        let e = remap(
            &dead("lytics", "track_event", &serde_json::json!({"type": "track"})),
            &rules,
            &integrations,
        )
        .unwrap_err();
        assert!(e.starts_with("its input no longer passes validation"), "{e}");
    }
}
