//! One span per Lytics call, received by a real OTLP/gRPC receiver on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::proto::v1 as pb;
use lytics_relay::telemetry::{Telemetry, names};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    /// The `service.name` of each batch's resource.
    services: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                });
            self.services.lock().unwrap().extend(service);
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        other => panic!("attribute {key} is {other:?}"),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(AnyValue::IntValue(i)) => *i,
        other => panic!("attribute {key} is {other:?}"),
    }
}

#[tokio::test]
async fn every_lytics_call_has_a_span_linked_to_the_ingest_that_caused_it() {
    let (receiver, otlp, stop_tx) = receive_spans().await;

    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let telemetry = Telemetry::with_endpoint(&format!("http://{otlp}"), 4096, 0.0).unwrap();
    let relay = RelayHandle::start(settings, telemetry).await;
    let mut client = relay.client().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::SendRequest {
        event: Some(event(
            json!({"type": "page", "userId": "u1", "timestamp": "2026-02-25T14:30:00Z"}),
        )),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_span}-01").parse().unwrap(),
    );
    client.send(request).await.unwrap();
    emu.wait_for_records(STREAM, 1).await;
    relay.stop().await; // flushes the exporters

    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let have_call = spans.iter().any(|s| s.name == names::SPAN_LYTICS_COLLECT);
        let have_ingest = spans.iter().any(|s| s.name == names::SPAN_INGEST);
        if have_call && have_ingest {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans not received: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop_tx.send(());

    // The ingest span continues the caller's trace: sampled by the caller even at ratio 0.
    let ingest = spans.iter().find(|s| s.name == names::SPAN_INGEST).unwrap();
    assert_eq!(hex(&ingest.trace_id), trace_id);
    assert_eq!(hex(&ingest.parent_span_id), parent_span);
    assert_eq!(text(ingest, names::INGEST_SOURCE), "signal");
    assert_eq!(int(ingest, names::INGEST_EVENTS), 1);
    assert_eq!(int(ingest, names::INGEST_RECORDS), 1);

    let call = spans
        .iter()
        .find(|s| s.name == names::SPAN_LYTICS_COLLECT)
        .unwrap();
    assert_eq!(text(call, names::HTTP_REQUEST_METHOD), "POST");
    assert_eq!(text(call, names::SERVER_ADDRESS), "127.0.0.1");
    assert_eq!(int(call, names::SERVER_PORT), i64::from(emu.addr.port()));
    let url = text(call, names::URL_FULL);
    assert_eq!(
        url,
        format!(
            "{}/collect/json/{STREAM}?timestamp_field=_ts&account_id={ACCOUNT}",
            emu.url()
        )
    );
    assert!(!url.contains(TOKEN));
    assert_eq!(int(call, names::HTTP_RESPONSE_STATUS_CODE), 200);
    assert_eq!(text(call, names::LYTICS_STREAM), STREAM);
    assert_eq!(int(call, names::LYTICS_BATCH_SIZE), 1);
    assert_eq!(int(call, names::LYTICS_MESSAGE_COUNT), 1);
    assert_eq!(int(call, names::LYTICS_REJECTED_COUNT), 0);
    assert_eq!(int(call, names::LYTICS_ATTEMPT), 1);
    assert_eq!(call.kind, 3, "a client span");
    assert_eq!(call.links.len(), 1);
    assert_eq!(call.links[0].trace_id, ingest.trace_id);
    assert_eq!(call.links[0].span_id, ingest.span_id);
    for s in &spans {
        for kv in &s.attributes {
            assert!(
                !format!("{:?}", kv.value).contains(TOKEN),
                "a span attribute carries the token"
            );
        }
    }
}

/// A receiver of OTLP spans on loopback; the sender stops it.
async fn receive_spans() -> (Receiver, std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let receiver = Receiver::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stop_rx.await;
            }),
    );
    (receiver, otlp, stop_tx)
}

