//! The ingest stage shared by every door (gRPC, HTTP): map validated events with the rules in
//! force and queue the records, answering only once they are queued.
//!
//! Input: [`InboundEvent`]s from normalize. Output: one [`Accepted`] per event (records queued,
//! rules matched, records refused with their reason) or an [`ApiError`] for the whole call when
//! the queue refuses (full, closed). The records of one call are enqueued together, so a call is
//! accepted whole or not at all. Never talks to Lytics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;

use crate::error::{ApiError, ErrorCode};
use crate::integration::{Integration, Integrations};
use crate::live::Mapped;
use crate::metrics::IngestTally;
use crate::monitor::Monitor;
use crate::normalize::{EventDoc, InboundEvent};
use crate::queue::{EventRecords, NewRecord, Queue, QueueError};
use crate::rules::path::Step;
use crate::rules::{Document, DroppedRecord, IntegrationContext, LiveRules, Source};
use crate::telemetry::{Telemetry, Throttle, names};
use crate::timefmt::now_ms;

/// What became of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Records are queued.
    Queued,
    /// Seen before within the dedup window; nothing queued.
    Duplicate,
    /// No rule produced a record.
    Ignored,
}

/// The answer for one accepted event.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The event id.
    pub id: Arc<str>,
    /// What became of it.
    pub disposition: Disposition,
    /// Records queued.
    pub records: u32,
    /// Rules that produced a record.
    pub rules: Vec<Arc<str>>,
    /// Records refused, with the reason.
    pub dropped: Vec<DroppedRecord>,
    /// The rule-set version used.
    pub rules_version: Arc<str>,
}

/// Counters of the ingest stage.
#[derive(Debug)]
pub struct IngestCounters {
    /// Events accepted.
    pub events: AtomicU64,
    /// Records queued.
    pub records: AtomicU64,
    /// Records refused by rules (missing identifiers, required fields, size).
    pub dropped: AtomicU64,
    /// Events no rule mapped.
    pub ignored: AtomicU64,
    /// Events seen before within the dedup window.
    pub duplicates: AtomicU64,
    /// The log says the queue is full at most every ten seconds.
    full_warning: Throttle,
}

impl Default for IngestCounters {
    fn default() -> Self {
        IngestCounters {
            events: AtomicU64::default(),
            records: AtomicU64::default(),
            dropped: AtomicU64::default(),
            ignored: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            full_warning: Throttle::new(10_000),
        }
    }
}

/// The shared ingest core.
#[derive(Clone)]
pub struct Ingest {
    rules: LiveRules,
    integrations: Integrations,
    queue: Arc<dyn Queue>,
    telemetry: Telemetry,
    accepting: Arc<AtomicBool>,
    counters: Arc<IngestCounters>,
    /// Reports each accepted event to metrics and the live bus.
    monitor: Monitor,
}

impl Ingest {
    /// Wires the stage.
    pub fn new(
        rules: LiveRules,
        integrations: Integrations,
        queue: Arc<dyn Queue>,
        telemetry: Telemetry,
    ) -> Self {
        Ingest {
            rules,
            integrations,
            queue,
            telemetry,
            accepting: Arc::new(AtomicBool::new(true)),
            counters: Arc::new(IngestCounters::default()),
            monitor: Monitor::detached(),
        }
    }

    /// Notes an HTTP request from `source` refused for its signature: counted, and logged at
    /// most every 10 s per source (a wrong signing key refuses every request, and Customer.io
    /// then holds back its whole feed: the relay's side must show it).
    pub fn unauthenticated(&self, source: Source, why: &str) {
        static SIGNAL: Throttle = Throttle::new(10_000);
        static CUSTOMERIO: Throttle = Throttle::new(10_000);
        self.monitor.metrics().unauthenticated(source);
        let throttle = match source {
            Source::Signal => &SIGNAL,
            Source::CustomerIo => &CUSTOMERIO,
        };
        if let Some(held_back) = throttle.pass() {
            tracing::warn!(
                source = source.as_str(),
                reason = why,
                refused_since_last_line = held_back,
                "refused a request for its signature (401); if every request is refused, check the signing secret on both sides"
            );
        }
    }

