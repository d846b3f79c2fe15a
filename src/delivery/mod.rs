//! The delivery stage: lease records from the queue, batch them per (integration, stream),
//! post them to Lytics, and settle each record as delivered, retry-later, paused or dead letter.
//!
//! Input: the queue. Output: collect calls, one OpenTelemetry span per call, and record states
//! written back to the queue. Policy:
//! - 2xx: delivered; a `rejected_count` above zero is logged and counted as a partial failure.
//! - 408, 429, 5xx, timeouts, connection errors: retried with full-jitter exponential backoff,
//!   then dead-lettered once `max_attempts` are spent or the record has been retried for
//!   `max_retry_age`. Only a failure that may be the record's own spends an attempt: a call
//!   that fails while Lytics is down for the whole integration (an outage hold) or answers 429
//!   defers its records without spending one, so an outage or throttling is bounded by
//!   `max_retry_age` alone.
//! - 401, 403, 404, 400 naming the account (when a `dryrun` call confirms it): a setup error.
//!   The integration pauses with the seed's troubleshooting text; its records stay queued
//!   without spending attempts; a periodic `dryrun` probe (or a config change) resumes it.
//! - Other 400s: the batch is split to isolate the bad records; only they are dead-lettered.
//!
//! Never maps events and never holds records outside the queue's lease.

pub mod backoff;
pub mod limit;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::DeliverySettings;
use crate::integration::{Integration, Integrations};
use crate::live::{self, CallResult};
use crate::lytics::{self, CollectSender, CollectTarget, LyticsClient, Outcome};
use crate::monitor::Monitor;
use crate::queue::{Attempt, AttemptKind, Queue, QueuedRecord};
use crate::telemetry::{Telemetry, Throttle, fail_span, names};
use crate::timefmt::{self, now_ms};
use backoff::Backoff;

/// The longest the dispatcher sleeps without news from the queue.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// Records batch together when they share integration, stream and timestamp field.
type BatchKey = (Arc<str>, Arc<str>, Arc<str>);

/// Why an integration is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// The status Lytics answered.
    pub status: u16,
    /// The seed's troubleshooting text.
    pub hint: String,
    /// Lytics' message.
    pub message: String,
    /// Since when (unix ms).
    pub since_ms: i64,
    /// Paused by an operator (not by a Lytics answer): probes do not resume it.
    pub manual: bool,
    /// The stream of the call Lytics refused, which the probe checks (a stream the rules chose
    /// may not be the integration's own).
    pub stream: Option<String>,
}

/// Retryable failures in a row (5xx, 408, timeouts, connection errors) after which an
/// integration is taken to be down.
const OUTAGE_AFTER_FAILED_CALLS: u32 = 3;
/// The longest an integration in an outage waits between calls.
const OUTAGE_MAX_HOLD: Duration = Duration::from_secs(30);
/// The first hold of an outage, doubled with each further failed call.
const OUTAGE_FIRST_HOLD: Duration = Duration::from_secs(1);

/// An integration whose calls keep failing with retryable errors.
///
/// From the third failed call in a row, delivery holds the integration: no lease takes its
/// records until `hold_until_ms`, and then a single call at a time probes Lytics, the hold
/// doubling (from [`OUTAGE_FIRST_HOLD`], at most [`OUTAGE_MAX_HOLD`] and the backoff maximum) with
/// each further failure. Without it, a down Lytics would see every queued record leased, sent,
/// failed and rescheduled over and over, spending the relay's CPU and the records' attempts on
/// calls that cannot succeed. Any answer that is not a retryable failure ends the outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Outage {
    /// Failed calls in a row.
    pub failed_calls: u32,
    /// No new call before this time (unix ms).
    pub hold_until_ms: i64,
}

/// Counters of the delivery stage.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    /// Collect calls made.
    pub calls: AtomicU64,
    /// Records Lytics took.
    pub delivered: AtomicU64,
    /// Records Lytics refused inside a 200 (`rejected_count`).
    pub rejected_in_200: AtomicU64,
    /// Records scheduled for retry.
    pub retried: AtomicU64,
    /// Records dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Calls that found a setup error.
    pub setup_errors: AtomicU64,
}

/// What delivery reports about itself.
#[derive(Debug, Default)]
pub struct DeliveryState {
    paused: Mutex<HashMap<String, Pause>>,
    /// When each integration last resumed from a pause (unix ms): its records' retry clocks
    /// run from then at the earliest, so a pause does not count as time spent retrying.
    resumed_ms: Mutex<HashMap<String, i64>>,
    /// Integrations whose retries come forward at their next success: every one at start,
    /// and one whose calls fail into an outage.
    expedite_at_success: Mutex<HashSet<String>>,
    limits: Mutex<HashMap<String, limit::Aimd>>,
    /// Integrations whose last calls all failed with retryable errors (Lytics down).
    outages: Mutex<HashMap<String, Outage>>,
    /// Signalled when a delivery task frees its slots, so a dispatcher waiting on saturated
    /// integrations leases again at once.
    slot_freed: tokio::sync::Notify,
    /// The counters.
    pub counters: DeliveryCounters,
}

impl DeliveryState {
    /// Paused integrations and why.
    pub fn paused(&self) -> HashMap<String, Pause> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn pause(&self, id: &str, pause: Pause) -> bool {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        let first = !p.contains_key(id);
        p.entry(id.to_string()).or_insert(pause);
        first
    }

    /// The current limit of calls in flight per integration.
    pub fn limits(&self) -> HashMap<String, usize> {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.iter().map(|(k, a)| (k.clone(), a.limit())).collect()
    }

