//! Live events: every event and record as it passes each stage, for operators to watch.
//!
//! Input: [`LiveEvent`]s published by ingest (one per accepted event: its input, the rules that
//! matched, the mapped records, what was dropped and why) and by delivery (one per record per
//! Lytics call: the status, the latency, the attempt, what happens next). Output: [`Watcher`]s,
//! each reading the events that pass its [`Filter`], served by `grpc.rs`
//! (`LiveEventsService/Watch`) and `web.rs` (the `/live` page and its server-sent events).
//!
//! The bus is a bounded `tokio::sync::broadcast` channel. Publishing never awaits and never
//! fails: with nobody watching it builds nothing ([`LiveBus::watching`]); a watcher that falls
//! more than the buffer behind loses the oldest events and is told how many
//! ([`Seen::Dropped`]). Live events carry what the queue carries (inputs, records, ids) and never
//! a config value, so they hold no secret.

pub mod grpc;
pub mod web;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Accepted, Disposition};
use crate::integration::Integration;
use crate::normalize::InboundEvent;
use crate::queue::{INTEGRATION_STREAM, NewRecord, QueuedRecord};
use crate::rules::{DroppedRecord, Source};
use crate::telemetry::parse_traceparent;

/// Live events a watcher may fall behind by before it loses the oldest ones.
pub const DEFAULT_BUFFER: usize = 1024;

/// What happened to an event or record at the stage that published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Ingest queued its records.
    Accepted,
    /// Valid, but no rule maps it.
    Ignored,
    /// Seen before within the dedup window; nothing queued.
    Duplicate,
    /// Rules matched, but every record was refused (see `dropped` for the reasons).
    Dropped,
    /// Lytics took the record.
    Delivered,
    /// The call failed in a way worth retrying; the record is due again later.
    Retrying,
    /// Lytics refused the batch; the record is resent in a smaller batch to isolate bad ones.
    Failed,
    /// Delivery gave up on the record; it is in the dead-letter queue.
    DeadLettered,
    /// A setup error paused the integration; the record waits without spending an attempt.
    Paused,
}

impl Outcome {
    /// Every outcome, in pipeline order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Accepted,
        Outcome::Ignored,
        Outcome::Duplicate,
        Outcome::Dropped,
        Outcome::Delivered,
        Outcome::Retrying,
        Outcome::Failed,
        Outcome::DeadLettered,
        Outcome::Paused,
    ];

    /// The stable name used by filters, the page and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Ignored => "ignored",
            Outcome::Duplicate => "duplicate",
            Outcome::Dropped => "dropped",
            Outcome::Delivered => "delivered",
            Outcome::Retrying => "retrying",
            Outcome::Failed => "failed",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Paused => "paused",
        }
    }

    /// Reads an outcome name.
    pub fn parse(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// The outcome of an event ingest accepted.
    pub fn of(answer: &Accepted) -> Outcome {
        match answer.disposition {
            Disposition::Queued => Outcome::Accepted,
            Disposition::Duplicate => Outcome::Duplicate,
            Disposition::Ignored if answer.dropped.is_empty() => Outcome::Ignored,
            Disposition::Ignored => Outcome::Dropped,
        }
    }
}

/// A mapped record as the live view shows it.
#[derive(Debug, Clone)]
pub struct LiveRecord {
    /// The integration that delivers it.
    pub integration: Arc<str>,
    /// The Lytics stream.
    pub stream: Arc<str>,
    /// The rule that built it.
    pub rule: Arc<str>,
    /// The record (one JSON object).
    pub body: Bytes,
}

impl LiveRecord {
    /// The live form of a record built for the queue.
    pub fn of(r: &NewRecord) -> Self {
        LiveRecord {
            integration: r.integration.clone(),
            stream: r.stream.clone(),
            rule: r.rule.clone(),
            body: r.body.clone(),
        }
    }
}

/// One event or record at one stage.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    /// When this stage happened (unix ms).
    pub at_ms: i64,
    /// When the relay accepted the event (unix ms).
    pub accepted_ms: i64,
    /// What happened.
    pub outcome: Outcome,
    /// Where the event came from.
    pub source: Source,
    /// The event type (`track`, `email_opened`, …).
    pub event_type: Arc<str>,
    /// The event id.
    pub event_id: Arc<str>,
    /// The integration, when the event concerns exactly one.
    pub integration: Option<Arc<str>>,
    /// The rule-set version that mapped it.
    pub rules_version: Arc<str>,
    /// The original input event (JSON).
    pub input: Bytes,
    /// The mapped records: all of an ingested event's, or the one record a delivery concerns.
    pub records: Vec<LiveRecord>,
    /// Records the rules refused, with the reason.
    pub dropped: Vec<DroppedRecord>,
    /// The HTTP status Lytics answered, when it answered.
    pub status: Option<u16>,
    /// How long the Lytics call took (ms).
    pub latency_ms: Option<u64>,
    /// The delivery attempt (1-based): the calls the record was in, this one included, whether
    /// they spent an attempt or were deferred (an outage hold, a 429); 0 at ingest.
    pub attempt: u32,
    /// What happens next or why (retry reason, dead-letter reason, pause hint).
    pub detail: String,
    /// The W3C `traceparent` of the ingest span; the page shows its trace id.
    pub traceparent: Option<Arc<str>>,
}