    /// Reports accepted events to `monitor` (metrics, live events).
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Stops accepting: later calls answer UNAVAILABLE / 503.
    pub fn close(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// The counters.
    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    /// The rules in force.
    pub fn rules(&self) -> &LiveRules {
        &self.rules
    }

    /// The integrations in force.
    pub fn integrations(&self) -> &Integrations {
        &self.integrations
    }

    /// Maps and queues `events`; `traceparent` is the caller's W3C trace context, if any.
    ///
    /// `events` is read one event at a time, each mapped before the next is read: a door that
    /// decodes lazily (the gRPC `SendBatch`) keeps one event's document in memory at a time,
    /// and its memory is reused while still in cache.
    pub async fn accept(
        &self,
        events: impl IntoIterator<Item = InboundEvent>,
        traceparent: Option<&str>,
    ) -> Result<Vec<Accepted>, ApiError> {
        let mut events = events.into_iter().peekable();
        let Some(source) = events.peek().map(|e| e.source) else {
            return Ok(Vec::new());
        };
        if !self.accepting.load(Ordering::SeqCst) {
            self.monitor
                .metrics()
                .refused(source, "shutting_down", events.count() as u64);
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    ErrorCode::Unavailable,
                    "the relay is shutting down; retry against another instance",
                )
            });
        }
        let (mut span, tp) = self.telemetry.start_ingest(
            traceparent,
            vec![KeyValue::new(names::INGEST_SOURCE, source.as_str())],
        );
        let tp: Option<Arc<str>> = tp.map(Arc::from);
        let rules = self.rules.current();
        let integrations = self.integrations.snapshot();
        let accepted_ms = now_ms();
        let expected = events.size_hint().0;
        let mut batches = Vec::with_capacity(expected);
        let mut answers = Vec::with_capacity(expected);
        // What the live view shows is built only while someone watches.
        let watching = self.monitor.watching();
        let mut mapped = Vec::new();
        // Each integration's rule context is built once per call, not once per event.
        let targets: Vec<_> = integrations
            .iter()
            .filter(|i| i.enabled)
            .map(|i| (i, i.context()))
            .collect();
        let own_stream: Arc<str> = Arc::from(crate::queue::INTEGRATION_STREAM);
        // Two integrations of one account can both map an event to one stream (a rule naming
        // its stream, as the Customer.io rules do): it must go there once. Only a call with two
        // such integrations pays for finding out, event by event.
        let shared_account = targets
            .iter()
            .enumerate()
            .any(|(i, (a, _))| targets[..i].iter().any(|(b, _)| same_account(a, b)));
        // Records each event queued for each target, event by event (for the metrics).
        let mut per_target: Vec<u32> = Vec::with_capacity(expected * targets.len());
        for event in events {
            let mut records: Vec<NewRecord> = Vec::with_capacity(targets.len());
            // With `shared_account`: for each record, its target and the stream it goes to.
            let mut sent_to: Vec<(usize, Arc<str>)> = Vec::new();
            let mut answer = Accepted {
                id: event.id.clone(),
                disposition: Disposition::Ignored,
                records: 0,
                rules: Vec::new(),
                dropped: Vec::new(),
                rules_version: rules.version().clone(),
            };
            for (t, (integration, context)) in targets.iter().enumerate() {
                let before = records.len();
                if let Some(switch) = switched_off(&event.doc, integration.id.as_str()) {
                    answer.dropped.push(DroppedRecord {
                        rule: Arc::from(""),
                        reason: format!(
                            "the event's `integrations` sets `{switch}` to false, so it is not sent to this integration"
                        ),
                        integration: Some(integration.id.as_arc()),
                    });
                    per_target.push(0);
                    continue;
                }
                let mapping = rules.evaluate(event.source, &event.doc, context);
                answer.dropped.extend(mapping.dropped.into_iter().map(|mut d| {
                    d.integration = Some(integration.id.as_arc());
                    d
                }));
                for record in mapping.records {
                    if shared_account {
                        sent_to.push((t, record.stream.clone()));
                    }
                    // Each rule once, however many integrations it mapped the event for.
                    if !answer.rules.contains(&record.rule) {
                        answer.rules.push(record.rule.clone());
                    }
                    answer.records += 1;
                    records.push(NewRecord {
                        integration: integration.id.as_arc(),
                        // Records bound for the integration's own stream follow it: a stream
                        // fixed while they wait redirects them (resolved at delivery).
                        stream: if *record.stream == *integration.stream_name.as_str() {
                            own_stream.clone()
                        } else {
                            record.stream
                        },
                        timestamp_field: record.timestamp_field,
                        rule: record.rule,
                        rules_version: rules.version().clone(),
                        source: event.source,
                        event_id: event.id.clone(),
                        event_type: event.event_type.clone(),
                        body: record.body,
                        input: event.input.clone(),
                        traceparent: tp.clone(),
                        accepted_ms,
                    });
                }
                per_target.push(u32::try_from(records.len() - before).unwrap_or(u32::MAX));
            }
            if shared_account {
                let counts = per_target.len() - targets.len();
                once_per_stream(
                    &targets,
                    &sent_to,
                    &mut records,
                    &mut answer,
                    &mut per_target[counts..],
                );
            }
            if answer.records > 0 {
                answer.disposition = Disposition::Queued;
            }
            if watching {
                mapped.push(Mapped::new(&event, &records, &integrations));
            }
            batches.push(EventRecords {
                dedup_key: event
                    .id_given
                    .then(|| Arc::from(format!("{}:{}", event.source.as_str(), event.id))),
                records,
            });
            answers.push(answer);
        }
        if let Some(s) = span.as_mut() {
            s.set_attribute(KeyValue::new(names::INGEST_EVENTS, answers.len() as i64));
        }
        let duplicates = match self.queue.enqueue(batches).await {
            Ok(d) => d,
            Err(e) => {
                if let Some(s) = span.as_mut() {
                    crate::telemetry::fail_span(s, "queue", e.to_string());
                }
                self.refused(source, &e, answers.len() as u64);
                return Err(queue_error(e));
            }
        };
        let mut tally = IngestTally {
            events: answers.len() as u64,
            ..IngestTally::default()
        };
        let mut by_target = vec![0u64; targets.len()];
        let width = targets.len();
        for (i, (answer, dup)) in answers.iter_mut().zip(duplicates).enumerate() {
            if dup {
                answer.disposition = Disposition::Duplicate;
                answer.records = 0;
                answer.rules.clear();
                answer.dropped.clear();
                tally.duplicates += 1;
                continue;
            }
            // What the rules refused; a sender's own switch (no rule) is not a refusal.
            let refused = answer.dropped.iter().filter(|d| !d.rule.is_empty());
            tally.dropped += refused.clone().count() as u64;
            match answer.disposition {
                Disposition::Queued => {
                    let counts = per_target.get(i * width..(i + 1) * width).unwrap_or_default();
                    for (sum, n) in by_target.iter_mut().zip(counts) {
                        *sum += u64::from(*n);
                    }
                }
                Disposition::Ignored => tally.ignored += 1,
                Disposition::Duplicate => {}
            }
            for d in refused {
                tracing::warn!(event_id = %answer.id, rule = %d.rule, reason = %d.reason, "record not sent");
            }
        }
        let queued: u64 = by_target.iter().sum();
        tally.mapped = targets
            .iter()
            .zip(by_target)
            .map(|((integration, _), n)| (integration.id.as_str(), n))
            .collect();
        let c = &self.counters;
        c.events.fetch_add(tally.events, Ordering::Relaxed);
        c.records.fetch_add(queued, Ordering::Relaxed);
        c.dropped.fetch_add(tally.dropped, Ordering::Relaxed);
        c.ignored.fetch_add(tally.ignored, Ordering::Relaxed);
        c.duplicates.fetch_add(tally.duplicates, Ordering::Relaxed);
        self.monitor
            .ingested(source, &tally, &answers, mapped, accepted_ms, tp.as_ref());
        if let Some(mut s) = span {
            s.set_attribute(KeyValue::new(
                names::INGEST_RECORDS,
                i64::try_from(queued).unwrap_or(i64::MAX),
            ));
            s.end();
        }
        Ok(answers)
    }
}