    /// Integrations that are paused or at their limit of calls in flight.
    fn skipped(&self) -> HashSet<String> {
        let mut skip: HashSet<String> = self.paused().into_keys().collect();
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        skip.extend(
            limits
                .iter()
                .filter(|(_, a)| a.saturated())
                .map(|(k, _)| k.clone()),
        );
        // In an outage: nothing until the hold ends, then one call at a time.
        let now = now_ms();
        let outages = self.outages.lock().unwrap_or_else(|e| e.into_inner());
        skip.extend(
            outages
                .iter()
                .filter(|(id, o)| {
                    o.failed_calls >= OUTAGE_AFTER_FAILED_CALLS
                        && (o.hold_until_ms > now
                            || limits.get(id.as_str()).is_some_and(|a| a.in_flight() > 0))
                })
                .map(|(id, _)| id.clone()),
        );
        skip
    }

    /// Integrations in an outage: their last three calls or more failed
    /// with retryable errors, so delivery holds them. Fewer failures in a row are counted but
    /// are no outage yet.
    pub fn outages(&self) -> HashMap<String, Outage> {
        self.outages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, o)| o.failed_calls >= OUTAGE_AFTER_FAILED_CALLS)
            .map(|(id, o)| (id.clone(), *o))
            .collect()
    }

    /// A call failed with a retryable error; returns the outage when the integration is in one.
    fn call_failed(&self, id: &str, backoff: &Backoff) -> Option<Outage> {
        let mut outages = self.outages.lock().unwrap_or_else(|e| e.into_inner());
        let o = outages.entry(id.to_string()).or_insert(Outage {
            failed_calls: 0,
            hold_until_ms: 0,
        });
        o.failed_calls += 1;
        if o.failed_calls < OUTAGE_AFTER_FAILED_CALLS {
            return None;
        }
        let doublings = (o.failed_calls - OUTAGE_AFTER_FAILED_CALLS).min(31);
        let hold = OUTAGE_FIRST_HOLD
            .saturating_mul(1 << doublings)
            .min(OUTAGE_MAX_HOLD)
            .min(backoff.ceiling(u32::MAX));
        o.hold_until_ms = now_ms() + i64::try_from(hold.as_millis()).unwrap_or(i64::MAX / 2);
        Some(*o)
    }

    /// Lytics answered a call with anything but a retryable failure: no outage. Returns whether
    /// there was one.
    fn call_answered(&self, id: &str) -> bool {
        let mut outages = self.outages.lock().unwrap_or_else(|e| e.into_inner());
        outages
            .remove(id)
            .is_some_and(|o| o.failed_calls >= OUTAGE_AFTER_FAILED_CALLS)
    }

    /// When the next outage hold ends, if one is running.
    fn next_hold_end(&self) -> Option<i64> {
        let now = now_ms();
        let outages = self.outages.lock().unwrap_or_else(|e| e.into_inner());
        outages
            .values()
            .map(|o| o.hold_until_ms)
            .filter(|&t| t > now)
            .min()
    }

    /// A delivery task takes a slot of each integration it will call, before it starts, so
    /// the next lease already sees them saturated.
    fn hold(&self, ids: &[Arc<str>], max: usize) {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            limits
                .entry(id.to_string())
                .or_insert_with(|| limit::Aimd::new(max))
                .hold();
        }
    }

    /// The task is done: its slots are free, and the dispatcher may lease for them.
    fn release(&self, ids: &[Arc<str>]) {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(a) = limits.get_mut(&**id) {
                a.release();
            }
        }
        drop(limits);
        self.slot_freed.notify_one();
    }

    fn end_call(&self, id: &str, throttled: bool, success: bool) {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = limits.get_mut(id) {
            let before = a.limit();
            a.answered(throttled, success);
            if a.limit() != before {
                tracing::info!(
                    integration = id,
                    limit = a.limit(),
                    "calls in flight limit changed"
                );
            }
        }
    }

    /// Pauses an integration on an operator's request; events stay queued.
    pub fn pause_manual(&self, id: &str) {
        let pause = Pause {
            status: 0,
            hint: "paused by an operator; resume it to deliver".into(),
            message: String::new(),
            since_ms: now_ms(),
            manual: true,
            stream: None,
        };
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), pause);
    }

    /// Resumes an integration (its config changed, or a probe succeeded).
    pub fn resume(&self, id: &str) -> bool {
        self.resume_if(id, |_| true)
    }

    /// Resumes `id` if it is still paused by `probed` (not since re-paused or paused by an
    /// operator while the probe ran).
    fn resume_probed(&self, id: &str, probed: &Pause) -> bool {
        self.resume_if(id, |p| !p.manual && p.since_ms == probed.since_ms)
    }

    /// Updates the reason of `id`'s pause if it is still the one `probed` (the probe found
    /// another setup error), keeping its start so that later probes still match it.
    fn repause_probed(&self, id: &str, probed: &Pause, status: u16, hint: &str, message: &str) -> bool {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        match paused.get_mut(id) {
            Some(p) if !p.manual && p.since_ms == probed.since_ms => {
                p.status = status;
                p.hint = hint.to_string();
                p.message = message.to_string();
                true
            }
            _ => false,
        }
    }

    /// Resumes `id` if its pause passes `check`, deciding and removing under one lock.
    fn resume_if(&self, id: &str, check: impl FnOnce(&Pause) -> bool) -> bool {
        {
            let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            if !paused.get(id).is_some_and(check) {
                return false;
            }
            paused.remove(id);
        }
        self.resumed_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), now_ms());
        true
    }

    /// Since when `record` has been retried, leaving out any pause of its integration.
    fn retrying_since(&self, record: &QueuedRecord) -> Option<i64> {
        let since = record.retrying_since()?;
        let resumed = self.resumed_ms.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            resumed
                .get(&*record.record.integration)
                .map_or(since, |&r| since.max(r)),
        )
    }
}

/// The delivery stage.
#[derive(Clone)]
pub struct Delivery {
    queue: Arc<dyn Queue>,
    integrations: Integrations,
    client: Arc<dyn CollectSender>,
    telemetry: Telemetry,
    settings: DeliverySettings,
    backoff: Backoff,
    state: Arc<DeliveryState>,
    /// Reports each call and each settled record to metrics and the live bus.
    monitor: Monitor,
}