impl LiveEvent {
    /// The live event of an event ingest accepted.
    pub fn ingested(
        mapped: Mapped,
        answer: &Accepted,
        accepted_ms: i64,
        traceparent: Option<Arc<str>>,
    ) -> Self {
        let outcome = Outcome::of(answer);
        let records = if outcome == Outcome::Accepted {
            mapped.records
        } else {
            Vec::new()
        };
        LiveEvent {
            at_ms: accepted_ms,
            accepted_ms,
            outcome,
            source: mapped.source,
            event_type: mapped.event_type,
            event_id: answer.id.clone(),
            integration: only_integration(&records),
            rules_version: answer.rules_version.clone(),
            input: mapped.input,
            records,
            dropped: answer.dropped.clone(),
            status: None,
            latency_ms: None,
            attempt: 0,
            detail: String::new(),
            traceparent,
        }
    }

    /// The live event of a queued record a Lytics call settled.
    pub fn settled(r: &QueuedRecord, outcome: Outcome, call: &CallResult, detail: &str, at_ms: i64) -> Self {
        let rec = &r.record;
        LiveEvent {
            at_ms,
            accepted_ms: rec.accepted_ms,
            outcome,
            source: rec.source,
            event_type: rec.event_type.clone(),
            event_id: rec.event_id.clone(),
            integration: Some(rec.integration.clone()),
            rules_version: rec.rules_version.clone(),
            input: rec.input.clone(),
            records: vec![LiveRecord::of(rec)],
            dropped: Vec::new(),
            status: call.status,
            latency_ms: Some(u64::try_from(call.latency.as_millis()).unwrap_or(u64::MAX)),
            // Calls the record was in before (a deferred call is still a call), and this one.
            attempt: r.calls_failed().saturating_add(1),
            detail: detail.to_string(),
            traceparent: rec.traceparent.clone(),
        }
    }

    /// The trace id of the ingest that caused it, if known.
    pub fn trace_id(&self) -> Option<String> {
        self.traceparent
            .as_deref()
            .and_then(parse_traceparent)
            .map(|sc| sc.trace_id().to_string())
    }

    /// The JSON form the page reads: inputs and records as JSON objects.
    pub fn to_json(&self) -> Value {
        json!({
            "at_ms": self.at_ms,
            "accepted_ms": self.accepted_ms,
            "outcome": self.outcome.as_str(),
            "source": self.source.as_str(),
            "event_type": &*self.event_type,
            "event_id": &*self.event_id,
            "integration": self.integration.as_deref().unwrap_or(""),
            "rules_version": &*self.rules_version,
            "input": crate::normalize::input_json(&self.input).unwrap_or(Value::Null),
            "records": self.records.iter().map(|r| json!({
                "integration": &*r.integration,
                "stream": &*r.stream,
                "rule": &*r.rule,
                "record": parse_json(&r.body),
            })).collect::<Vec<_>>(),
            "dropped": self.dropped.iter().map(|d| json!({"rule": &*d.rule, "reason": d.reason, "integration": d.integration.as_deref()})).collect::<Vec<_>>(),
            "status": self.status,
            "latency_ms": self.latency_ms,
            "attempt": self.attempt,
            "detail": self.detail,
            "trace_id": self.trace_id(),
        })
    }
}

/// What ingest knows of an event beside its answer: where it came from, its input and the
/// records it mapped to.
#[derive(Debug, Clone)]
pub struct Mapped {
    /// Where the event came from.
    pub source: Source,
    /// The event type.
    pub event_type: Arc<str>,
    /// The original input (JSON).
    pub input: Bytes,
    /// The records the rules built, before the queue saw them.
    pub records: Vec<LiveRecord>,
}

impl Mapped {
    /// What the live view and metrics need of `event` and the records built from it. Records
    /// bound for their integration's own stream show that stream's name, as it is now.
    pub fn new(event: &InboundEvent, records: &[NewRecord], integrations: &[Integration]) -> Self {
        let records = records
            .iter()
            .map(|r| {
                let mut live = LiveRecord::of(r);
                if &*live.stream == INTEGRATION_STREAM
                    && let Some(i) = integrations.iter().find(|i| i.id.as_str() == &*r.integration)
                {
                    live.stream = Arc::from(i.stream_name.as_str());
                }
                live
            })
            .collect();
        Mapped {
            source: event.source,
            event_type: event.event_type.clone(),
            input: event.input.clone(),
            records,
        }
    }
}

/// A Lytics call as the records it carried saw it.
#[derive(Debug, Clone, Copy)]
pub struct CallResult {
    /// The HTTP status, when Lytics answered.
    pub status: Option<u16>,
    /// How long the call took.
    pub latency: std::time::Duration,
}

fn only_integration(records: &[LiveRecord]) -> Option<Arc<str>> {
    let first = records.first()?;
    records
        .iter()
        .all(|r| r.integration == first.integration)
        .then(|| first.integration.clone())
}

fn parse_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

