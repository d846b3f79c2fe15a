//! The queue between ingest and delivery.
//!
//! Input: mapped records from ingest ([`NewRecord`]). Output: leased batches of
//! [`QueuedRecord`]s for delivery, and their final states (delivered, retry later, dead letter).
//! An ingest call is answered OK only after [`Queue::enqueue`] returns, so whatever backs the
//! queue decides what "accepted" survives. The trait is the seam; the backends beside it are
//! `memory.rs` (bounded, not durable), `sqlite.rs` (embedded, durable, one relay) and `nats.rs`
//! (NATS JetStream, durable, shared by several relays). This module never talks to Lytics and
//! never maps events.

mod checkpoint;
mod dedup;
mod memory;
mod nats;
mod sqlite;
mod wal_sync;

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use dedup::Dedup;
pub use memory::MemoryQueue;
pub use nats::{NatsOptions, NatsQueue};
pub use sqlite::SqliteQueue;

use crate::rules::Source;

/// The `stream` of a record bound for its integration's configured stream, resolved when it is
/// delivered, so changing the integration's stream redirects the records still queued.
pub const INTEGRATION_STREAM: &str = "";

/// A queue-assigned record id.
pub type RecordId = u64;

/// A record ready to be queued.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// The integration that delivers it.
    pub integration: Arc<str>,
    /// The Lytics stream.
    pub stream: Arc<str>,
    /// The record's event-time field, sent as `timestamp_field`.
    pub timestamp_field: Arc<str>,
    /// The rule that built it.
    pub rule: Arc<str>,
    /// The rule-set version that built it.
    pub rules_version: Arc<str>,
    /// Where the event came from.
    pub source: Source,
    /// The event's id (message id or Customer.io event id).
    pub event_id: Arc<str>,
    /// The event type (`track`, `page`, `email_opened`, …), for the live view and metrics.
    pub event_type: Arc<str>,
    /// The record, serialised as one JSON object.
    pub body: Bytes,
    /// The original input event (JSON), shared by the records of one event.
    pub input: Bytes,
    /// The W3C `traceparent` of the ingest span, so the delivery span can link to it.
    pub traceparent: Option<Arc<str>>,
    /// When the relay accepted the event (unix ms).
    pub accepted_ms: i64,
}

#[cfg(test)]
impl NewRecord {
    /// A small record of a Signal track event for `integration`'s own stream `s`, for tests to
    /// adjust with struct update syntax.
    pub fn sample(integration: &str) -> Self {
        NewRecord {
            integration: Arc::from(integration),
            stream: Arc::from("s"),
            timestamp_field: Arc::from("_ts"),
            rule: Arc::from("r"),
            rules_version: Arc::from("v"),
            source: Source::Signal,
            event_id: Arc::from("e"),
            event_type: Arc::from("track"),
            body: Bytes::from_static(b"{}"),
            input: Bytes::from_static(b"{}"),
            traceparent: None,
            accepted_ms: 0,
        }
    }
}

/// The records of one event, stored together or not at all.
#[derive(Debug, Clone)]
pub struct EventRecords {
    /// The event's dedup key (`<source>:<event id>`): an event whose key was stored within the
    /// dedup window is a duplicate and its records are not stored again. `None` when the relay
    /// made the id up (the sender gave none): such an event cannot repeat, so nothing is kept.
    pub dedup_key: Option<Arc<str>>,
    /// The records.
    pub records: Vec<NewRecord>,
}

/// A queued record with its delivery state.
#[derive(Debug, Clone)]
pub struct QueuedRecord {
    /// The queue's id.
    pub id: RecordId,
    /// The record as enqueued.
    pub record: NewRecord,
    /// Attempts made so far.
    pub attempts: u32,
    /// The outcome of each attempt so far, oldest first.
    pub history: Vec<Attempt>,
}

