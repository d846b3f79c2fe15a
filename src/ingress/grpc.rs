//! The gRPC door: `lytics_relay.v1.IngestService` (`Send`, `SendBatch`, `Stream`,
//! `SendCustomerIoEvent`).
//!
//! Input: `Event` messages (their proto3 JSON form is the Signal canonical event), Customer.io
//! webhooks as `Struct`s, and the caller's `traceparent` metadata. Output: results per event,
//! or a `Status` with `google.rpc.BadRequest` field violations. Requests arrive with each event
//! and webhook still encoded ([`crate::proto::raw`]); each is decoded here, and an event's
//! bytes become its input.

use std::sync::Arc;

use bytes::Bytes;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{ApiError, FieldViolation};
use crate::ingest::{Accepted, Disposition, Ingest};
use crate::normalize::{self, InboundEvent};
use crate::proto::raw;
use crate::proto::servers::ingest_service_server::IngestService;
use crate::proto::v1 as pb;
use crate::timefmt::now_ms;

/// Events accepted per queue write while reading a client stream.
const STREAM_CHUNK: usize = 500;
/// Rejections reported in a `StreamResponse`.
const STREAM_ERRORS: usize = 100;

/// The `IngestService` implementation.
#[derive(Clone)]
pub struct IngestGrpc {
    ingest: Ingest,
    max_event_bytes: usize,
    max_batch_events: usize,
}

impl IngestGrpc {
    /// Wires the service.
    pub fn new(ingest: Ingest, max_event_bytes: usize, max_batch_events: usize) -> Self {
        IngestGrpc {
            ingest,
            max_event_bytes,
            max_batch_events,
        }
    }

    fn normalize(&self, event: Option<&Bytes>, field: &str) -> Result<InboundEvent, ApiError> {
        let event = event.ok_or_else(|| {
            ApiError::field(field, "is required: send {\"event\": <a Signal canonical event>}")
        })?;
        normalize::signal_proto_event(event, field, self.max_event_bytes, now_ms())
    }
}

/// The caller's W3C `traceparent`, if it sent one.
pub fn traceparent<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The protobuf form of an accepted event.
pub fn result_pb(a: &Accepted) -> pb::IngestResult {
    pb::IngestResult {
        // `String::from(&str)` copies; `to_string` on an `Arc<str>` would go through `Display`.
        message_id: String::from(&*a.id),
        status: match a.disposition {
            Disposition::Queued => pb::IngestStatus::Accepted,
            Disposition::Duplicate => pb::IngestStatus::Duplicate,
            Disposition::Ignored => pb::IngestStatus::Ignored,
        } as i32,
        records: a.records,
        rules: a.rules.iter().map(|r| String::from(&**r)).collect(),
        dropped: a
            .dropped
            .iter()
            .map(|d| pb::DroppedRecord {
                rule: String::from(&*d.rule),
                reason: d.reason.clone(),
                integration: d.integration.as_deref().unwrap_or_default().to_string(),
            })
            .collect(),
        rules_version: String::from(&*a.rules_version),
    }
}