impl Delivery {
    /// Wires the stage.
    pub fn new(
        queue: Arc<dyn Queue>,
        integrations: Integrations,
        telemetry: Telemetry,
        settings: DeliverySettings,
    ) -> Result<Self, String> {
        let client: Arc<dyn CollectSender> = Arc::new(LyticsClient::new(settings.request_timeout)?);
        let backoff =
            Backoff::try_new(settings.backoff_base, settings.backoff_max).map_err(|e| e.to_string())?;
        Ok(Delivery {
            queue,
            integrations,
            client,
            telemetry,
            settings,
            backoff,
            state: Arc::new(DeliveryState::default()),
            monitor: Monitor::detached(),
        })
    }

    /// Reports calls and settled records to `monitor` (metrics, live events).
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Where this stage's `dryrun` calls are reported.
    fn probe_reporter(&self) -> ProbeReporter {
        ProbeReporter {
            telemetry: self.telemetry.clone(),
            monitor: self.monitor.clone(),
        }
    }

    /// Sends through `sender` instead of the HTTP client (tests script Lytics' answers).
    pub fn with_sender(mut self, sender: Arc<dyn CollectSender>) -> Self {
        self.client = sender;
        self
    }

    /// The stage's state (pauses, counters).
    pub fn state(&self) -> Arc<DeliveryState> {
        self.state.clone()
    }

