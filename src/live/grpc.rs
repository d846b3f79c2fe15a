//! `lytics_relay.v1.LiveEventsService/Watch`: live events over a gRPC server stream.
//!
//! Input: a filter. Output: a stream of live events and lag notices. Each watch has its own
//! task that reads the bus and sends into a small channel; it stops when a send fails (the
//! client went away) or the bus closes (shutdown, which ends the stream with `UNAVAILABLE`). A client that reads slowly fills the channel
//! and then its bus subscription falls behind, which costs it events, never the pipeline.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::{Filter, FilterError, LiveBus, LiveEvent, Outcome, Seen, filter_error};
use crate::error::ApiError;
use crate::normalize::json_to_struct;
use crate::proto::servers::live_events_service_server::LiveEventsService;
use crate::proto::v1 as pb;

/// Messages a watch holds for its client before its subscription starts falling behind.
const SEND_BUFFER: usize = 16;

/// The service.
#[derive(Clone)]
pub struct LiveEventsGrpc {
    bus: LiveBus,
}

impl LiveEventsGrpc {
    /// Wires the service to `bus`.
    pub fn new(bus: LiveBus) -> Self {
        LiveEventsGrpc { bus }
    }
}

fn outcome_pb(o: Outcome) -> pb::LiveOutcome {
    match o {
        Outcome::Accepted => pb::LiveOutcome::Accepted,
        Outcome::Ignored => pb::LiveOutcome::Ignored,
        Outcome::Duplicate => pb::LiveOutcome::Duplicate,
        Outcome::Dropped => pb::LiveOutcome::Dropped,
        Outcome::Delivered => pb::LiveOutcome::Delivered,
        Outcome::Retrying => pb::LiveOutcome::Retrying,
        Outcome::Failed => pb::LiveOutcome::Failed,
        Outcome::DeadLettered => pb::LiveOutcome::DeadLettered,
        Outcome::Paused => pb::LiveOutcome::Paused,
    }
}

fn filter(req: &pb::WatchRequest) -> Result<Filter, ApiError> {
    let parsed = Filter::parse(&req.integration, &req.source, &req.event_type, "");
    let outcome = pb::LiveOutcome::try_from(req.outcome);
    let (mut f, outcome) = match (parsed, outcome) {
        (Ok(f), Ok(o)) => (f, o),
        (parsed, outcome) => {
            let mut errors = parsed.err().unwrap_or_default();
            if outcome.is_err() {
                let known: Vec<&str> = Outcome::ALL
                    .into_iter()
                    .map(|o| outcome_pb(o).as_str_name())
                    .collect();
                errors.push(FilterError {
                    what: "outcome",
                    given: req.outcome.to_string(),
                    choices: known.join(", "),
                });
            }
            return Err(filter_error(&errors));
        }
    };
    f.outcome = match outcome {
        pb::LiveOutcome::Unspecified => None,
        wanted => Outcome::ALL.into_iter().find(|o| outcome_pb(*o) == wanted),
    };
    Ok(f)
}

/// The protobuf form of a live event.
pub fn live_event_pb(e: &LiveEvent) -> pb::LiveEvent {
    let json = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .and_then(|v| json_to_struct(&v))
    };
    pb::LiveEvent {
        at_ms: e.at_ms,
        accepted_ms: e.accepted_ms,
        outcome: outcome_pb(e.outcome) as i32,
        source: e.source.as_str().to_string(),
        event_type: e.event_type.to_string(),
        event_id: e.event_id.to_string(),
        integration: e.integration.as_deref().unwrap_or_default().to_string(),
        rules_version: e.rules_version.to_string(),
        input: crate::normalize::input_struct(&e.input),
        records: e
            .records
            .iter()
            .map(|r| pb::MappedRecord {
                integration: r.integration.to_string(),
                stream: r.stream.to_string(),
                rule: r.rule.to_string(),
                record: json(&r.body),
            })
            .collect(),
        dropped: e
            .dropped
            .iter()
            .map(|d| pb::DroppedRecord {
                rule: d.rule.to_string(),
                reason: d.reason.clone(),
                integration: d.integration.as_deref().unwrap_or_default().to_string(),
            })
            .collect(),
        status: e.status.map(u32::from).unwrap_or(0),
        latency_ms: e.latency_ms.unwrap_or(0),
        attempt: e.attempt,
        detail: e.detail.clone(),
        trace_id: e.trace_id().unwrap_or_default(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl LiveEventsService for LiveEventsGrpc {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let mut watcher = self.bus.subscribe(filter(request.get_ref())?);
        let (tx, rx) = mpsc::channel(SEND_BUFFER);
        tokio::spawn(async move {
            loop {
                let seen = tokio::select! {
                    // The client went away while nothing was published.
                    _ = tx.closed() => break,
                    seen = watcher.next() => seen,
                };
                let Some(seen) = seen else {
                    // The bus closes only when the relay shuts down: a status that says so lets a
                    // client tell it from an end it asked for, and come back.
                    let gone = tonic::Status::unavailable(
                        "the relay is shutting down: watch again once it is back, or on another relay",
                    );
                    // Not waited for: a watcher that stopped reading must not hold the task.
                    let _ = tx.try_send(Err(gone));
                    break;
                };
                let item = match seen {
                    Seen::Event(e) => pb::watch_response::Item::Event(live_event_pb(&e)),
                    Seen::Dropped(count) => pb::watch_response::Item::Dropped(pb::EventsDropped { count }),
                };
                let message = pb::WatchResponse { item: Some(item) };
                if tx.send(Ok(message)).await.is_err() {
                    // The client went away.
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