/// Which live events a watcher wants; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this integration.
    pub integration: Option<String>,
    /// Only this source.
    pub source: Option<Source>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this outcome.
    pub outcome: Option<Outcome>,
}

impl Filter {
    /// Whether `e` passes. An ingested event spanning several integrations passes an
    /// integration filter when one of its records is for that integration.
    pub fn matches(&self, e: &LiveEvent) -> bool {
        self.integration.as_deref().is_none_or(|i| {
            e.integration.as_deref() == Some(i) || e.records.iter().any(|r| &*r.integration == i)
        }) && self.source.is_none_or(|s| s == e.source)
            // `Track` finds `track`: a person types the filter, a sender set the type.
            && self.event_type.as_deref().is_none_or(|t| t.eq_ignore_ascii_case(&e.event_type))
            && self.outcome.is_none_or(|o| o == e.outcome)
    }
}

/// A filter field that does not name a source or an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{given}`; use one of: {choices}")]
pub struct FilterError {
    /// `source` or `outcome`.
    pub what: &'static str,
    /// What was given.
    pub given: String,
    /// The names accepted.
    pub choices: String,
}

impl Filter {
    /// A filter from text fields; empty fields match everything. Every field that names no
    /// source or outcome is reported.
    pub fn parse(
        integration: &str,
        source: &str,
        event_type: &str,
        outcome: &str,
    ) -> Result<Filter, Vec<FilterError>> {
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        let mut errors = Vec::new();
        let source = named(&mut errors, "source", text(source), Source::parse, || {
            "signal, customerio".into()
        });
        let outcome = named(&mut errors, "outcome", text(outcome), Outcome::parse, || {
            Outcome::ALL.map(Outcome::as_str).join(", ")
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Filter {
            integration: text(integration),
            source,
            event_type: text(event_type),
            outcome,
        })
    }
}

/// `given` read with `parse`; a name it does not know joins `errors`, with the `choices`.
fn named<T>(
    errors: &mut Vec<FilterError>,
    what: &'static str,
    given: Option<String>,
    parse: impl Fn(&str) -> Option<T>,
    choices: impl Fn() -> String,
) -> Option<T> {
    let given = given?;
    let found = parse(&given);
    if found.is_none() {
        errors.push(FilterError {
            what,
            given,
            choices: choices(),
        });
    }
    found
}

/// The answer to a filter with unknown names: each in a field violation of its own.
pub fn filter_error(errors: &[FilterError]) -> crate::error::ApiError {
    use crate::error::{ApiError, FieldViolation};
    match errors {
        [one] => ApiError::field(one.what, one.to_string()),
        many => ApiError::violations(
            "filter",
            many.iter()
                .map(|e| FieldViolation::new(e.what, e.to_string()))
                .collect(),
        ),
    }
}

/// The live-event bus: the pipeline publishes, watchers subscribe.
#[derive(Clone, Debug)]
pub struct LiveBus {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    /// Cancelled at shutdown, so open watches end and the servers can stop.
    closed: CancellationToken,
    /// Events watchers lost by falling behind, for metrics.
    lost: Arc<AtomicU64>,
}

impl LiveBus {
    /// A bus keeping the last `buffer` events for watchers that fall behind.
    pub fn new(buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        LiveBus {
            tx,
            closed: CancellationToken::new(),
            lost: Arc::new(AtomicU64::new(0)),
        }
    }

    /// True while someone watches; publishers build live events only then.
    pub fn watching(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// The number of watchers.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Events watchers lost by falling behind, since start.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Publishes `event` to every watcher. Never waits: a full buffer overwrites its oldest
    /// event, which the watchers that had not read it yet are told they lost.
    pub fn publish(&self, event: LiveEvent) {
        // An error only means nobody watches.
        let _ = self.tx.send(Arc::new(event));
    }

    /// Starts watching the events that pass `filter`, from now on.
    pub fn subscribe(&self, filter: Filter) -> Watcher {
        Watcher {
            rx: self.tx.subscribe(),
            filter,
            closed: self.closed.clone(),
            lost: self.lost.clone(),
        }
    }

    /// Ends every watch (shutdown).
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// What a watcher sees next.
#[derive(Debug, Clone)]
pub enum Seen {
    /// An event that passed the filter.
    Event(Arc<LiveEvent>),
    /// The watcher fell behind and lost this many events (counted before filtering).
    Dropped(u64),
}

/// One subscription to the bus.
#[derive(Debug)]
pub struct Watcher {
    rx: broadcast::Receiver<Arc<LiveEvent>>,
    filter: Filter,
    closed: CancellationToken,
    lost: Arc<AtomicU64>,
}

impl Watcher {
    /// The next event that passes the filter, or a lag notice; `None` once the bus closed.
    pub async fn next(&mut self) -> Option<Seen> {
        loop {
            let received = tokio::select! {
                biased;
                _ = self.closed.cancelled() => return None,
                r = self.rx.recv() => r,
            };
            match received {
                Ok(e) if self.filter.matches(&e) => return Some(Seen::Event(e)),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    self.lost.fetch_add(n, Ordering::Relaxed);
                    return Some(Seen::Dropped(n));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests;