    /// Runs until `shutdown`; then lets calls in flight finish within `grace` and returns
    /// whether they all did.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) -> bool {
        // Records a previous run left backing off keep their due times; the first success of
        // each integration brings them forward, as the success ending an outage does.
        self.state
            .expedite_at_success
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(self.integrations.snapshot().iter().map(|i| i.id.to_string()));
        // Leases in flight across all integrations; each integration is further held to its own
        // AIMD limit by being skipped in leases while saturated. A lease's task holds a slot of
        // each integration in it from the lease until it is done, and makes its calls one at a
        // time, so an integration never has more calls in flight than its limit.
        let slots = Arc::new(Semaphore::new(self.settings.max_in_flight * 8));
        let mut tasks = JoinSet::new();
        let prober = {
            let d = self.clone();
            let s = shutdown.clone();
            tokio::spawn(async move { d.probe_stalled(s).await })
        };
        'outer: loop {
            // Sleep until new work arrives or the next retry falls due.
            let skip = self.state.skipped();
            let due: Option<i64> = self.queue.next_due(&skip).await.unwrap_or_default();
            let wake = due.into_iter().chain(self.state.next_hold_end()).min();
            let wait = match wake {
                Some(at) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)).min(IDLE_WAIT),
                None => IDLE_WAIT,
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.queue.wait_for_work(wait) => {}
                    _ = self.state.slot_freed.notified() => {}
                }
            }
            if !self.settings.linger.is_zero() && self.queue.depth() < self.settings.batch_max_records {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(self.settings.linger) => {}
                }
            }
            loop {
                while tasks.try_join_next().is_some() {}
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                };
                let skip = self.state.skipped();
                let leased = match self.queue.lease(self.settings.batch_max_records, &skip).await {
                    Ok(l) => l,
                    Err(e) => {
                        // Repeats while the store is out of reach: one line per 10 s.
                        static LOGGED: Throttle = Throttle::new(10_000);
                        if let Some(held_back) = LOGGED.pass() {
                            tracing::error!(error = %e, failures_since_last_line = held_back, "cannot lease records");
                        }
                        break;
                    }
                };
                if leased.is_empty() {
                    break;
                }
                // A partial batch took every due record: the next one waits out the linger
                // (outer loop) rather than leasing the few that arrive meanwhile.
                let partial = leased.len() < self.settings.batch_max_records;
                let mut held: Vec<Arc<str>> = leased.iter().map(|r| r.record.integration.clone()).collect();
                held.sort_unstable();
                held.dedup();
                self.state.hold(&held, self.settings.max_in_flight);
                let d = self.clone();
                tasks.spawn(async move {
                    d.deliver(leased).await;
                    d.state.release(&held);
                    drop(permit);
                });
                if partial {
                    break;
                }
            }
        }
        prober.abort();
        let _ = prober.await;
        let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_ok();
        if !drained {
            // Cut off, and waited for: each call's span is ended as cut off before the
            // exporters are flushed.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        drained
    }

    /// Groups leased records per (integration, stream, timestamp field) and delivers each group
    /// in batches within the count and byte limits.
    async fn deliver(&self, leased: Vec<QueuedRecord>) {
        // Few groups and long runs of one key: a list searched from the last group used beats
        // hashing three strings per record.
        let mut groups: Vec<(BatchKey, Vec<QueuedRecord>)> = Vec::new();
        // Each integration's own stream, looked up once per lease.
        let mut own_streams: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let mut last = 0;
        for mut r in leased {
            if &*r.record.stream == crate::queue::INTEGRATION_STREAM {
                let known = own_streams
                    .iter()
                    .find(|(id, _)| *id == r.record.integration)
                    .map(|(_, stream)| stream.clone());
                let stream = known.or_else(|| {
                    let i = self.integrations.get(&r.record.integration)?;
                    let stream: Arc<str> = Arc::from(i.stream_name.as_str());
                    own_streams.push((r.record.integration.clone(), stream.clone()));
                    Some(stream)
                });
                if let Some(stream) = stream {
                    r.record.stream = stream;
                }
            }
            let same = |(k, _): &(BatchKey, Vec<QueuedRecord>)| {
                k.0 == r.record.integration && k.1 == r.record.stream && k.2 == r.record.timestamp_field
            };
            let found = if groups.get(last).is_some_and(&same) {
                Some(last)
            } else {
                groups.iter().position(&same)
            };
            match found.and_then(|i| Some((i, groups.get_mut(i)?))) {
                Some((i, (_, group))) => {
                    last = i;
                    group.push(r);
                }
                None => {
                    let key = (
                        r.record.integration.clone(),
                        r.record.stream.clone(),
                        r.record.timestamp_field.clone(),
                    );
                    last = groups.len();
                    groups.push((key, vec![r]));
                }
            }
        }
        for ((integration_id, _, _), records) in groups {
            let Some(integration) = self.integrations.get(&integration_id) else {
                self.not_in_force(&integration_id, records).await;
                continue;
            };
            let mut batch = Vec::with_capacity(records.len().min(self.settings.batch_max_records));
            let mut bytes = 2;
            for r in records {
                let size = r.record.body.len() + 1;
                if !batch.is_empty()
                    && (batch.len() >= self.settings.batch_max_records
                        || bytes + size > self.settings.batch_max_bytes)
                {
                    self.send(&integration, std::mem::take(&mut batch)).await;
                    bytes = 2;
                }
                bytes += size;
                batch.push(r);
            }
            if !batch.is_empty() {
                self.send(&integration, batch).await;
            }
        }
    }

    /// Sends one batch and settles its records. A 400 about the payload splits the batch and
    /// sends the halves, so only the bad records end in the dead-letter queue.
    async fn send(&self, integration: &Integration, batch: Vec<QueuedRecord>) {
        let mut pending = vec![batch];
        // The bad records the halving isolates: dead-lettered as found, logged once per reason
        // at the end rather than once per record.
        let mut refused = Refused::default();
        while let Some(batch) = pending.pop() {
            if let Some(halves) = self.send_one(integration, batch, &mut refused).await {
                pending.extend(halves);
            }
        }
        for (reason, (records, ids)) in refused.by_reason {
            tracing::warn!(
                integration = %integration.id,
                records,
                event_ids = %ids,
                %reason,
                "dead-lettered the records Lytics refused alone"
            );
        }
    }

    async fn send_one(
        &self,
        integration: &Integration,
        batch: Vec<QueuedRecord>,
        refused: &mut Refused,
    ) -> Option<[Vec<QueuedRecord>; 2]> {
        let first = batch.first()?;
        let stream = first.record.stream.clone();
        let ts_field = first.record.timestamp_field.clone();
        let target = CollectTarget {
            base_url: &integration.base_url,
            stream: &stream,
            account_id: integration.account_id.as_str(),
            timestamp_field: &ts_field,
            dryrun: false,
        };
        let url = match lytics::collect_url(&target) {
            Ok(u) => u,
            Err(e) => {
                self.pause(integration, None, (0, "fix the Lytics URL of the integration"), e);
                self.hold(batch).await;
                return None;
            }
        };
        let body = lytics::batch_body(batch.iter().map(|r| &r.record.body));
        // Calls before this one (deferred ones too), as the live view counts them.
        let attempt = batch.iter().map(QueuedRecord::calls_failed).max().unwrap_or(0);
        let mut attrs = call_attributes(&url, &stream, integration, batch.len());
        attrs.extend([
            KeyValue::new(names::LYTICS_ATTEMPT, i64::from(attempt) + 1),
            KeyValue::new(names::HTTP_REQUEST_RESEND_COUNT, i64::from(attempt)),
            KeyValue::new(
                names::LYTICS_RULES_VERSION,
                first.record.rules_version.to_string(),
            ),
        ]);
        let span = self.telemetry.start_call(
            batch.iter().filter_map(|r| r.record.traceparent.as_deref()),
            attrs,
        );
        self.state.counters.calls.fetch_add(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let result = self.client.post(url, &integration.api_token, body).await;
        let latency = started.elapsed();
        self.monitor.called(
            integration.id.as_str(),
            result.as_ref().map(|r| r.status).map_err(|e| e.kind()),
            latency,
        );
        let outcome = lytics::classify(&result);
        self.state.end_call(
            integration.id.as_str(),
            matches!(&result, Ok(r) if r.status == 429),
            matches!(outcome, Outcome::Delivered { .. }),
        );
        if let Some(mut s) = span {
            record_answer(s.span(), &result, &outcome);
            s.end();
        }
        let status = result.as_ref().ok().map(|r| r.status);
        self.settle(
            integration,
            batch,
            outcome,
            CallResult { status, latency },
            refused,
        )
        .await
    }

    async fn settle(
        &self,
        integration: &Integration,
        batch: Vec<QueuedRecord>,
        outcome: Outcome,
        call: CallResult,
        refused: &mut Refused,
    ) -> Option<[Vec<QueuedRecord>; 2]> {
        let c = &self.state.counters;
        let status = call.status;
        let stream = batch
            .first()
            .map_or(integration.stream_name.as_str(), |r| &*r.record.stream);
        let outcome = self.confirm_account_error(integration, stream, outcome).await;
        let outage = self.track_outage(integration, &outcome);
        match outcome {
            Outcome::Delivered {
                rejected_count,
                message_count,
            } => {
                let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();
                if let Err(e) = self.queue.ack(&ids).await {
                    tracing::error!(error = %e, "cannot mark records delivered; they may be sent again");
                }
                self.expedite_retries(integration).await;
                // Reported once the queue let go of them, so metrics and the queue agree.
                let detail = match rejected_count {
                    0 => String::new(),
                    n => format!("partial failure: Lytics rejected {n} record(s) of the call"),
                };
                self.monitor
                    .settled(&batch, live::Outcome::Delivered, &call, &detail);
                c.delivered.fetch_add(ids.len() as u64, Ordering::Relaxed);
                if rejected_count > 0 {
                    c.rejected_in_200.fetch_add(rejected_count, Ordering::Relaxed);
                    self.monitor
                        .metrics()
                        .rejected(integration.id.as_str(), rejected_count);
                    tracing::warn!(
                        integration = %integration.id,
                        stream = %batch[0].record.stream,
                        records = ids.len(),
                        message_count = message_count.unwrap_or(0),
                        rejected_count,
                        "partial failure: Lytics accepted the call but rejected some records"
                    );
                }
                None
            }
            Outcome::Retry { reason, status } => {
                // Lytics down for the whole integration, or throttling it, says nothing about
                // these records: they wait without spending an attempt.
                let kind = if outage.is_some() || status == Some(429) {
                    AttemptKind::Deferred
                } else {
                    AttemptKind::Spent
                };
                self.retry(batch, status, reason, &call, kind).await;
                None
            }
            Outcome::Setup {
                status,
                hint,
                message,
            } => {
                c.setup_errors.fetch_add(1, Ordering::Relaxed);
                self.monitor.settled(&batch, live::Outcome::Paused, &call, hint);
                let stream = batch.first().map(|r| r.record.stream.to_string());
                self.pause(integration, stream, (status, hint), message);
                self.hold(batch).await;
                None
            }
            Outcome::BadPayload { status: s, message } if batch.len() > 1 => {
                // Once per batch sent, not for each half.
                if !refused.splitting {
                    refused.splitting = true;
                    tracing::info!(
                        integration = %integration.id,
                        stream = %batch[0].record.stream,
                        status = s,
                        records = batch.len(),
                        lytics_message = %message,
                        "Lytics refused the batch; resending it in halves to find the bad records"
                    );
                }
                let detail = format!(
                    "Lytics refused the batch ({s}): {message}; resending it in halves to isolate the bad records"
                );
                self.monitor
                    .settled(&batch, live::Outcome::Failed, &call, &detail);
                let mut batch = batch;
                let second = batch.split_off(batch.len() / 2);
                Some([batch, second])
            }
            Outcome::BadPayload { status: s, message } => {
                let reason = format!("Lytics refused the record ({s}): {message}");
                self.monitor
                    .settled(&batch, live::Outcome::DeadLettered, &call, &reason);
                let batch = with_attempt(
                    batch,
                    Attempt {
                        at_ms: now_ms(),
                        status,
                        detail: reason.clone(),
                        kind: AttemptKind::Spent,
                    },
                );
                // Dead-lettered now (its lease must not run out meanwhile); logged once per
                // reason when the batch is done.
                let ids = event_ids(&batch);
                let n = batch.len();
                self.store_dead_letters(batch, reason.clone()).await;
                match refused.by_reason.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, (count, shown))) => {
                        *count += n;
                        if shown.len() < 200 {
                            shown.push(',');
                            shown.push_str(&ids);
                        }
                    }
                    None => refused.by_reason.push((reason, (n, ids))),
                }
                None
            }
        }
    }

    /// A 400 naming the account pauses the integration only if Lytics refuses the account
    /// itself: when a `dryrun` call with the same settings passes, the 400 was about the
    /// payload (a record field that mentions an account), and the batch is split like any bad
    /// payload. Otherwise such a batch would pause, pass the probe, resume and fail again
    /// forever.
    async fn confirm_account_error(
        &self,
        integration: &Integration,
        stream: &str,
        outcome: Outcome,
    ) -> Outcome {
        match outcome {
            Outcome::Setup {
                status: 400,
                message,
                hint,
            } => match probe_outcome(self.client.as_ref(), integration, stream, &self.probe_reporter()).await
            {
                Ok(Outcome::Delivered { .. }) => Outcome::BadPayload { status: 400, message },
                // Undecided: the batch is retried, and the confirmation with it.
                Ok(Outcome::Retry { status, reason }) => Outcome::Retry {
                    status,
                    reason: format!(
                        "Lytics answered 400 ({message}), and the dryrun call to tell whether the account is wrong failed: {reason}"
                    ),
                },
                Ok(Outcome::Setup { .. } | Outcome::BadPayload { .. }) | Err(_) => Outcome::Setup {
                    status: 400,
                    message,
                    hint,
                },
            },
            other => other,
        }
    }

    /// Counts retryable failures in a row (a 429 is Lytics answering, not failing) and logs
    /// when an outage hold begins, grows or ends. Returns the outage this call's failure is
    /// part of, if any. An outage marks the integration's retries to come forward at the
    /// success that ends it.
    fn track_outage(&self, integration: &Integration, outcome: &Outcome) -> Option<Outage> {
        let id = integration.id.as_str();
        match outcome {
            Outcome::Retry { reason, status } if *status != Some(429) => {
                let outage = self.state.call_failed(id, &self.backoff);
                if let Some(o) = outage {
                    self.state
                        .expedite_at_success
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.to_string());
                    tracing::warn!(
                        integration = id,
                        failed_calls = o.failed_calls,
                        hold_ms = o.hold_until_ms - now_ms(),
                        %reason,
                        "Lytics keeps failing: holding delivery, then probing with one call at a time; events stay queued without spending attempts"
                    );
                }
                outage
            }
            _ => {
                if self.state.call_answered(id) {
                    tracing::info!(integration = id, "Lytics answers again: the outage hold is over");
                }
                None
            }
        }
    }

    /// A retryable failure: the records go back with backoff, or to the dead-letter queue once
    /// their attempts are spent (`kind` [`AttemptKind::Spent`] spends one) or they have been
    /// retried for `max_retry_age`.
    async fn retry(
        &self,
        batch: Vec<QueuedRecord>,
        status: Option<u16>,
        reason: String,
        call: &CallResult,
        kind: AttemptKind,
    ) {
        let now = now_ms();
        let max_age = i64::try_from(self.settings.max_retry_age.as_millis()).unwrap_or(i64::MAX);
        let mut exhausted = Vec::new();
        let mut aged = Vec::new();
        let mut again = Vec::new();
        for r in batch {
            if kind == AttemptKind::Spent && r.attempts + 1 >= self.settings.max_attempts {
                exhausted.push(r);
            } else if self
                .state
                .retrying_since(&r)
                .is_some_and(|since| now - since >= max_age)
            {
                aged.push(r);
            } else {
                again.push(r);
            }
        }
        let attempt = Attempt {
            at_ms: now,
            status,
            detail: reason.clone(),
            kind,
        };
        if !exhausted.is_empty() {
            let n = exhausted.iter().map(|r| r.attempts + 1).max().unwrap_or(1);
            let why = format!("gave up after {n} attempt(s): {reason}");
            self.give_up(exhausted, &attempt, why, call).await;
        }
        if !aged.is_empty() {
            let why = format!(
                "gave up after retrying for {} (max_retry_age): {reason}",
                timefmt::human_duration(self.settings.max_retry_age)
            );
            self.give_up(aged, &attempt, why, call).await;
        }
        if again.is_empty() {
            return;
        }
        // Records retried together share one draw, so the batch stays together. The backoff
        // grows with every failure of the run, spent or deferred.
        let failures = again.iter().map(QueuedRecord::failures_in_run).max().unwrap_or(0);
        let delay = self.backoff.delay(failures, &mut rand::rng());
        let due = now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        self.state
            .counters
            .retried
            .fetch_add(again.len() as u64, Ordering::Relaxed);
        let spent =
            again.iter().map(|r| r.attempts).max().unwrap_or(0) + u32::from(kind == AttemptKind::Spent);
        tracing::info!(
            integration = %again[0].record.integration,
            stream = %again[0].record.stream,
            records = again.len(),
            failures = failures + 1,
            attempts_spent = spent,
            attempt = kind.as_str(),
            delay_ms = delay.as_millis() as u64,
            %reason,
            "retrying later"
        );
        let next = match kind {
            AttemptKind::Spent => format!("{reason}; next attempt in {} ms", delay.as_millis()),
            _ => format!(
                "{reason}; Lytics is down or throttling, so no attempt is spent; next attempt in {} ms",
                delay.as_millis()
            ),
        };
        self.monitor.settled(&again, live::Outcome::Retrying, call, &next);
        if let Err(e) = self.queue.retry(again, due, attempt).await {
            tracing::error!(error = %e, "cannot reschedule records");
        }
    }

    /// Dead-letters records with the failed attempt appended to their history.
    async fn give_up(&self, records: Vec<QueuedRecord>, attempt: &Attempt, why: String, call: &CallResult) {
        self.monitor
            .settled(&records, live::Outcome::DeadLettered, call, &why);
        let records = with_attempt(records, attempt.clone());
        self.dead_letter(records, why).await;
    }

    /// Lytics answers again after an outage (or for the first time since the relay started):
    /// records of the integration waiting out a backoff become due now, so a recovery drains
    /// the backlog at once instead of over the longest backoff. Only then: while Lytics merely
    /// fails now and then, bringing every retry forward at each success would spend the
    /// records' attempts as fast as calls fail.
    /// Returns how many records came forward.
    async fn expedite_retries(&self, integration: &Integration) -> usize {
        let was_backing_off = self
            .state
            .expedite_at_success
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(integration.id.as_str());
        if !was_backing_off {
            return 0;
        }
        match self.queue.expedite(integration.id.as_str()).await {
            Ok(0) => 0,
            Ok(n) => {
                tracing::info!(integration = %integration.id, records = n, "Lytics answers again: retries are due now");
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot bring retries forward");
                0
            }
        }
    }

    /// Whether the queue holds a record of integration `id` that is not in flight (when the
    /// queue cannot tell, it is taken to).
    async fn has_queued(&self, id: &str) -> bool {
        let others: HashSet<String> = self
            .integrations
            .snapshot()
            .iter()
            .map(|i| i.id.to_string())
            .filter(|other| other != id)
            .collect();
        !matches!(self.queue.next_due(&others).await, Ok(None))
    }

    /// Puts records back without spending an attempt (their integration is paused).
    async fn hold(&self, batch: Vec<QueuedRecord>) {
        let attempt = Attempt {
            at_ms: now_ms(),
            status: None,
            detail: "held: integration paused".into(),
            kind: AttemptKind::Held,
        };
        if let Err(e) = self.queue.retry(batch, now_ms(), attempt).await {
            tracing::error!(error = %e, "cannot hold records");
        }
    }

    /// Records of an integration this relay does not have:
    /// - uninstalled (every replica sees that): dead-lettered, naming the stream it had;
    /// - on a shared queue, otherwise: another replica may have it (the configured one differs,
    ///   or a configuration change is rolling out), so they go back unchanged for one that does,
    ///   and wait for it as a paused integration's records do;
    /// - on a queue of its own: dead-lettered, saying why (the zero-setup default replaced by
    ///   installed integrations, or removed while the relay was stopped).
    async fn not_in_force(&self, id: &str, mut records: Vec<QueuedRecord>) {
        const HAND_BACK: Duration = Duration::from_secs(5);
        let retired = self.integrations.retired(id);
        if let Some(r) = &retired {
            // Records bound for the integration's own stream name the one it last had.
            let stream: Arc<str> = Arc::from(r.stream.as_str());
            for q in &mut records {
                if &*q.record.stream == crate::queue::INTEGRATION_STREAM {
                    q.record.stream = stream.clone();
                }
            }
        }
        let reason = match retired {
            Some(r) if r.uninstalled => format!(
                "integration `{id}` no longer exists (uninstalled): a replay would dead-letter it \
                 again; its input is kept here"
            ),
            _ if self.queue.shared() => {
                // They wait, as a paused integration's records do, until a replica that has the
                // integration leases them: nothing is dropped for a configuration mismatch.
                static LOGGED: Throttle = Throttle::new(10_000);
                if LOGGED.pass().is_some() {
                    tracing::warn!(
                        integration = id,
                        records = records.len(),
                        "records for an integration this relay does not have: handed back for a \
                         replica that has it; give every replica the same integrations"
                    );
                }
                if let Err(e) = self.queue.release(records, HAND_BACK).await {
                    tracing::error!(error = %e, "cannot hand records back");
                }
                return;
            }
            Some(_) => format!(
                "integration `{id}` (the zero-setup default) was replaced by installed \
                 integrations before these records were delivered: a replay would dead-letter \
                 them again; their input is kept here"
            ),
            None => format!(
                "integration `{id}` is not configured or installed on this relay (removed while \
                 it was stopped, or its settings are missing): replay it once the integration is \
                 back; its input is kept here"
            ),
        };
        let none = live::CallResult {
            status: None,
            latency: Duration::ZERO,
        };
        self.monitor
            .settled(&records, live::Outcome::DeadLettered, &none, &reason);
        self.dead_letter(records, reason).await;
    }

    async fn dead_letter(&self, records: Vec<QueuedRecord>, reason: String) {
        if let Some(first) = records.first() {
            tracing::warn!(
                integration = %first.record.integration,
                stream = %first.record.stream,
                records = records.len(),
                event_ids = %event_ids(&records),
                %reason,
                "dead-lettering records"
            );
        }
        self.store_dead_letters(records, reason).await;
    }

    /// Moves records to the dead-letter queue, counted; the caller logs them.
    async fn store_dead_letters(&self, records: Vec<QueuedRecord>, reason: String) {
        self.state
            .counters
            .dead_lettered
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.queue.dead_letter(records, reason).await {
            tracing::error!(error = %e, "cannot dead-letter records");
        }
    }

    fn pause(
        &self,
        integration: &Integration,
        stream: Option<String>,
        (status, hint): (u16, &str),
        message: String,
    ) {
        let first = self.state.pause(
            integration.id.as_str(),
            Pause {
                status,
                hint: hint.to_string(),
                message: message.clone(),
                since_ms: now_ms(),
                manual: false,
                stream: stream.clone(),
            },
        );
        if first {
            tracing::error!(
                integration = %integration.id,
                status,
                stream = stream.as_deref().unwrap_or(""),
                lytics_message = %message,
                "delivery paused: {hint}; events stay queued and delivery resumes when the config changes or a probe succeeds"
            );
        }
    }

    /// Resumes a paused integration (called when its config changes).
    pub fn resume(&self, id: &str) {
        if self.state.resume(id) {
            tracing::info!(integration = id, "delivery resumed");
        }
    }

    /// Every `probe_interval`, probes with a `dryrun` call the paused integrations (resuming
    /// those that answer 2xx) and those in an outage whose hold is over (bringing their retries
    /// forward when Lytics answers 2xx). Records deferred through a long outage wait out long
    /// backoffs; the probe notices the recovery without them.
    async fn probe_stalled(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.probe_interval) => {}
            }
            for (id, pause) in self.state.paused() {
                // An integration no longer in force has nothing to deliver (a stored one stays
                // in force while paused).
                let Some(integration) = self.integrations.get(&id) else {
                    self.state.resume(&id);
                    continue;
                };
                if pause.manual {
                    continue;
                }
                let stream = pause
                    .stream
                    .as_deref()
                    .unwrap_or(integration.stream_name.as_str());
                match probe_outcome(self.client.as_ref(), &integration, stream, &self.probe_reporter()).await
                {
                    Ok(Outcome::Delivered { .. }) if self.state.resume_probed(&id, &pause) => {
                        tracing::info!(integration = %id, "probe succeeded; delivery resumed");
                    }
                    // Fixed one problem, found another (a token fixed, the stream still
                    // missing): the pause says what is wrong now.
                    Ok(Outcome::Setup {
                        status,
                        hint,
                        message,
                    }) if status != pause.status
                        && self.state.repause_probed(&id, &pause, status, hint, &message) =>
                    {
                        tracing::error!(integration = %id, status, stream, lytics_message = %message, "still paused, for another reason: {hint}");
                    }
                    _ => {}
                }
            }
            let now = now_ms();
            let paused = self.state.paused();
            for (id, outage) in self.state.outages() {
                if outage.hold_until_ms > now || paused.contains_key(&id) {
                    continue;
                }
                let Some(integration) = self.integrations.get(&id) else {
                    self.state.call_answered(&id);
                    continue;
                };
                // A passing dryrun brings the retries forward, so the next call (still one at a
                // time) carries records; only a call with records ends the outage, since a Lytics
                // that validates but cannot take records is still down for them.
                let stream = integration.stream_name.as_str();
                match probe(self.client.as_ref(), &integration, stream, &self.probe_reporter()).await {
                    Ok(()) => {
                        // With no record of the integration queued, no call with records is
                        // coming to end the outage: the probe ends it.
                        if self.expedite_retries(&integration).await == 0
                            && !self.has_queued(&id).await
                            && self.state.call_answered(&id)
                        {
                            tracing::info!(integration = %id, "Lytics answers a dryrun probe and no record waits: the outage hold is over");
                        }
                    }
                    Err(reason) => tracing::debug!(integration = %id, %reason, "outage probe failed"),
                }
            }
        }
    }
}

