//! Delivery policy on virtual time (`tokio::time::pause`), against a scripted Lytics.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use reqwest::Url;

use super::*;
use crate::integration::{AccountId, IntegrationId, Secret, StreamName};
use crate::lytics::{Reply, TransportError};
use crate::queue::{AttemptKind, DeadLetterFilter, EventRecords, MemoryQueue, NewRecord};

/// Answers collect calls from a script (then the last answer forever) and records when each
/// call came, in virtual milliseconds.
struct Scripted {
    answers: Mutex<VecDeque<u16>>,
    last: u16,
    calls: Mutex<Vec<i64>>,
    /// How long each call takes.
    latency: Duration,
}

impl Scripted {
    fn new(script: &[u16], last: u16) -> Arc<Self> {
        Arc::new(Scripted {
            answers: Mutex::new(script.iter().copied().collect()),
            last,
            calls: Mutex::default(),
            latency: Duration::ZERO,
        })
    }
    /// Takes every call, each after `latency`.
    fn accepting_after(latency: Duration) -> Arc<Self> {
        Arc::new(Scripted {
            answers: Mutex::default(),
            last: 200,
            calls: Mutex::default(),
            latency,
        })
    }
    fn calls(&self) -> Vec<i64> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl CollectSender for Scripted {
    async fn post(&self, _url: Url, _token: &Secret, _body: Bytes) -> Result<Reply, TransportError> {
        self.calls.lock().unwrap().push(now_ms());
        tokio::time::sleep(self.latency).await;
        let status = self.answers.lock().unwrap().pop_front().unwrap_or(self.last);
        let body = if status == 200 {
            r#"{"status":200,"message":"success","data":{"message_count":1,"rejected_count":0}}"#
        } else {
            r#"{"status":503,"message":"unavailable"}"#
        };
        answer(status, body.as_bytes())
    }
}

/// A Lytics answer with `status` and `body`, at once.
fn answer(status: u16, body: &'static [u8]) -> Result<Reply, TransportError> {
    Ok(Reply {
        status,
        body: Bytes::from_static(body),
        latency: Duration::ZERO,
    })
}

/// Delivery from `queue` to `sender`, running until `stop` is cancelled.
fn start(
    queue: &Arc<MemoryQueue>,
    settings: DeliverySettings,
    sender: Arc<dyn CollectSender>,
) -> (
    Arc<DeliveryState>,
    CancellationToken,
    tokio::task::JoinHandle<bool>,
) {
    let delivery = Delivery::new(queue.clone(), integration(), Telemetry::disabled(), settings)
        .unwrap()
        .with_sender(sender);
    let state = delivery.state();
    let stop = CancellationToken::new();
    let task = tokio::spawn(delivery.run(stop.clone(), Duration::from_secs(1)));
    (state, stop, task)
}

fn record() -> NewRecord {
    NewRecord {
        accepted_ms: now_ms(),
        ..NewRecord::sample("lytics")
    }
}

fn integration() -> Integrations {
    Integrations::new(vec![Integration {
        id: IntegrationId::new("lytics").unwrap(),
        name: "Lytics".into(),
        account_id: AccountId::new("1234").unwrap(),
        stream_name: StreamName::new("s").unwrap(),
        api_token: Secret::new("t"),
        base_url: "http://127.0.0.1:9".into(),
        enabled: true,
    }])
}

fn settings() -> DeliverySettings {
    DeliverySettings {
        linger: Duration::ZERO,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        max_attempts: 5,
        max_retry_age: Duration::from_secs(24 * 3600),
        ..DeliverySettings::default()
    }
}

async fn run(
    settings: DeliverySettings,
    sender: Arc<Scripted>,
    until: impl Fn(&MemoryQueue) -> bool,
) -> Arc<MemoryQueue> {
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    let record = record();
    queue
        .enqueue(vec![EventRecords {
            dedup_key: Some(Arc::from("e")),
            records: vec![record],
        }])
        .await
        .unwrap();
    let (_, stop, task) = start(&queue, settings, sender);
    for _ in 0..100_000 {
        if until(&queue) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    queue
}

#[tokio::test(start_paused = true)]
async fn retries_on_temporary_errors_with_growing_jittered_backoff() {
    let lytics = Scripted::new(&[503, 503, 503], 200);
    let queue = run(settings(), lytics.clone(), |q| q.depth() == 0).await;
    let calls = lytics.calls();
    assert_eq!(calls.len(), 4, "three failures then a success: {calls:?}");
    for (i, pair) in calls.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let ceiling = 1000 * (1 << i) + 600; // the backoff ceiling plus the dispatcher's idle wait
        assert!(
            gap <= ceiling,
            "retry {i} came after {gap} ms, above {ceiling} ms: {calls:?}"
        );
    }
    assert_eq!(queue.depth(), 0, "delivered and acked");
}

/// Fails (503) every call carrying the poison record, takes every other call.
#[derive(Default)]
struct PoisonFails {
    poison_calls: Mutex<Vec<i64>>,
    delivered: AtomicU64,
}

#[async_trait::async_trait]
impl CollectSender for PoisonFails {
    async fn post(&self, _url: Url, _token: &Secret, body: Bytes) -> Result<Reply, TransportError> {
        let poison = body.windows(6).any(|w| w == b"poison");
        let (status, body) = if poison {
            self.poison_calls.lock().unwrap().push(now_ms());
            (503, r#"{"status":503,"message":"unavailable"}"#)
        } else {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            (
                200,
                r#"{"status":200,"message":"success","data":{"message_count":1,"rejected_count":0}}"#,
            )
        };
        answer(status, body.as_bytes())
    }
}

async fn dead_letters(queue: &MemoryQueue) -> Vec<crate::queue::DeadLetter> {
    queue
        .dead_letters(DeadLetterFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_record_whose_calls_fail_while_others_succeed_spends_its_attempts_into_the_dead_letter_queue() {
    let lytics = Arc::new(PoisonFails::default());
    let queue = Arc::new(MemoryQueue::new(100, Duration::from_secs(60)));
    let poison = NewRecord {
        body: Bytes::from_static(br#"{"poison":true}"#),
        ..record()
    };
    queue
        .enqueue(vec![EventRecords {
            dedup_key: Some(Arc::from("poison")),
            records: vec![poison],
        }])
        .await
        .unwrap();
    let s = DeliverySettings {
        batch_max_records: 1,
        ..settings()
    };
    let (_, stop, task) = start(&queue, s, lytics.clone());
    // Good records keep arriving, so Lytics is answering: no outage, each failure is the record's.
    let mut good = 0;
    while dead_letters(&queue).await.is_empty() && good < 2000 {
        good += 1;
        queue.enqueue(vec![event(&format!("good{good}"))]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        lytics.poison_calls.lock().unwrap().len(),
        5,
        "max_attempts calls, then no more"
    );
    let dead = dead_letters(&queue).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.starts_with("gave up after 5 attempt(s)"),
        "{}",
        dead[0].reason
    );
    let kinds: Vec<_> = dead[0].queued.history.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec![AttemptKind::Spent; 5]);
    assert_eq!(dead[0].queued.attempts, 5);
    assert_eq!(
        lytics.delivered.load(Ordering::Relaxed),
        good,
        "every good record arrived"
    );
}

#[tokio::test(start_paused = true)]
async fn an_outage_spends_no_attempts_and_the_retry_age_bounds_it() {
    // Lytics never answers: the first two failed calls spend attempts, then the outage hold
    // defers the record without spending more, until it has been retried for an hour.
    let lytics = Scripted::new(&[], 503);
    let s = DeliverySettings {
        max_attempts: 3,
        max_retry_age: Duration::from_secs(3600),
        backoff_max: Duration::from_secs(600),
        ..settings()
    };
    let started = now_ms();
    let queue = run(s, lytics.clone(), |q| q.depth() == 0).await;
    let elapsed = now_ms() - started;
    assert!(elapsed >= 3_600_000, "gave up after {elapsed} virtual ms");
    assert!(
        elapsed < 3_600_000 + 700_000,
        "gave up within one backoff step of the age limit: {elapsed} ms"
    );
    let dead = dead_letters(&queue).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .reason
            .starts_with("gave up after retrying for 1 h (max_retry_age)"),
        "{}",
        dead[0].reason
    );
    let q = &dead[0].queued;
    assert_eq!(
        q.attempts, 2,
        "only the failures before the outage spent attempts"
    );
    // Every collect call carrying the record is in its history (the rest were dryrun probes).
    assert!(q.history.len() > 3 && q.history.len() <= lytics.calls().len());
    assert!(q.history[..2].iter().all(|a| a.kind == AttemptKind::Spent));
    assert!(q.history[2..].iter().all(|a| a.kind == AttemptKind::Deferred));
    assert!(lytics.calls().len() > 3, "{} calls", lytics.calls().len());
}

#[tokio::test(start_paused = true)]
async fn an_outage_or_throttling_longer_than_the_attempts_loses_nothing() {
    for (status, failures) in [(503, 12), (429, 12)] {
        let lytics = Scripted::new(&vec![status; failures], 200);
        let s = DeliverySettings {
            max_attempts: 3,
            ..settings()
        };
        let queue = run(s, lytics.clone(), |q| q.depth() == 0).await;
        assert!(
            lytics.calls().len() > failures,
            "{status}: retried until Lytics took it: {} calls (dryrun probes included)",
            lytics.calls().len()
        );
        assert!(
            dead_letters(&queue).await.is_empty(),
            "{status}: nothing dead-lettered"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_lowers_the_calls_in_flight_limit() {
    let lytics = Scripted::new(&[429], 200);
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    let s = settings();
    let delivery = Delivery::new(queue.clone(), integration(), Telemetry::disabled(), s.clone())
        .unwrap()
        .with_sender(lytics.clone());
    let state = delivery.state();
    let record = record();
    queue
        .enqueue(vec![EventRecords {
            dedup_key: Some(Arc::from("e")),
            records: vec![record],
        }])
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(delivery.run(stop.clone(), Duration::from_secs(1)));
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(lytics.calls().len(), 2);
    assert_eq!(
        state.limits().get("lytics"),
        Some(&(s.max_in_flight / 2)),
        "halved by the 429, not yet regrown"
    );
}

#[tokio::test(start_paused = true)]
async fn the_first_success_since_start_brings_retries_forward() {
    let lytics = Scripted::new(&[503], 200);
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    let s = DeliverySettings {
        backoff_base: Duration::from_secs(3600),
        backoff_max: Duration::from_secs(3600),
        ..settings()
    };
    let delivery = Delivery::new(queue.clone(), integration(), Telemetry::disabled(), s)
        .unwrap()
        .with_sender(lytics.clone());
    queue
        .enqueue(vec![EventRecords {
            dedup_key: Some(Arc::from("a")),
            records: vec![record()],
        }])
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(delivery.run(stop.clone(), Duration::from_secs(1)));
    while lytics.calls().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first record now waits out a backoff of up to an hour; a second one arrives.
    let second_at = now_ms();
    queue
        .enqueue(vec![EventRecords {
            dedup_key: Some(Arc::from("b")),
            records: vec![record()],
        }])
        .await
        .unwrap();
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained_after = now_ms() - second_at;
    stop.cancel();
    task.await.unwrap();
    assert!(
        drained_after < 2_000,
        "the backed-off record waited {drained_after} ms after Lytics answered again"
    );
}

/// Delivers from `queue` until it is empty, then stops delivery.
async fn deliver_all(queue: Arc<MemoryQueue>, settings: DeliverySettings, sender: Arc<Scripted>) {
    let (_, stop, task) = start(&queue, settings, sender);
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    task.await.unwrap();
}

fn event(key: &str) -> EventRecords {
    EventRecords {
        dedup_key: Some(Arc::from(key)),
        records: vec![record()],
    }
}

#[tokio::test(start_paused = true)]
async fn a_saturated_integration_gets_its_next_call_as_soon_as_one_ends() {
    let lytics = Scripted::accepting_after(Duration::from_millis(50));
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue.enqueue(vec![event("first")]).await.unwrap();
    // The second record arrives while the only allowed call is in flight: the dispatcher finds
    // the integration saturated and must lease again when that call ends (50 ms), not after
    // its idle wait (500 ms).
    let late = {
        let queue = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            queue.enqueue(vec![event("second")]).await.unwrap();
        })
    };
    let one_at_a_time = DeliverySettings {
        max_in_flight: 1,
        ..settings()
    };
    deliver_all(queue.clone(), one_at_a_time, lytics.clone()).await;
    late.await.unwrap();
    let calls = lytics.calls();
    assert_eq!(calls.len(), 2, "one call per record: {calls:?}");
    assert!(calls[1] - calls[0] < 200, "the second call came at {calls:?}");
}

#[tokio::test(start_paused = true)]
async fn an_integration_never_has_more_calls_in_flight_than_its_limit() {
    let lytics = Scripted::accepting_after(Duration::from_millis(50));
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue
        .enqueue(vec![event("e0"), event("e1"), event("e2")])
        .await
        .unwrap();
    // One record per lease and one call at a time: three leases are possible at once, but the
    // first holds the integration's only slot until its call is answered.
    let one_at_a_time = DeliverySettings {
        batch_max_records: 1,
        max_in_flight: 1,
        ..settings()
    };
    deliver_all(queue.clone(), one_at_a_time, lytics.clone()).await;
    let calls = lytics.calls();
    assert_eq!(calls.len(), 3, "one call per record: {calls:?}");
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (50..200).contains(&gap),
            "each call starts when the previous (50 ms) ends: {calls:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lytics_outage_holds_delivery_and_probes_with_one_call_at_a_time() {
    // Four calls go out at once and fail; from the third failure in a row the integration is
    // held (base 1 s, doubling), then probed by one call at a time, until Lytics answers.
    let lytics = Arc::new(Scripted {
        answers: Mutex::new([503; 6].into_iter().collect()),
        last: 200,
        calls: Mutex::default(),
        latency: Duration::from_millis(50),
    });
    let queue = Arc::new(MemoryQueue::new(100, Duration::from_secs(60)));
    let events: Vec<_> = (0..20).map(|i| event(&format!("e{i}"))).collect();
    queue.enqueue(events).await.unwrap();
    let s = DeliverySettings {
        batch_max_records: 2,
        max_in_flight: 4,
        ..settings()
    };
    let (state, stop, task) = start(&queue, s, lytics.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let outage = state.outages().get("lytics").copied();
    assert_eq!(
        outage.map(|o| o.failed_calls),
        Some(4),
        "four failed calls in a row, then held: {:?}",
        lytics.calls()
    );
    assert_eq!(lytics.calls().len(), 4, "nothing is sent during the hold");
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    task.await.unwrap();

    let calls = lytics.calls();
    assert!(calls[..4].iter().all(|&t| t == calls[0]), "{calls:?}");
    // Probes: after the 4th, 5th and 6th failure the hold is 2, 4 and 8 s from the answer.
    for (i, hold) in [(3, 2000), (4, 4000), (5, 8000)] {
        let gap = calls[i + 1] - calls[i];
        assert!(
            (hold..hold + 600).contains(&gap),
            "call {} came {gap} ms after call {i}, expected the {hold} ms hold: {calls:?}",
            i + 1
        );
    }
    assert!(state.outages().is_empty(), "the success ended the outage");
    let dead = queue
        .dead_letters(DeadLetterFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(dead.is_empty(), "no record ran out of attempts: {dead:?}");
    assert!(
        calls.len() <= 6 + 10 + 2,
        "six failures, then about one call per two-record batch: {} calls",
        calls.len()
    );
}

/// Takes every call and keeps each call's URL and body.
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<(Url, Bytes)>>,
}

#[async_trait::async_trait]
impl CollectSender for Recording {
    async fn post(&self, url: Url, _token: &Secret, body: Bytes) -> Result<Reply, TransportError> {
        self.calls.lock().unwrap().push((url, body));
        let body = r#"{"status":200,"message":"success","data":{"message_count":1,"rejected_count":0}}"#;
        answer(200, body.as_bytes())
    }
}

#[tokio::test(start_paused = true)]
async fn each_batch_holds_one_stream_and_timestamp_field_with_own_stream_records_resolved() {
    let queue = Arc::new(MemoryQueue::new(100, Duration::from_secs(60)));
    // (stream, timestamp field, n): "" is the integration's own stream, `s`.
    let made = [
        ("", "_ts", 1),
        ("other", "_ts", 2),
        ("s", "_ts", 3),
        ("", "ts2", 4),
        ("other", "_ts", 5),
        ("", "_ts", 6),
    ];
    let records = made
        .iter()
        .map(|(stream, ts, n)| NewRecord {
            stream: Arc::from(*stream),
            timestamp_field: Arc::from(*ts),
            body: Bytes::from(format!(r#"{{"n":{n}}}"#)),
            ..record()
        })
        .collect();
    queue
        .enqueue(vec![EventRecords {
            dedup_key: None,
            records,
        }])
        .await
        .unwrap();
    let lytics = Arc::new(Recording::default());
    let (_, stop, task) = start(&queue, settings(), lytics.clone());
    for _ in 0..1000 {
        if queue.depth() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let mut calls: Vec<(String, String, String)> = lytics
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(url, body)| {
            let ts = url
                .query_pairs()
                .find(|(k, _)| k == "timestamp_field")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let stream = url.path().rsplit('/').next().unwrap_or_default().to_string();
            (stream, ts, String::from_utf8(body.to_vec()).unwrap())
        })
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        vec![
            ("other".into(), "_ts".into(), r#"[{"n":2},{"n":5}]"#.into()),
            ("s".into(), "_ts".into(), r#"[{"n":1},{"n":3},{"n":6}]"#.into()),
            ("s".into(), "ts2".into(), r#"[{"n":4}]"#.into()),
        ]
    );
}

/// Takes every call but reports one record of each rejected (`rejected_count: 1`).
struct RejectsOne;

#[async_trait::async_trait]
impl CollectSender for RejectsOne {
    async fn post(&self, _url: Url, _token: &Secret, _body: Bytes) -> Result<Reply, TransportError> {
        answer(
            200,
            br#"{"status":200,"message":"success","data":{"message_count":2,"rejected_count":1}}"#,
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_200_with_rejected_records_is_a_partial_failure_in_metrics_and_the_live_view() {
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue.enqueue(vec![event("a"), event("b")]).await.unwrap();
    let bus = crate::live::LiveBus::new(16);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut watcher = bus.subscribe(crate::live::Filter::default());
    let delivery = Delivery::new(queue.clone(), integration(), Telemetry::disabled(), settings())
        .unwrap()
        .with_monitor(Monitor::new(bus.clone(), metrics.clone()))
        .with_sender(Arc::new(RejectsOne));
    let state = delivery.state();
    let stop = CancellationToken::new();
    let task = tokio::spawn(delivery.run(stop.clone(), Duration::from_secs(1)));
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(state.counters.rejected_in_200.load(Ordering::Relaxed), 1);
    let text = metrics
        .render(queue.as_ref(), &bus, || state.paused(), Vec::new)
        .await
        .unwrap();
    assert!(
        text.contains(r#"lytics_relay_records_rejected_total{integration="lytics"} 1"#),
        "{text}"
    );
    let Some(crate::live::Seen::Event(seen)) = watcher.next().await else {
        panic!("no live event")
    };
    assert!(
        seen.detail
            .contains("partial failure: Lytics rejected 1 record(s)"),
        "{:?}",
        seen.detail
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_integration_holds_its_records_without_spending_attempts_until_a_probe_passes() {
    // The call and the first probes find a bad token; then Lytics takes the token.
    let lytics = Scripted::new(&[401; 6], 200);
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue.enqueue(vec![event("a")]).await.unwrap();
    let s = DeliverySettings {
        max_attempts: 1,
        probe_interval: Duration::from_secs(30),
        ..settings()
    };
    let (state, stop, task) = start(&queue, s, lytics.clone());
    tokio::time::sleep(Duration::from_secs(100)).await;
    let pause = state.paused().get("lytics").cloned().expect("paused");
    assert_eq!(pause.status, 401);
    assert_eq!(pause.hint, lytics::HINT_401);
    assert_eq!(lytics.calls().len(), 4, "one call, then a probe every 30 s");
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert!(state.paused().is_empty(), "a passing probe resumed it");
    assert!(dead_letters(&queue).await.is_empty(), "no attempt was spent");
    let calls = lytics.calls();
    assert_eq!(
        calls.len(),
        8,
        "six refusals, the probe that passed, the delivery: {calls:?}"
    );
}

/// Delivers `n` records (batches of one) enqueued at once, with backoffs of an hour.
fn hour_backoff() -> DeliverySettings {
    DeliverySettings {
        batch_max_records: 1,
        backoff_base: Duration::from_secs(3600),
        backoff_max: Duration::from_secs(3600),
        probe_interval: Duration::from_secs(10),
        ..settings()
    }
}

#[tokio::test(start_paused = true)]
async fn a_lone_failure_waits_out_its_backoff_while_other_calls_succeed() {
    let lytics = Scripted::new(&[200, 503], 200);
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    let delivery = Delivery::new(
        queue.clone(),
        integration(),
        Telemetry::disabled(),
        hour_backoff(),
    )
    .unwrap()
    .with_sender(lytics.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(delivery.run(stop.clone(), Duration::from_secs(1)));
    for (key, calls) in [("first", 1), ("fails", 2), ("third", 3)] {
        queue.enqueue(vec![event(key)]).await.unwrap();
        while lytics.calls().len() < calls {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        queue.depth(),
        1,
        "the failed record waits out its backoff: a success after a lone failure brings nothing forward"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dryrun_probe_finds_lytics_back_and_brings_every_retry_forward() {
    // Three calls fail: an outage. Every record then waits out up to an hour; the probe after
    // the 30 s hold finds Lytics back and brings them all forward, and the first call with
    // records ends the outage.
    let lytics = Scripted::new(&[503, 503, 503], 200);
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue
        .enqueue(vec![event("a"), event("b"), event("c")])
        .await
        .unwrap();
    let delivery = Delivery::new(
        queue.clone(),
        integration(),
        Telemetry::disabled(),
        hour_backoff(),
    )
    .unwrap()
    .with_sender(lytics.clone());
    let state = delivery.state();
    let stop = CancellationToken::new();
    let task = tokio::spawn(delivery.run(stop.clone(), Duration::from_secs(1)));
    let started = now_ms();
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = now_ms() - started;
    stop.cancel();
    task.await.unwrap();
    assert!(
        took < 60_000,
        "drained {took} ms after the outage began, not after the backoffs"
    );
    assert!(state.outages().is_empty());
    // A record whose drawn backoff was short may end the outage before the probe does.
    assert!(
        (6..=7).contains(&lytics.calls().len()),
        "three failures, the probe, three deliveries: {} calls",
        lytics.calls().len()
    );
    assert!(dead_letters(&queue).await.is_empty());
}

/// How [`AccountRefused`] answers `dryrun` calls.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dryrun {
    /// 200: the 400 was about the records.
    Passes,
    /// The same 400: the account is wrong.
    Refused,
    /// 503: undecided.
    Unavailable,
}

/// Answers every collect call 400 with a message naming the account, and `dryrun` calls as told.
struct AccountRefused {
    dryrun: Dryrun,
}

#[async_trait::async_trait]
impl CollectSender for AccountRefused {
    async fn post(&self, url: Url, _token: &Secret, _body: Bytes) -> Result<Reply, TransportError> {
        let dryrun = url.query_pairs().any(|(k, v)| k == "dryrun" && v == "true");
        match (dryrun, self.dryrun) {
            (true, Dryrun::Passes) => answer(
                200,
                br#"{"status":200,"message":"success","data":{"message_count":0}}"#,
            ),
            (true, Dryrun::Unavailable) => answer(503, br#"{"status":503,"message":"unavailable"}"#),
            _ => answer(
                400,
                br#"{"status":400,"message":"invalid account id in record 0"}"#,
            ),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_400_naming_the_account_pauses_only_when_a_dryrun_confirms_it() {
    for dryrun in [Dryrun::Refused, Dryrun::Passes, Dryrun::Unavailable] {
        let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
        queue.enqueue(vec![event("a")]).await.unwrap();
        let (state, stop, task) = start(&queue, settings(), Arc::new(AccountRefused { dryrun }));
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
        task.await.unwrap();
        let dead = dead_letters(&queue).await;
        match dryrun {
            Dryrun::Passes => {
                assert!(
                    state.paused().is_empty(),
                    "the account is fine: not a setup error"
                );
                assert_eq!(dead.len(), 1, "the record itself was refused");
                assert!(
                    dead[0].reason.starts_with("Lytics refused the record (400)"),
                    "{}",
                    dead[0].reason
                );
            }
            Dryrun::Refused => {
                let pause = state.paused().get("lytics").cloned().expect("paused");
                assert_eq!(pause.hint, lytics::HINT_400_ACCOUNT);
                assert!(dead.is_empty());
                assert_eq!(queue.depth(), 1, "held");
            }
            Dryrun::Unavailable => {
                assert!(state.paused().is_empty(), "undecided: not paused");
                assert!(dead.is_empty(), "undecided: retried, not refused");
                assert_eq!(queue.depth(), 1, "waiting for a retry");
            }
        }
    }
}

/// Passes every `dryrun` call and fails every call with records (503): a Lytics that validates
/// but cannot take records.
#[derive(Default)]
struct DryrunOnly {
    record_calls: AtomicU64,
}

#[async_trait::async_trait]
impl CollectSender for DryrunOnly {
    async fn post(&self, url: Url, _token: &Secret, _body: Bytes) -> Result<Reply, TransportError> {
        if url.query_pairs().any(|(k, v)| k == "dryrun" && v == "true") {
            return answer(
                200,
                br#"{"status":200,"message":"success","data":{"message_count":0}}"#,
            );
        }
        self.record_calls.fetch_add(1, Ordering::Relaxed);
        answer(503, br#"{"status":503,"message":"unavailable"}"#)
    }
}

#[tokio::test(start_paused = true)]
async fn passing_dryruns_do_not_end_an_outage_that_calls_with_records_still_meet() {
    let lytics = Arc::new(DryrunOnly::default());
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue.enqueue(vec![event("a")]).await.unwrap();
    let s = DeliverySettings {
        max_attempts: 3,
        probe_interval: Duration::from_secs(10),
        ..settings()
    };
    let (state, stop, task) = start(&queue, s, lytics.clone());
    tokio::time::sleep(Duration::from_secs(600)).await;
    stop.cancel();
    task.await.unwrap();
    let calls = lytics.record_calls.load(Ordering::Relaxed);
    assert!(
        calls > 10,
        "the record was retried after each passing probe: {calls} calls"
    );
    assert!(
        dead_letters(&queue).await.is_empty(),
        "failures in the outage spent no attempt (max_attempts 3)"
    );
    assert_eq!(queue.depth(), 1);
    assert!(state.outages().contains_key("lytics"), "still in an outage");
}

#[tokio::test(start_paused = true)]
async fn a_passing_dryrun_ends_an_outage_with_no_record_left_to_retry() {
    // Collect calls keep failing: three records start an outage, then each runs out of retry
    // age (1 ms) at its next failure. With nothing left to send, a passing probe ends it.
    let lytics = Arc::new(DryrunOnly::default());
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue
        .enqueue(vec![event("a"), event("b"), event("c")])
        .await
        .unwrap();
    let s = DeliverySettings {
        batch_max_records: 1,
        max_attempts: 100,
        max_retry_age: Duration::from_millis(1),
        probe_interval: Duration::from_secs(10),
        ..settings()
    };
    let (state, stop, task) = start(&queue, s, lytics.clone());
    while lytics.record_calls.load(Ordering::Relaxed) < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state.outages().contains_key("lytics"));
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state.outages().contains_key("lytics"), "no call has succeeded");
    tokio::time::sleep(Duration::from_secs(60)).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(dead_letters(&queue).await.len(), 3);
    assert!(state.outages().is_empty(), "the passing probe ended the outage");
}

/// Lytics without the stream `other` (404) until it is created; the integration's own stream
/// `s` exists. Counts the calls with records to `other` and the dryruns to each stream.
#[derive(Default)]
struct StreamMissing {
    created: std::sync::atomic::AtomicBool,
    /// Every call answers 401 while set.
    token_bad: std::sync::atomic::AtomicBool,
    sends_to_other: AtomicU64,
    dryruns: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl CollectSender for StreamMissing {
    async fn post(&self, url: Url, _token: &Secret, _body: Bytes) -> Result<Reply, TransportError> {
        let stream = url.path().rsplit('/').next().unwrap_or("").to_string();
        let dryrun = url.query_pairs().any(|(k, v)| k == "dryrun" && v == "true");
        if dryrun {
            self.dryruns.lock().unwrap().push(stream.clone());
        } else if stream == "other" {
            self.sends_to_other.fetch_add(1, Ordering::SeqCst);
        }
        if self.token_bad.load(Ordering::SeqCst) {
            return answer(401, br#"{"status":401,"message":"invalid token"}"#);
        }
        if stream == "other" && !self.created.load(Ordering::SeqCst) {
            return answer(404, br#"{"status":404,"message":"stream not found"}"#);
        }
        answer(
            200,
            br#"{"status":200,"message":"success","data":{"message_count":1,"rejected_count":0}}"#,
        )
    }
}

/// Queues one record for the stream `other` and starts delivery to `lytics`, probing every 30 s.
async fn start_with_a_record_for_other(
    lytics: &Arc<StreamMissing>,
) -> (
    Arc<MemoryQueue>,
    (
        Arc<DeliveryState>,
        CancellationToken,
        tokio::task::JoinHandle<bool>,
    ),
) {
    let queue = Arc::new(MemoryQueue::new(10, Duration::from_secs(60)));
    queue
        .enqueue(vec![EventRecords {
            dedup_key: None,
            records: vec![NewRecord {
                stream: "other".into(),
                ..record()
            }],
        }])
        .await
        .unwrap();
    let s = DeliverySettings {
        probe_interval: Duration::from_secs(30),
        ..settings()
    };
    let started = start(&queue, s, lytics.clone());
    (queue, started)
}

#[tokio::test(start_paused = true)]
async fn a_404_for_a_stream_the_rules_chose_is_probed_on_that_stream() {
    let lytics = Arc::new(StreamMissing::default());
    let (queue, (state, stop, task)) = start_with_a_record_for_other(&lytics).await;
    // Paused, and it stays paused: the probe asks about `other`, which a dryrun on the
    // integration's own stream would pass, resuming into the same 404 again and again.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pause = state.paused().get("lytics").cloned().expect("paused");
        assert_eq!((pause.status, pause.stream.as_deref()), (404, Some("other")));
        assert_eq!(pause.hint, lytics::HINT_404);
    }
    assert_eq!(
        lytics.sends_to_other.load(Ordering::SeqCst),
        1,
        "not sent again while paused"
    );
    let dryruns = lytics.dryruns.lock().unwrap().clone();
    assert!(dryruns.len() >= 6, "{dryruns:?}");
    assert!(dryruns.iter().all(|s| s == "other"), "{dryruns:?}");

    // The stream is created in Lytics: the next probe passes and the record goes.
    lytics.created.store(true, Ordering::SeqCst);
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert!(state.paused().is_empty());
    assert_eq!(lytics.sends_to_other.load(Ordering::SeqCst), 2);
    assert!(dead_letters(&queue).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_finds_another_setup_error_updates_the_pause() {
    let lytics = Arc::new(StreamMissing::default());
    lytics.token_bad.store(true, Ordering::SeqCst);
    let (queue, (state, stop, task)) = start_with_a_record_for_other(&lytics).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let first = state.paused().get("lytics").cloned().expect("paused");
    assert_eq!((first.status, first.hint.as_str()), (401, lytics::HINT_401));
    // The token is fixed; the stream is still missing: the next probe says so.
    lytics.token_bad.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(40)).await;
    let now = state.paused().get("lytics").cloned().expect("still paused");
    assert_eq!((now.status, now.hint.as_str()), (404, lytics::HINT_404));
    assert_eq!(now.since_ms, first.since_ms, "the same pause");
    // Then the stream is created: resumed and delivered.
    lytics.created.store(true, Ordering::SeqCst);
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert!(state.paused().is_empty());
    assert!(dead_letters(&queue).await.is_empty());
}

#[test]
fn fewer_than_three_failed_calls_in_a_row_are_no_outage_yet() {
    let state = DeliveryState::default();
    let backoff = Backoff::try_new(Duration::from_secs(1), Duration::from_secs(60)).unwrap();
    assert!(state.call_failed("lytics", &backoff).is_none());
    assert!(state.call_failed("lytics", &backoff).is_none());
    // Shown nowhere (status, /healthz) before the hold starts: it would have no hold time.
    assert!(state.outages().is_empty(), "{:?}", state.outages());
    let o = state.call_failed("lytics", &backoff).unwrap();
    assert_eq!(o.failed_calls, 3);
    assert!(o.hold_until_ms > now_ms());
    assert_eq!(state.outages().get("lytics").copied(), Some(o));
    assert!(state.call_answered("lytics"));
    assert!(state.outages().is_empty());
}

/// Refuses (400) every call carrying a poison record, takes every other; counts the calls.
#[derive(Default)]
struct PoisonRefused {
    calls: AtomicU64,
    delivered: AtomicU64,
}

#[async_trait::async_trait]
impl CollectSender for PoisonRefused {
    async fn post(&self, _url: Url, _token: &Secret, body: Bytes) -> Result<Reply, TransportError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if body.windows(6).any(|w| w == b"poison") {
            return answer(400, br#"{"status":400,"message":"bad record"}"#);
        }
        let records = serde_json::from_slice::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .len();
        self.delivered.fetch_add(records as u64, Ordering::Relaxed);
        answer(
            200,
            br#"{"status":200,"message":"success","data":{"message_count":1,"rejected_count":0}}"#,
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_batch_is_halved_until_only_its_bad_records_are_dead_lettered() {
    let lytics = Arc::new(PoisonRefused::default());
    let queue = Arc::new(MemoryQueue::new(100, Duration::from_secs(60)));
    let events: Vec<_> = (0..8)
        .map(|i| EventRecords {
            dedup_key: Some(Arc::from(format!("e{i}"))),
            records: vec![NewRecord {
                body: if [1, 4, 6].contains(&i) {
                    Bytes::from(format!(r#"{{"poison":true,"n":{i}}}"#))
                } else {
                    Bytes::from(format!(r#"{{"n":{i}}}"#))
                },
                ..record()
            }],
        })
        .collect();
    queue.enqueue(events).await.unwrap();
    let (_state, stop, task) = start(&queue, settings(), lytics.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        lytics.delivered.load(Ordering::Relaxed),
        5,
        "the good neighbours arrive"
    );
    let dead = dead_letters(&queue).await;
    let mut bad: Vec<String> = dead
        .iter()
        .map(|d| d.queued.record.event_id.to_string())
        .collect();
    bad.sort();
    assert_eq!(dead.len(), 3, "{bad:?}");
    assert!(
        dead.iter()
            .all(|d| d.reason == "Lytics refused the record (400): bad record"),
        "{dead:?}"
    );
    assert_eq!(queue.depth(), 0);
    // One batch of 8 with 3 bad records: the whole, then halves down to single records.
    assert!(
        lytics.calls.load(Ordering::Relaxed) <= 13,
        "{}",
        lytics.calls.load(Ordering::Relaxed)
    );
}