impl Ingest {
    /// Counts events the queue refused and, at most every ten seconds, says so in the log
    /// (the senders are told to retry; an operator should know delivery is behind).
    fn refused(&self, source: Source, e: &QueueError, events: u64) {
        let reason = match e {
            QueueError::Full { .. } => "queue_full",
            QueueError::Closed => "shutting_down",
            QueueError::Store(_) => "store_unavailable",
            QueueError::InProcess => "in_process",
        };
        self.monitor.metrics().refused(source, reason, events);
        if let QueueError::Full { capacity } = e
            && let Some(held_back) = self.counters.full_warning.pass()
        {
            tracing::warn!(
                capacity,
                source = source.as_str(),
                refusals_since_last_line = held_back,
                "the queue is full: refusing events (RESOURCE_EXHAUSTED / 429) until delivery catches up"
            );
        }
    }
}

/// The answer for a queue refusal.
pub fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::Full { .. } => ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                ErrorCode::ResourceExhausted,
                format!("{e}: Lytics delivery is behind"),
            )
        },
        QueueError::Closed | QueueError::InProcess => ApiError {
            retry_after: Some(1),
            ..ApiError::new(ErrorCode::Unavailable, e.to_string())
        },
        QueueError::Store(why) => {
            // Every call fails alike while the store is out of reach: one line per 10 s.
            static LOGGED: Throttle = Throttle::new(10_000);
            if let Some(held_back) = LOGGED.pass() {
                tracing::error!(error = %why, refusals_since_last_line = held_back, "the queue's store refused events; senders are told to retry");
            }
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    ErrorCode::Unavailable,
                    "the event store is unavailable; retry later",
                )
            }
        }
    }
}