/// Counts a final attempt into each record's history, so dead letters show every attempt.
fn with_attempt(records: Vec<QueuedRecord>, attempt: Attempt) -> Vec<QueuedRecord> {
    records
        .into_iter()
        .map(|mut r| {
            if attempt.kind == AttemptKind::Spent {
                r.attempts += 1;
            }
            r.history.push(attempt.clone());
            r
        })
        .collect()
}

/// Where `dryrun` calls are reported, as every Lytics call is: a span, and the calls metric.
#[derive(Clone, Debug)]
pub struct ProbeReporter {
    /// Exports the call's span.
    pub telemetry: Telemetry,
    /// Counts the call.
    pub monitor: Monitor,
}

impl ProbeReporter {
    /// Reports nowhere: spans off, metrics nobody reads.
    pub fn detached() -> Self {
        ProbeReporter {
            telemetry: Telemetry::disabled(),
            monitor: Monitor::detached(),
        }
    }
}

/// A `dryrun` collect call with no records to `stream`: checks token, stream and account without
/// storing anything. `Err` carries the setup hint or the failure.
pub async fn probe(
    client: &dyn CollectSender,
    integration: &Integration,
    stream: &str,
    report: &ProbeReporter,
) -> Result<(), ProbeFailure> {
    match probe_outcome(client, integration, stream, report)
        .await
        .map_err(ProbeFailure::Refused)?
    {
        Outcome::Delivered { .. } => Ok(()),
        Outcome::Setup { status, hint, .. } => Err(ProbeFailure::Setup { status, hint }),
        Outcome::Retry { reason, .. } => Err(ProbeFailure::Unreachable(reason)),
        Outcome::BadPayload { status, message } => Err(ProbeFailure::Refused(format!("{status}: {message}"))),
    }
}

