//! Prometheus metrics, served at `GET /metrics` on the HTTP port (OpenMetrics text format).
//!
//! Input: counts from ingest and delivery (through [`crate::monitor::Monitor`]), and at scrape
//! time the queue's depth and oldest record and the paused integrations. Output: the text
//! exposition. Label values are only integration ids, source names, HTTP status codes, outcome
//! names and the relay's own troubleshooting texts: never a secret, never anything taken from
//! an event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::delivery::{DeliveryState, Pause};
use crate::live::{LiveBus, Outcome};
use crate::queue::{Queue, QueuedRecord};
use crate::rules::Source;
use crate::timefmt::now_ms;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one ingest call did, counted in one go rather than event by event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestTally<'a> {
    /// Events accepted (queued, ignored, dropped or duplicate).
    pub events: u64,
    /// Records refused by rules, over the events that were not duplicates.
    pub dropped: u64,
    /// Events seen before within the dedup window.
    pub duplicates: u64,
    /// Events that queued nothing (no rule matched, or every record was refused).
    pub ignored: u64,
    /// Records queued, by integration id.
    pub mapped: Vec<(&'a str, u64)>,
}

/// Labels of per-source counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// Labels of refused ingest.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    source: &'static str,
    reason: &'static str,
}

/// Labels of per-integration, per-source counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordLabels {
    integration: String,
    source: &'static str,
}

/// Labels of Lytics call counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    integration: String,
    /// The HTTP status, or the transport failure (`timeout`, `connection_error`, …).
    status: String,
}

/// Labels of a paused integration: why, and what to do about it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PausedLabels {
    integration: String,
    /// The HTTP status that paused it (0: paused by an operator).
    status: String,
    /// The seed's troubleshooting text.
    hint: String,
}

/// Labels of the Lytics call latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IntegrationLabels {
    integration: String,
}

