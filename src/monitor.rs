//! What ingest and delivery report as events pass: one call per stage outcome, counted in
//! [`Metrics`] and, while someone watches, published on the [`LiveBus`].
//!
//! Input: accepted events with their answers (ingest), Lytics calls and the records they settled
//! (delivery). Output: counters and live events. Never awaits and never fails, so reporting
//! cannot slow or stop the pipeline; with nobody watching no live event is even built.

use std::sync::Arc;
use std::time::Duration;

use crate::ingest::Accepted;
use crate::live::{CallResult, LiveBus, LiveEvent, Mapped, Outcome};
use crate::metrics::{IngestTally, Metrics};
use crate::queue::QueuedRecord;
use crate::rules::Source;
use crate::timefmt::now_ms;

/// The pipeline's reporter, shared by ingest and delivery.
#[derive(Clone, Debug)]
pub struct Monitor {
    bus: LiveBus,
    metrics: Arc<Metrics>,
}

impl Monitor {
    /// Reports to `bus` and `metrics`.
    pub fn new(bus: LiveBus, metrics: Arc<Metrics>) -> Self {
        Monitor { bus, metrics }
    }

    /// Reports to a bus nobody watches and metrics nobody reads: what a stage wired without a
    /// monitor uses.
    pub fn detached() -> Self {
        Monitor::new(LiveBus::new(1), Arc::new(Metrics::new()))
    }

    /// The live bus.
    pub fn bus(&self) -> &LiveBus {
        &self.bus
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// True while someone watches live events: ingest builds what they show only then.
    pub fn watching(&self) -> bool {
        self.bus.watching()
    }

    /// Ingest accepted the events of one call from `source`: `tally` counts them; `mapped`
    /// (built only while someone watches) holds each event's live form, beside its answer.
    pub fn ingested(
        &self,
        source: Source,
        tally: &IngestTally<'_>,
        answers: &[Accepted],
        mapped: Vec<Mapped>,
        accepted_ms: i64,
        traceparent: Option<&Arc<str>>,
    ) {
        self.metrics.ingested(source, tally);
        if mapped.is_empty() || !self.bus.watching() {
            return;
        }
        for (mapped, answer) in mapped.into_iter().zip(answers) {
            self.bus.publish(LiveEvent::ingested(
                mapped,
                answer,
                accepted_ms,
                traceparent.cloned(),
            ));
        }
    }

    /// Delivery made a Lytics call: `status` is the HTTP status, or the transport failure's kind.
    pub fn called(&self, integration: &str, status: Result<u16, &'static str>, latency: Duration) {
        self.metrics.called(integration, status, latency);
    }

    /// A Lytics call settled `records` with `outcome`; `detail` says why or what comes next.
    pub fn settled(&self, records: &[QueuedRecord], outcome: Outcome, call: &CallResult, detail: &str) {
        self.metrics.settled(records, outcome);
        if self.bus.watching() {
            let now = now_ms();
            for r in records {
                self.bus
                    .publish(LiveEvent::settled(r, outcome, call, detail, now));
            }
        }
    }
}