/// Why a `dryrun` call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    /// Lytics refused the integration's settings (401, 403, 404, 400 naming the account).
    #[error("{status}: {hint}")]
    Setup {
        /// The status.
        status: u16,
        /// The seed's troubleshooting text.
        hint: &'static str,
    },
    /// Lytics could not be reached or answered a retryable error (timeout, 429, 5xx).
    #[error("{0}")]
    Unreachable(String),
    /// Anything else: the URL cannot be used, or Lytics refused the call itself.
    #[error("{0}")]
    Refused(String),
}

impl ProbeFailure {
    /// The integration setting a setup failure points at, as its config key.
    pub fn setting(&self) -> Option<&'static str> {
        match self {
            ProbeFailure::Setup {
                status: 401 | 403, ..
            } => Some("api_token"),
            ProbeFailure::Setup { status: 404, .. } => Some("stream_name"),
            ProbeFailure::Setup { status: 400, .. } => Some("account_id"),
            _ => None,
        }
    }
}

/// How Lytics answers a `dryrun` collect call with no records; `Err` when the integration's
/// URL cannot be used.
async fn probe_outcome(
    client: &dyn CollectSender,
    integration: &Integration,
    stream: &str,
    report: &ProbeReporter,
) -> Result<Outcome, String> {
    let target = CollectTarget {
        base_url: &integration.base_url,
        stream,
        account_id: integration.account_id.as_str(),
        timestamp_field: crate::rules::DEFAULT_TIMESTAMP_FIELD,
        dryrun: true,
    };
    let url = lytics::collect_url(&target)?;
    let mut attrs = call_attributes(&url, stream, integration, 0);
    attrs.push(KeyValue::new(names::LYTICS_DRYRUN, true));
    let mut span = report.telemetry.start_call(std::iter::empty(), attrs);
    let started = tokio::time::Instant::now();
    let result = client
        .post(url, &integration.api_token, bytes::Bytes::from_static(b"[]"))
        .await;
    report.monitor.called(
        integration.id.as_str(),
        result.as_ref().map(|r| r.status).map_err(|e| e.kind()),
        started.elapsed(),
    );
    let outcome = lytics::classify(&result);
    if let Some(mut s) = span.take() {
        record_answer(s.span(), &result, &outcome);
        s.end();
    }
    Ok(outcome)
}