/// The protobuf form of a rejected event.
pub fn error_pb(e: &ApiError) -> pb::EventError {
    pb::EventError {
        code: e.code.as_str().to_string(),
        message: e.message.clone(),
        violations: e
            .violations
            .iter()
            .map(|v: &FieldViolation| pb::FieldViolation {
                field: v.field.clone(),
                description: v.description.clone(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn send(&self, request: Request<raw::SendRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let tp = traceparent(&request);
        let event = self.normalize(request.into_inner().event.as_ref(), "event")?;
        let accepted = self.ingest.accept(vec![event], tp.as_deref()).await?;
        let result = accepted.first().map(result_pb);
        Ok(Response::new(pb::SendResponse { result }))
    }

    async fn send_batch(
        &self,
        request: Request<raw::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        let tp = traceparent(&request);
        let events = request.into_inner().events;
        if events.is_empty() {
            return Err(ApiError::field("events", "must hold at least one event").into());
        }
        if events.len() > self.max_batch_events {
            return Err(ApiError::field(
                "events",
                format!(
                    "holds {} events; at most {} are accepted per call",
                    events.len(),
                    self.max_batch_events
                ),
            )
            .into());
        }
        let mut outcomes: Vec<pb::EventOutcome> = (0..events.len())
            .map(|i| pb::EventOutcome {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                result: None,
                error: None,
            })
            .collect();
        let mut valid_at = Vec::with_capacity(events.len());
        // Decoded and validated one at a time as ingest maps them (see `Ingest::accept`).
        // By index: a closure over borrowed items trips the compiler's `Send` check of the
        // handler's future (rust-lang/rust#64552).
        let valid =
            (0..events.len()).filter_map(|i| match self.normalize(events.get(i), &format!("events[{i}]")) {
                Ok(ev) => {
                    valid_at.push(i);
                    Some(ev)
                }
                Err(err) => {
                    outcomes[i].error = Some(error_pb(&err));
                    None
                }
            });
        let accepted = self.ingest.accept(valid, tp.as_deref()).await?;
        for (slot, a) in valid_at.into_iter().zip(accepted.iter()) {
            outcomes[slot].result = Some(result_pb(a));
        }
        let accepted_n = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
        let rejected = u32::try_from(outcomes.len()).unwrap_or(u32::MAX) - accepted_n;
        Ok(Response::new(pb::SendBatchResponse {
            outcomes,
            accepted: accepted_n,
            rejected,
        }))
    }

    async fn send_customer_io_event(
        &self,
        request: Request<raw::SendCustomerIoEventRequest>,
    ) -> Result<Response<pb::SendCustomerIoEventResponse>, Status> {
        let tp = traceparent(&request);
        let webhook = request.into_inner().webhook.ok_or_else(|| {
            ApiError::field(
                "webhook",
                "is required: send {\"webhook\": <the Customer.io JSON>}",
            )
        })?;
        let event = normalize::customerio_proto_webhook(&webhook, "webhook", normalize::MAX_WEBHOOK_BYTES)?;
        let accepted = self.ingest.accept(vec![event], tp.as_deref()).await?;
        Ok(Response::new(pb::SendCustomerIoEventResponse {
            result: accepted.first().map(result_pb),
        }))
    }

    async fn stream(
        &self,
        request: Request<Streaming<raw::StreamRequest>>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        let tp: Option<Arc<str>> = traceparent(&request).map(Arc::from);
        let mut stream = request.into_inner();
        let mut response = pb::StreamResponse::default();
        let mut chunk = Vec::with_capacity(STREAM_CHUNK);
        let mut index: u64 = 0;
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(m) => m,
                Err(status) => {
                    // What came before the broken message is taken, and the answer says so:
                    // the sender resends from that message on.
                    self.flush(&mut chunk, &mut response, tp.as_deref()).await?;
                    return Err(Status::with_details(
                        status.code(),
                        format!(
                            "message {index} of the stream: {}; the stream stopped there, and the \
                             {} valid events before it were accepted ({} refused)",
                            status.message(),
                            response.accepted,
                            response.rejected
                        ),
                        status.details().to_vec().into(),
                    ));
                }
            };
            match self.normalize(message.event.as_ref(), "event") {
                Ok(ev) => chunk.push(ev),
                Err(err) => {
                    response.rejected += 1;
                    if response.errors.len() < STREAM_ERRORS {
                        response.errors.push(pb::EventOutcome {
                            index: u32::try_from(index).unwrap_or(u32::MAX),
                            result: None,
                            error: Some(error_pb(&err)),
                        });
                    }
                }
            }
            index += 1;
            if chunk.len() >= STREAM_CHUNK {
                self.flush(&mut chunk, &mut response, tp.as_deref()).await?;
            }
        }
        self.flush(&mut chunk, &mut response, tp.as_deref()).await?;
        Ok(Response::new(response))
    }
}

impl IngestGrpc {
    async fn flush(
        &self,
        chunk: &mut Vec<InboundEvent>,
        response: &mut pb::StreamResponse,
        tp: Option<&str>,
    ) -> Result<(), Status> {
        if chunk.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(chunk);
        match self.ingest.accept(events, tp).await {
            Ok(accepted) => {
                response.accepted += accepted.len() as u64;
                Ok(())
            }
            Err(mut e) => {
                // Earlier chunks are queued; say how many so the sender resends only the rest.
                e.message = format!(
                    "{} ({} events of this stream were accepted before this)",
                    e.message, response.accepted
                );
                Err(e.into())
            }
        }
    }
}