/// Whether two integrations deliver to one Lytics account (on one Lytics host).
fn same_account(a: &Integration, b: &Integration) -> bool {
    a.account_id.as_str() == b.account_id.as_str()
        && a.base_url.trim_end_matches('/') == b.base_url.trim_end_matches('/')
}

/// Keeps one record per (account, stream) of an event: `sent_to[j]` is `records[j]`'s target
/// and stream. Of records for one account's stream, the one of the integration whose own stream
/// it is stays (its records follow the stream and carry its settings), else the first target's;
/// the others are dropped with the reason, and their targets' counts lowered.
fn once_per_stream(
    targets: &[(&Integration, IntegrationContext)],
    sent_to: &[(usize, Arc<str>)],
    records: &mut Vec<NewRecord>,
    answer: &mut Accepted,
    counts: &mut [u32],
) {
    let owns = |t: usize, stream: &str| targets[t].0.stream_name.as_str() == stream;
    let keep: Vec<bool> = sent_to
        .iter()
        .enumerate()
        .map(|(j, (t, stream))| {
            let better = sent_to.iter().enumerate().find(|(k, (u, other))| {
                *k != j
                    && u != t
                    && other == stream
                    && same_account(targets[*u].0, targets[*t].0)
                    && (owns(*u, stream), std::cmp::Reverse(*u)) > (owns(*t, stream), std::cmp::Reverse(*t))
            });
            match better {
                None => true,
                Some((_, (u, _))) => {
                    let (integration, first) = (targets[*t].0, targets[*u].0);
                    answer.dropped.push(DroppedRecord {
                        rule: Arc::from(""),
                        reason: format!(
                            "integration `{}` sends this event to account `{}`, stream `{stream}`: \
                             it goes there once",
                            first.id.as_str(),
                            integration.account_id.as_str()
                        ),
                        integration: Some(integration.id.as_arc()),
                    });
                    if let Some(c) = counts.get_mut(*t) {
                        *c = c.saturating_sub(1);
                    }
                    answer.records = answer.records.saturating_sub(1);
                    false
                }
            }
        })
        .collect();
    let mut keep = keep.into_iter();
    records.retain(|_| keep.next().unwrap_or(true));
}

/// The key of a sender's `integrations` switches (Segment's per-destination switches) that
/// turns this integration off, if one does: the integration's own id, else `Lytics`, else
/// `All`, the first present deciding. `true` or an options object leaves it on.
fn switched_off(doc: &EventDoc, integration_id: &str) -> Option<String> {
    static INTEGRATIONS: LazyLock<[Step; 1]> = LazyLock::new(|| [Step::Key("integrations".into())]);
    let switches = doc.at(&*INTEGRATIONS)?;
    let switches = switches.as_object()?;
    let key = [integration_id, "Lytics", "All"]
        .into_iter()
        .find(|k| switches.contains_key(*k))?;
    (switches.get(key) == Some(&serde_json::Value::Bool(false))).then(|| key.to_string())
}