#[tokio::test]
async fn a_call_made_after_a_restart_links_to_the_ingest_before_it() {
    let (receiver, otlp, stop) = receive_spans().await;
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(lytics_relay::emulator::Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let endpoint = format!("http://{otlp}");
    let relay = RelayHandle::start(
        settings.clone(),
        Telemetry::with_endpoint(&endpoint, 4096, 0.0).unwrap(),
    )
    .await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(pb::SendRequest {
        event: Some(event(json!({"type": "page", "userId": "u2"}))),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").parse().unwrap(),
    );
    relay.client().await.send(request).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.emulator.stats().faulted == 0 {
        assert!(Instant::now() < deadline, "no collect call reached Lytics");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await;

    // A new process on the same data directory delivers the stored record.
    emu.emulator.set_faults(Default::default());
    let relay = RelayHandle::start(settings, Telemetry::with_endpoint(&endpoint, 4096, 0.0).unwrap()).await;
    emu.wait_for_records(STREAM, 1).await;
    relay.stop().await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let (ingest, delivered) = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let ingest = spans.iter().find(|s| s.name == names::SPAN_INGEST).cloned();
        let delivered = spans
            .iter()
            .find(|s| s.name == names::SPAN_LYTICS_COLLECT && int(s, names::HTTP_RESPONSE_STATUS_CODE) == 200)
            .cloned();
        if let (Some(i), Some(d)) = (ingest, delivered) {
            break (i, d);
        }
        assert!(Instant::now() < deadline, "spans not received");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(());
    assert_eq!(hex(&ingest.trace_id), trace_id);
    assert_eq!(delivered.links.len(), 1);
    assert_eq!(
        delivered.links[0].trace_id, ingest.trace_id,
        "linked across the restart"
    );
    assert_eq!(delivered.links[0].span_id, ingest.span_id);
    assert!(
        int(&delivered, names::LYTICS_ATTEMPT) >= 2,
        "a retry of the stored record"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_dryrun_probe_of_a_paused_integration_has_its_span_and_is_counted() {
    let (receiver, otlp, stop) = receive_spans().await;
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), "wrong-token");
    let relay = RelayHandle::start(
        settings,
        Telemetry::with_endpoint(&format!("http://{otlp}"), 4096, 0.0).unwrap(),
    )
    .await;
    relay
        .client()
        .await
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "page", "userId": "u3"}))),
        })
        .await
        .unwrap();
    // The 401 pauses delivery; the prober then checks the token every 200 ms.
    let metrics = relay.http_url("/metrics");
    let calls = r#"lytics_relay_lytics_calls_total{integration="lytics",status="401"} "#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        let counted = text
            .lines()
            .find_map(|l| l.strip_prefix(calls))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
        if counted >= 3.0 {
            break;
        }
        assert!(Instant::now() < deadline, "probe calls not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let (call, probes) = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let collect: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == names::SPAN_LYTICS_COLLECT)
            .collect();
        let call = collect.iter().find(|s| attr(s, names::LYTICS_DRYRUN).is_none());
        let probes: Vec<Span> = collect
            .iter()
            .filter(|s| attr(s, names::LYTICS_DRYRUN).is_some())
            .map(|s| (*s).clone())
            .collect();
        if let Some(call) = call
            && probes.len() >= 2
        {
            break ((*call).clone(), probes);
        }
        assert!(Instant::now() < deadline, "probe spans not received");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(());
    assert_eq!(int(&call, names::HTTP_RESPONSE_STATUS_CODE), 401);
    assert_eq!(int(&call, names::LYTICS_BATCH_SIZE), 1);
    for probe in &probes {
        assert_eq!(
            attr(probe, names::LYTICS_DRYRUN),
            Some(&AnyValue::BoolValue(true))
        );
        assert_eq!(int(probe, names::HTTP_RESPONSE_STATUS_CODE), 401);
        assert_eq!(int(probe, names::LYTICS_BATCH_SIZE), 0);
        assert_eq!(text(probe, names::LYTICS_INTEGRATION), "lytics");
        assert_eq!(probe.kind, 3, "a client span");
        let url = text(probe, names::URL_FULL);
        assert!(url.contains("dryrun=true"), "{url}");
        assert!(!url.contains("wrong-token"), "{url}");
        assert_eq!(probe.status.as_ref().unwrap().code, 2, "an error status");
    }
}

#[tokio::test]
async fn a_call_cut_off_by_shutdown_is_exported_as_failed_not_as_a_success() {
    let (receiver, otlp, stop) = receive_spans().await;
    let emu = EmulatorHandle::start().await;
    // Lytics takes a minute to answer: shutdown cuts the call off.
    emu.emulator.set_faults(lytics_relay::emulator::Faults {
        slow_rate: 1.0,
        slow_ms: 60_000,
        ..Default::default()
    });
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.shutdown_grace = Duration::from_millis(500);
    let relay = RelayHandle::start(
        settings,
        Telemetry::with_endpoint(&format!("http://{otlp}"), 4096, 1.0).unwrap(),
    )
    .await;
    relay
        .client()
        .await
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "page", "userId": "u3"}))),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.emulator.stats().collect_requests == 0 {
        assert!(Instant::now() < deadline, "no collect call reached Lytics");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!relay.stop().await.graceful, "the call was cut off");
    let deadline = Instant::now() + Duration::from_secs(10);
    let call = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        if let Some(c) = spans.into_iter().find(|s| s.name == names::SPAN_LYTICS_COLLECT) {
            break c;
        }
        assert!(Instant::now() < deadline, "no call span received");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(());
    assert_eq!(text(&call, names::ERROR_TYPE), "cancelled");
    let status = call.status.as_ref().unwrap();
    assert_eq!(status.code, 2, "an error status: {status:?}");
    assert!(status.message.contains("cut off"), "{status:?}");
    assert!(attr(&call, names::HTTP_RESPONSE_STATUS_CODE).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_is_named_by_otel_service_name_and_lytics_relay_otherwise() {
    let (receiver, otlp, stop) = receive_spans().await;
    let endpoint = format!("http://{otlp}");
    for (name, want) in [(Some("relay-prod"), "relay-prod"), (None, "lytics-relay")] {
        receiver.services.lock().unwrap().clear();
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
        env.extend(name.map(|n| ("OTEL_SERVICE_NAME", n)));
        let mut relay = tokio::task::block_in_place(|| Spawned::start_env(dir.path(), &[], &env));
        let mut client =
            pb::ingest_service_client::IngestServiceClient::connect(format!("http://{}", relay.grpc))
                .await
                .unwrap();
        client
            .send(pb::SendRequest {
                event: Some(event(json!({"type": "page", "userId": "u-name"}))),
            })
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // The call span is exported within half a second of the delivery.
        while receiver.services.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no span exported");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::block_in_place(|| relay.terminate());
        let services = receiver.services.lock().unwrap().clone();
        assert!(services.iter().all(|s| s == want), "{services:?}");
    }
    let _ = stop.send(());
}