impl QueuedRecord {
    /// The Lytics calls the record was in so far that failed, whether they spent one of its
    /// attempts or were deferred (a hand-back or hold without a call is not one).
    pub fn calls_failed(&self) -> u32 {
        let n = self
            .history
            .iter()
            .filter(|a| matches!(a.kind, AttemptKind::Spent | AttemptKind::Deferred))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The failures (spent or deferred) since the record was last held or replayed, oldest
    /// first: its current run of retries.
    fn retry_run(&self) -> &[Attempt] {
        let start = self
            .history
            .iter()
            .rposition(|a| a.kind == AttemptKind::Held)
            .map_or(0, |i| i + 1);
        &self.history[start..]
    }

    /// When the current run of retries began (its first failure), if there is one.
    pub fn retrying_since(&self) -> Option<i64> {
        self.retry_run().first().map(|a| a.at_ms)
    }

    /// Failures in the current run of retries: the exponent of the next backoff.
    pub fn failures_in_run(&self) -> u32 {
        u32::try_from(self.retry_run().len()).unwrap_or(u32::MAX)
    }
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    /// When (unix ms).
    pub at_ms: i64,
    /// The HTTP status, when Lytics answered.
    pub status: Option<u16>,
    /// What happened.
    pub detail: String,
    /// What the attempt did to the record's retries (histories stored before this field read
    /// as [`AttemptKind::Spent`]).
    #[serde(default)]
    pub kind: AttemptKind,
}

/// What a failed attempt does to a record's retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptKind {
    /// A failure that may be the record's own (a 5xx, 408, timeout or connection error while
    /// Lytics otherwise answers): it spends one of `max_attempts`.
    #[default]
    Spent,
    /// A failure of Lytics as a whole (a call during an outage hold, a 429): retried with
    /// backoff and bounded by `max_retry_age`, without spending an attempt.
    Deferred,
    /// Put back while the integration is paused (a setup error): spends no attempt and
    /// restarts the retry clock.
    Held,
}

impl AttemptKind {
    /// The name shown in histories (`spent`, `deferred`, `held`).
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptKind::Spent => "spent",
            AttemptKind::Deferred => "deferred",
            AttemptKind::Held => "held",
        }
    }
}

/// A record given up on.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The dead letter's id (for replay).
    pub id: i64,
    /// The record and its attempts.
    pub queued: QueuedRecord,
    /// Why it was given up on.
    pub reason: String,
    /// When (unix ms).
    pub at_ms: i64,
}

/// One dead letter to put back in the queue.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The dead letter's id.
    pub id: i64,
    /// Its record mapped again by the rules in force; `None` replays it as stored.
    pub remapped: Option<NewRecord>,
}

impl Replay {
    /// The record to queue for dead letter `stored`: the stored one, or the remapped one with
    /// the stored input, event and trace context.
    pub fn record(&self, stored: &NewRecord) -> NewRecord {
        match &self.remapped {
            None => stored.clone(),
            Some(r) => NewRecord {
                stream: r.stream.clone(),
                timestamp_field: r.timestamp_field.clone(),
                rule: r.rule.clone(),
                rules_version: r.rules_version.clone(),
                body: r.body.clone(),
                ..stored.clone()
            },
        }
    }
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only this integration.
    pub integration: Option<String>,
    /// Only this stream.
    pub stream: Option<String>,
    /// Only reasons containing this text.
    pub reason: Option<String>,
    /// Only dead-lettered at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Only dead-lettered before (unix ms).
    pub until_ms: Option<i64>,
    /// Only ids below this (the page cursor).
    pub before_id: Option<i64>,
    /// At most this many (newest first).
    pub limit: usize,
}

impl DeadLetterFilter {
    /// Whether `d` passes the filter.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let r = &d.queued.record;
        self.integration.as_deref().is_none_or(|i| i == &*r.integration)
            && self.stream.as_deref().is_none_or(|s| s == &*r.stream)
            && self.reason.as_deref().is_none_or(|t| d.reason.contains(t))
            && self.since_ms.is_none_or(|t| d.at_ms >= t)
            && self.until_ms.is_none_or(|t| d.at_ms < t)
            && self.before_id.is_none_or(|b| d.id < b)
    }
}