fn call_latency() -> Histogram {
    // 5 ms to ~41 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Every metric of the relay.
pub struct Metrics {
    registry: Registry,
    received: Family<SourceLabels, Counter>,
    ignored: Family<SourceLabels, Counter>,
    duplicates: Family<SourceLabels, Counter>,
    dropped: Family<SourceLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    unauthenticated: Family<SourceLabels, Counter>,
    mapped: Family<RecordLabels, Counter>,
    delivered: Family<RecordLabels, Counter>,
    retried: Family<RecordLabels, Counter>,
    dead_lettered: Family<RecordLabels, Counter>,
    paused: Family<RecordLabels, Counter>,
    rejected: Family<IntegrationLabels, Counter>,
    integration_paused: Family<PausedLabels, Gauge>,
    integration_failing: Family<IntegrationLabels, Gauge>,
    calls: Family<CallLabels, Counter>,
    latency: Family<IntegrationLabels, Histogram, fn() -> Histogram>,
    rule_reloads: Counter,
    queue_depth: Gauge,
    queue_oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    queue_disk_bytes: Gauge,
    dedup_ids: Gauge,
    live_watchers: Gauge,
    live_lost: Counter,
    /// One scrape at a time: a scrape rebuilds the paused-integration series, which a concurrent
    /// one would otherwise see missing, and moves the lost-events counter, which two at once
    /// could move by the same loss twice.
    render_sync: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lytics_relay");
        let m = Metrics {
            received: Family::default(),
            ignored: Family::default(),
            duplicates: Family::default(),
            dropped: Family::default(),
            refused: Family::default(),
            unauthenticated: Family::default(),
            mapped: Family::default(),
            delivered: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            paused: Family::default(),
            rejected: Family::default(),
            integration_paused: Family::default(),
            integration_failing: Family::default(),
            calls: Family::default(),
            latency: Family::new_with_constructor(call_latency),
            rule_reloads: Counter::default(),
            queue_depth: Gauge::default(),
            queue_oldest_age: Gauge::default(),
            queue_disk_bytes: Gauge::default(),
            dedup_ids: Gauge::default(),
            live_watchers: Gauge::default(),
            live_lost: Counter::default(),
            render_sync: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "events_received",
            "Events accepted by ingest (valid, answered OK)",
            m.received.clone(),
        );
        registry.register(
            "events_ignored",
            "Valid events that queued no record (no rule maps them, or the rules refused every record)",
            m.ignored.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events seen before within the dedup window, not queued again",
            m.duplicates.clone(),
        );
        registry.register(
            "records_dropped",
            "Records the rules built but refused (no identifier, missing required field, too large)",
            m.dropped.clone(),
        );
        registry.register(
            "events_refused",
            "Valid events refused because the relay could not queue them (reason: queue_full, store_unavailable, shutting_down, in_process); the sender was told to retry",
            m.refused.clone(),
        );
        registry.register(
            "requests_unauthenticated",
            "HTTP ingest requests refused with 401 (missing, malformed or wrong signature, a timestamp out of tolerance, or no secret configured); nothing was queued",
            m.unauthenticated.clone(),
        );
        registry.register("records_mapped", "Records mapped and queued", m.mapped.clone());
        registry.register("records_delivered", "Records Lytics took", m.delivered.clone());
        registry.register(
            "records_retried",
            "Records scheduled for another attempt after a retryable failure",
            m.retried.clone(),
        );
        registry.register(
            "records_dead_lettered",
            "Records moved to the dead-letter queue",
            m.dead_lettered.clone(),
        );
        registry.register(
            "records_paused",
            "Records held without spending an attempt because a setup error paused their integration",
            m.paused.clone(),
        );
        registry.register(
            "records_rejected",
            "Records Lytics rejected inside a 200 answer (rejected_count above zero): partial failures",
            m.rejected.clone(),
        );
        registry.register(
            "integration_paused",
            "1 for each integration whose delivery is paused, labelled with the status that paused it and the troubleshooting text",
            m.integration_paused.clone(),
        );
        registry.register(
            "integration_lytics_failing",
            "1 for each integration in an outage hold (its calls keep failing with retryable errors: Lytics down?); its events stay queued",
            m.integration_failing.clone(),
        );
        registry.register(
            "lytics_calls",
            "Lytics collect calls by HTTP status (or transport failure)",
            m.calls.clone(),
        );
        registry.register(
            "lytics_call_duration_seconds",
            "Latency of Lytics collect calls",
            m.latency.clone(),
        );
        registry.register(
            "rule_reloads",
            "Rule sets swapped in while running",
            m.rule_reloads.clone(),
        );
        registry.register(
            "queue_depth",
            "Records waiting or in flight",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the record queued first (0 when the queue is empty)",
            m.queue_oldest_age.clone(),
        );
        registry.register(
            "queue_disk_bytes",
            "Bytes of the embedded queue's database and log on disk (0 for other backends)",
            m.queue_disk_bytes.clone(),
        );
        registry.register(
            "dedup_ids",
            "Event ids the relay's dedup index remembers (0 for the nats backend, whose server keeps them)",
            m.dedup_ids.clone(),
        );
        registry.register(
            "live_watchers",
            "Live Events watchers connected (gRPC Watch and the /live page)",
            m.live_watchers.clone(),
        );
        registry.register(
            "live_events_lost",
            "Live events watchers lost by falling behind (the pipeline is never slowed)",
            m.live_lost.clone(),
        );
        // The per-source series exist from the start, at zero, so that alerts and rates see
        // them before the first event.
        for source in [Source::Signal, Source::CustomerIo] {
            let labels = SourceLabels {
                source: source.as_str(),
            };
            for family in [
                &m.received,
                &m.ignored,
                &m.duplicates,
                &m.dropped,
                &m.unauthenticated,
            ] {
                drop(family.get_or_create(&labels));
            }
            for reason in ["queue_full", "store_unavailable", "shutting_down", "in_process"] {
                drop(m.refused.get_or_create(&RefusedLabels {
                    source: source.as_str(),
                    reason,
                }));
            }
        }
        Metrics { registry, ..m }
    }

    /// Counts the events of one ingest call, all from `source`.
    pub fn ingested(&self, source: Source, tally: &IngestTally<'_>) {
        let labels = SourceLabels {
            source: source.as_str(),
        };
        self.received.get_or_create(&labels).inc_by(tally.events);
        self.dropped.get_or_create(&labels).inc_by(tally.dropped);
        if tally.duplicates > 0 {
            self.duplicates.get_or_create(&labels).inc_by(tally.duplicates);
        }
        if tally.ignored > 0 {
            self.ignored.get_or_create(&labels).inc_by(tally.ignored);
        }
        for (integration, records) in &tally.mapped {
            if *records > 0 {
                self.mapped
                    .get_or_create(&record_labels(integration, source))
                    .inc_by(*records);
            }
        }
    }

    /// Counts `events` valid events from `source` refused for `reason` (queue_full,
    /// store_unavailable, shutting_down).
    pub fn refused(&self, source: Source, reason: &'static str, events: u64) {
        self.refused
            .get_or_create(&RefusedLabels {
                source: source.as_str(),
                reason,
            })
            .inc_by(events);
    }

    /// Counts an HTTP request from `source` refused for its signature (401).
    pub fn unauthenticated(&self, source: Source) {
        self.unauthenticated
            .get_or_create(&SourceLabels {
                source: source.as_str(),
            })
            .inc();
    }

    /// Counts one Lytics call: `status` is the HTTP status, or the transport failure's kind.
    pub fn called(&self, integration: &str, status: Result<u16, &'static str>, latency: Duration) {
        let status = match status {
            Ok(s) => s.to_string(),
            Err(kind) => kind.to_string(),
        };
        self.calls
            .get_or_create(&CallLabels {
                integration: integration.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&IntegrationLabels {
                integration: integration.to_string(),
            })
            .observe(latency.as_secs_f64());
    }

    /// Counts records a Lytics call settled.
    pub fn settled(&self, records: &[QueuedRecord], outcome: Outcome) {
        let family = match outcome {
            Outcome::Delivered => &self.delivered,
            Outcome::Retrying => &self.retried,
            Outcome::DeadLettered => &self.dead_lettered,
            Outcome::Paused => &self.paused,
            _ => return,
        };
        // A batch's records nearly always share their labels: count each run in one go.
        for run in records.chunk_by(|a, b| {
            a.record.source == b.record.source && a.record.integration == b.record.integration
        }) {
            if let Some(first) = run.first() {
                family
                    .get_or_create(&record_labels(&first.record.integration, first.record.source))
                    .inc_by(run.len() as u64);
            }
        }
    }

    /// Counts records Lytics rejected inside a 200 (`rejected_count`).
    pub fn rejected(&self, integration: &str, records: u64) {
        self.rejected
            .get_or_create(&IntegrationLabels {
                integration: integration.to_string(),
            })
            .inc_by(records);
    }

    /// Counts a rule set swapped in while running.
    pub fn rule_reloaded(&self) {
        self.rule_reloads.inc();
    }

    /// The exposition, with the queue, the live bus and the paused integrations read now.
    pub async fn render(
        &self,
        queue: &dyn Queue,
        bus: &LiveBus,
        paused: impl FnOnce() -> HashMap<String, Pause>,
        failing: impl FnOnce() -> Vec<String>,
    ) -> Result<String, std::fmt::Error> {
        let _one_at_a_time = self.render_sync.lock().await;
        // Read in turn, so a scrape that waited does not publish an older set than the last.
        let paused = paused();
        self.integration_paused.clear();
        for (integration, p) in &paused {
            self.integration_paused
                .get_or_create(&PausedLabels {
                    integration: integration.clone(),
                    status: p.status.to_string(),
                    hint: p.hint.clone(),
                })
                .set(1);
        }
        self.integration_failing.clear();
        for integration in failing() {
            self.integration_failing
                .get_or_create(&IntegrationLabels { integration })
                .set(1);
        }
        self.queue_depth
            .set(i64::try_from(queue.depth()).unwrap_or(i64::MAX));
        let age = match queue.oldest_accepted_ms().await {
            Ok(Some(at)) => (now_ms() - at).max(0) as f64 / 1000.0,
            Ok(None) => 0.0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the oldest queued record for metrics");
                self.queue_oldest_age.get()
            }
        };
        self.queue_oldest_age.set(age);
        self.queue_disk_bytes.set(
            queue
                .disk_bytes()
                .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        );
        self.dedup_ids.set(
            queue
                .dedup_ids()
                .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        );
        self.live_watchers
            .set(i64::try_from(bus.watchers()).unwrap_or(i64::MAX));
        // The bus counts; the counter follows it.
        let (lost, counted) = (bus.lost(), self.live_lost.get());
        if lost > counted {
            self.live_lost.inc_by(lost - counted);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn record_labels(integration: &str, source: Source) -> RecordLabels {
    RecordLabels {
        integration: integration.to_string(),
        source: source.as_str(),
    }
}

/// What `/metrics` reads.
#[derive(Clone)]
pub struct MetricsState {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The queue, for its depth and oldest record.
    pub queue: Arc<dyn Queue>,
    /// The live bus, for its watchers.
    pub bus: LiveBus,
    /// Delivery, for its paused integrations.
    pub delivery: Arc<DeliveryState>,
}

/// `GET /metrics`, to merge into the HTTP router.
pub fn router(state: MetricsState) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(state)
}

async fn scrape(State(s): State<MetricsState>) -> Response {
    match s
        .metrics
        .render(
            s.queue.as_ref(),
            &s.bus,
            || s.delivery.paused(),
            || s.delivery.outages().into_keys().collect(),
        )
        .await
    {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::NewRecord;

    fn exposition(m: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        text
    }

    fn queued(integration: &str, source: Source) -> QueuedRecord {
        QueuedRecord {
            id: 1,
            record: NewRecord {
                source,
                ..NewRecord::sample(integration)
            },
            attempts: 0,
            history: Vec::new(),
        }
    }

    #[test]
    fn a_call_is_counted_whole() {
        let m = Metrics::new();
        let tally = IngestTally {
            events: 7,
            dropped: 2,
            duplicates: 1,
            ignored: 3,
            mapped: vec![("a", 3), ("b", 0)],
        };
        m.ingested(Source::Signal, &tally);
        m.ingested(
            Source::Signal,
            &IngestTally {
                events: 1,
                mapped: vec![("a", 1)],
                ..IngestTally::default()
            },
        );
        let text = exposition(&m);
        for line in [
            r#"lytics_relay_events_received_total{source="signal"} 8"#,
            r#"lytics_relay_records_dropped_total{source="signal"} 2"#,
            r#"lytics_relay_events_duplicate_total{source="signal"} 1"#,
            r#"lytics_relay_events_ignored_total{source="signal"} 3"#,
            r#"lytics_relay_records_mapped_total{integration="a",source="signal"} 4"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains(r#"integration="b""#), "{text}");
    }

    #[test]
    fn per_source_series_exist_at_zero_before_the_first_event() {
        let text = exposition(&Metrics::new());
        for line in [
            r#"lytics_relay_events_received_total{source="customerio"} 0"#,
            r#"lytics_relay_records_dropped_total{source="signal"} 0"#,
            r#"lytics_relay_events_refused_total{source="signal",reason="queue_full"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn settled_records_are_counted_by_their_own_labels() {
        let m = Metrics::new();
        let records = [
            queued("a", Source::Signal),
            queued("a", Source::Signal),
            queued("b", Source::Signal),
            queued("a", Source::CustomerIo),
            queued("a", Source::Signal),
        ];
        m.settled(&records, Outcome::Delivered);
        m.settled(&records[..1], Outcome::Retrying);
        let text = exposition(&m);
        for line in [
            r#"lytics_relay_records_delivered_total{integration="a",source="signal"} 3"#,
            r#"lytics_relay_records_delivered_total{integration="b",source="signal"} 1"#,
            r#"lytics_relay_records_delivered_total{integration="a",source="customerio"} 1"#,
            r#"lytics_relay_records_retried_total{integration="a",source="signal"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[tokio::test]
    async fn paused_integrations_and_partial_failures_are_exported() {
        let m = Metrics::new();
        m.rejected("a", 3);
        m.rejected("a", 2);
        let queue = crate::queue::MemoryQueue::new(10, Duration::from_secs(60));
        let bus = LiveBus::new(16);
        let pause = |status: u16, hint: &str| Pause {
            status,
            hint: hint.into(),
            message: String::new(),
            since_ms: 0,
            manual: false,
            stream: None,
        };
        let paused = HashMap::from([("b".to_string(), pause(401, "invalid API token"))]);
        let text = m
            .render(&queue, &bus, || paused.clone(), || vec!["c".to_string()])
            .await
            .unwrap();
        for line in [
            r#"lytics_relay_records_rejected_total{integration="a"} 5"#,
            r#"lytics_relay_integration_paused{integration="b",status="401",hint="invalid API token"} 1"#,
            r#"lytics_relay_integration_lytics_failing{integration="c"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Resumed: the series goes away with the pause.
        let text = m.render(&queue, &bus, HashMap::new, Vec::new).await.unwrap();
        assert!(!text.contains("lytics_relay_integration_paused{"), "{text}");
        assert!(
            !text.contains("lytics_relay_integration_lytics_failing{"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_scrapes_all_see_a_paused_integration() {
        let m = Arc::new(Metrics::new());
        let queue = Arc::new(crate::queue::MemoryQueue::new(10, Duration::from_secs(60)));
        let bus = LiveBus::new(16);
        let paused = Arc::new(HashMap::from([(
            "b".to_string(),
            Pause {
                status: 404,
                hint: "stream not found".into(),
                message: String::new(),
                since_ms: 0,
                manual: false,
                stream: None,
            },
        )]));
        let mut scrapes = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (m, queue, bus, paused) = (m.clone(), queue.clone(), bus.clone(), paused.clone());
            scrapes.spawn(async move {
                let mut missing = 0;
                for _ in 0..300 {
                    let text = m
                        .render(queue.as_ref(), &bus, || paused.as_ref().clone(), Vec::new)
                        .await
                        .unwrap();
                    if !text.contains(r#"lytics_relay_integration_paused{integration="b""#) {
                        missing += 1;
                    }
                }
                missing
            });
        }
        let missing: usize = scrapes.join_all().await.into_iter().sum();
        assert_eq!(missing, 0, "scrapes that missed the paused integration");
    }
}