/// The attributes every collect call's span carries.
fn call_attributes(
    url: &reqwest::Url,
    stream: &str,
    integration: &Integration,
    records: usize,
) -> Vec<KeyValue> {
    vec![
        KeyValue::new(names::HTTP_REQUEST_METHOD, "POST"),
        KeyValue::new(names::SERVER_ADDRESS, url.host_str().unwrap_or("").to_string()),
        KeyValue::new(
            names::SERVER_PORT,
            i64::from(url.port_or_known_default().unwrap_or(0)),
        ),
        KeyValue::new(names::URL_FULL, url.to_string()),
        KeyValue::new(names::LYTICS_STREAM, stream.to_string()),
        KeyValue::new(names::LYTICS_INTEGRATION, integration.id.to_string()),
        KeyValue::new(names::LYTICS_BATCH_SIZE, records as i64),
    ]
}

/// Puts Lytics' answer (or the failure to get one) on a collect call's span.
fn record_answer(
    span: &mut opentelemetry_sdk::trace::Span,
    result: &Result<lytics::Reply, lytics::TransportError>,
    outcome: &Outcome,
) {
    match result {
        Ok(reply) => {
            span.set_attribute(KeyValue::new(
                names::HTTP_RESPONSE_STATUS_CODE,
                i64::from(reply.status),
            ));
            if reply.status >= 400 {
                fail_span(
                    span,
                    &reply.status.to_string(),
                    format!("Lytics answered {}", reply.status),
                );
            }
        }
        Err(e) => fail_span(span, e.kind(), e.to_string()),
    }
    if let Outcome::Delivered {
        message_count,
        rejected_count,
    } = outcome
    {
        if let Some(m) = message_count {
            span.set_attribute(KeyValue::new(names::LYTICS_MESSAGE_COUNT, *m as i64));
        }
        span.set_attribute(KeyValue::new(
            names::LYTICS_REJECTED_COUNT,
            *rejected_count as i64,
        ));
    }
}

/// What the halving of a refused batch found: the records Lytics refused alone, by reason (each
/// dead-lettered as it is found, logged together).
#[derive(Default)]
struct Refused {
    /// The batch was split (logged once).
    splitting: bool,
    /// Per reason: how many records were dead-lettered, and (some of) their event ids.
    by_reason: Vec<(String, (usize, String))>,
}

/// The event ids of `records` for a log line: the first ten, and how many more.
fn event_ids(records: &[QueuedRecord]) -> String {
    const SHOWN: usize = 10;
    let mut ids: Vec<&str> = records.iter().take(SHOWN).map(|r| &*r.record.event_id).collect();
    ids.dedup();
    let mut text = ids.join(",");
    if records.len() > SHOWN {
        text.push_str(&format!(" and {} more", records.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests;