/// Queue failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The queue holds its configured maximum.
    #[error("the delivery queue is full ({capacity} records); retry later")]
    Full {
        /// The configured capacity.
        capacity: usize,
    },
    /// The queue is closed for shutdown.
    #[error("the relay is shutting down")]
    Closed,
    /// The backing store failed.
    #[error("queue store failed: {0}")]
    Store(String),
    /// Another call is storing the same event at this moment (a shared queue's server refuses
    /// the second of two simultaneous writes of one event id until the first is done).
    #[error("the same event is being stored by another call right now; retry shortly")]
    InProcess,
}

/// The queue seam between ingest and delivery.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores the records of each event unless the event is a duplicate; returns, per event,
    /// whether it was a duplicate. Returns only once the records are as safe as the backend
    /// makes them; on error nothing of the call is stored.
    async fn enqueue(&self, events: Vec<EventRecords>) -> Result<Vec<bool>, QueueError>;

    /// Takes up to `max` records that are due, skipping integrations `skip` names. Leased
    /// records are invisible to other leases until acked, retried or dead-lettered.
    async fn lease(&self, max: usize, skip: &HashSet<String>) -> Result<Vec<QueuedRecord>, QueueError>;

    /// Records were delivered: forget them.
    async fn ack(&self, ids: &[RecordId]) -> Result<(), QueueError>;

    /// Records go back to the queue, due at `due_ms`, with the attempt appended to their
    /// history; an attempt of kind [`AttemptKind::Spent`] adds one to their `attempts`.
    async fn retry(
        &self,
        records: Vec<QueuedRecord>,
        due_ms: i64,
        attempt: Attempt,
    ) -> Result<(), QueueError>;

    /// Records are given up on, with the reason.
    async fn dead_letter(&self, records: Vec<QueuedRecord>, reason: String) -> Result<(), QueueError>;

    /// Dead letters, newest first.
    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError>;

    /// Puts dead letters back in the queue as new records (attempts reset, due now); returns
    /// the ids of those found (and replayed). The embedded and memory queues refuse them all
    /// with [`QueueError::Full`] when the dead letters among them would put the queue past its
    /// capacity, checked with the depth at the moment of the replay; on NATS the stream's limit
    /// stops the replay at the first record that does not fit.
    async fn replay(&self, ids: &[i64]) -> Result<Vec<i64>, QueueError> {
        let replays: Vec<Replay> = ids.iter().map(|&id| Replay { id, remapped: None }).collect();
        self.replay_records(&replays).await
    }

    /// [`Queue::replay`], where a replay may carry the dead letter's record mapped again by the
    /// rules now in force: its body, stream, timestamp field, rule and rule-set version replace
    /// the stored ones (the input, event and trace context stay).
    async fn replay_records(&self, replays: &[Replay]) -> Result<Vec<i64>, QueueError>;

    /// The dead letters with these ids (those that exist), newest first.
    async fn dead_letters_by_id(&self, ids: &[i64]) -> Result<Vec<DeadLetter>, QueueError> {
        let mut found = Vec::new();
        for &id in ids {
            let filter = DeadLetterFilter {
                before_id: Some(id.saturating_add(1)),
                limit: 1,
                ..DeadLetterFilter::default()
            };
            found.extend(
                self.dead_letters(filter)
                    .await?
                    .into_iter()
                    .filter(|d| d.id == id),
            );
        }
        found.sort_by_key(|d| std::cmp::Reverse(d.id));
        Ok(found)
    }

    /// The ids of the dead letters `filter` matches, newest first, without reading the records.
    async fn dead_letter_ids(&self, filter: DeadLetterFilter) -> Result<Vec<i64>, QueueError> {
        Ok(self
            .dead_letters(filter)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect())
    }

    /// The most records the queue holds (`queue.capacity`).
    fn capacity(&self) -> usize;

    /// True when an accepted record survives a crash of the process.
    fn durable(&self) -> bool;

    /// When the next record not of a `skip` integration falls due (unix ms), if any waits.
    async fn next_due(&self, skip: &HashSet<String>) -> Result<Option<i64>, QueueError>;

    /// Makes the waiting retries of `integration` due now (Lytics answers again, so records
    /// backing off need not wait out their backoff); returns how many. Backends without a
    /// cheap way to do so may leave retries as scheduled.
    async fn expedite(&self, _integration: &str) -> Result<usize, QueueError> {
        Ok(0)
    }

    /// Records waiting or in flight.
    fn depth(&self) -> usize;

    /// Resolves when records may have become due (an enqueue or a retry).
    async fn wait_for_work(&self, timeout: std::time::Duration);

    /// When the relay accepted the record queued first that is still queued (waiting or in
    /// flight), in unix ms; `None` when the queue is empty. For the queue-age metric.
    async fn oldest_accepted_ms(&self) -> Result<Option<i64>, QueueError>;
    /// The backend's name, as configured (`embedded`, `memory`, `nats`).
    fn backend(&self) -> &'static str;

    /// Whether other relay processes lease from this queue too (their integrations may differ
    /// from this one's while a configuration change rolls out).
    fn shared(&self) -> bool {
        false
    }

    /// Hands leased records back unchanged (no attempt, no history entry), for any relay of a
    /// shared queue to lease again after `delay`. A queue that is not shared keeps them, due
    /// after `delay`, as a retry without an attempt.
    async fn release(
        &self,
        records: Vec<QueuedRecord>,
        delay: std::time::Duration,
    ) -> Result<(), QueueError> {
        let due = crate::timefmt::now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        let attempt = Attempt {
            at_ms: crate::timefmt::now_ms(),
            status: None,
            detail: "handed back: its integration is not in force here".into(),
            kind: AttemptKind::Held,
        };
        self.retry(records, due, attempt).await
    }

    /// Why the backend refuses every operation until the relay restarts, if it does.
    fn fault(&self) -> Option<String> {
        None
    }

    /// Whether the backend can reach its store right now (a local store always can).
    fn connected(&self) -> bool {
        true
    }

    /// Bytes the queue's files take on this machine's disk, for a backend that keeps any.
    fn disk_bytes(&self) -> Option<u64> {
        None
    }

    /// Event ids this process's dedup index remembers, for a backend that keeps one (NATS's is
    /// in the server).
    fn dedup_ids(&self) -> Option<usize> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(at_ms: i64, kind: AttemptKind) -> Attempt {
        Attempt {
            at_ms,
            status: Some(503),
            detail: "x".into(),
            kind,
        }
    }

    #[test]
    fn the_retry_clock_runs_from_the_first_failure_after_the_last_hold() {
        let mut q = QueuedRecord {
            id: 1,
            record: NewRecord::sample("lytics"),
            attempts: 0,
            history: Vec::new(),
        };
        assert_eq!((q.retrying_since(), q.failures_in_run()), (None, 0));
        q.history = vec![
            attempt(10, AttemptKind::Spent),
            attempt(20, AttemptKind::Deferred),
        ];
        assert_eq!((q.retrying_since(), q.failures_in_run()), (Some(10), 2));
        q.history.push(attempt(30, AttemptKind::Held));
        assert_eq!((q.retrying_since(), q.failures_in_run()), (None, 0));
        q.history.push(attempt(40, AttemptKind::Deferred));
        assert_eq!((q.retrying_since(), q.failures_in_run()), (Some(40), 1));
    }

    #[test]
    fn histories_stored_before_attempt_kinds_read_as_spent() {
        let old: Attempt = serde_json::from_str(r#"{"at_ms":1,"status":503,"detail":"x"}"#).unwrap();
        assert_eq!(old.kind, AttemptKind::Spent);
        let json = serde_json::to_string(&attempt(1, AttemptKind::Deferred)).unwrap();
        assert!(json.contains(r#""kind":"deferred""#), "{json}");
    }
}
