//! The NATS JetStream queue: several relays share one queue, so any replica may accept an event
//! and any replica may deliver it.
//!
//! Input: records to hold. Output: due records by lease, from a durable pull consumer that every
//! replica shares. Layout on the server:
//! - stream `LYTICS_RELAY_RECORDS` (subjects `lytics_relay.records.<integration>`, work-queue
//!   retention, `max_msgs` = the queue capacity with discard-new, duplicate window = the dedup
//!   window) and its durable pull consumer `lytics-relay` (explicit ack, no delivery limit);
//! - stream `LYTICS_RELAY_DEAD` (subjects `lytics_relay.dead.<integration>`, limits retention)
//!   for dead letters, whose stream sequence is the dead letter's id.
//!
//! Each message is one record as JSON ([`Envelope`]), carrying every field of [`NewRecord`] plus
//! its attempts, history and the time it falls due. A retry publishes the record again with the
//! attempt added and then acknowledges the original, so attempts and history are exact whichever
//! replica leases it next and survive a crash of any of them. A record leased before it is due (a
//! retry) or whose integration is skipped is handed back with a delayed `Nak`, which spends no
//! attempt because attempts live in the message, not in JetStream's delivery count.
//!
//! This module never talks to Lytics and never maps events.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{ConnectOptions, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Attempt, AttemptKind, DeadLetter, DeadLetterFilter, EventRecords, NewRecord, Queue, QueueError,
    QueuedRecord, RecordId, Replay,
};
use crate::integration::Secret;
use crate::rules::Source;
use crate::timefmt::now_ms;

/// The stream of queued records.
pub const RECORDS_STREAM: &str = "LYTICS_RELAY_RECORDS";
/// The stream of dead letters.
pub const DEAD_STREAM: &str = "LYTICS_RELAY_DEAD";
/// The durable pull consumer every replica shares.
pub const CONSUMER: &str = "lytics-relay";
const RECORDS_SUBJECT: &str = "lytics_relay.records";
const DEAD_SUBJECT: &str = "lytics_relay.dead";
/// Dead letters kept; the oldest are dropped first.
const DEAD_LETTER_CAP: i64 = 100_000;
/// How often depth and connection state are refreshed from the server.
const REFRESH: Duration = Duration::from_millis(250);
/// The longest a skipped (paused or saturated) integration's record is handed back for.
const SKIP_DELAY_MAX: Duration = Duration::from_secs(5);
/// How long one lease may wait for JetStream to answer a fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach NATS and shape the streams.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`); several for a cluster.
    pub urls: Vec<String>,
    /// A credentials file (JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<Secret>,
    /// An authentication token.
    pub token: Option<Secret>,
    /// Stream replicas (1, or 3 on a three-node cluster).
    pub replicas: usize,
    /// How long a leased record stays invisible to other replicas without news from its holder;
    /// a replica that dies loses its leases after this long. Holders send progress in between.
    pub ack_wait: Duration,
    /// The longest a retry waits on the server before a replica looks at it again: how late,
    /// at most, a retry comes once Lytics is back and delivery brings retries forward.
    pub retry_recheck: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            urls: Vec::new(),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            replicas: 1,
            ack_wait: Duration::from_secs(30),
            retry_recheck: Duration::from_secs(30),
        }
    }
}

/// One queued record as stored in JetStream.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    integration: String,
    stream: String,
    timestamp_field: String,
    rule: String,
    rules_version: String,
    source: String,
    event_id: String,
    event_type: String,
    body: String,
    input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    accepted_ms: i64,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    history: Vec<Attempt>,
    /// Not deliverable before (unix ms); 0 for a new record.
    #[serde(default)]
    due_ms: i64,
}

/// A dead letter as stored in JetStream.
#[derive(Debug, Serialize, Deserialize)]
struct DeadEnvelope {
    #[serde(flatten)]
    record: Envelope,
    reason: String,
    at_ms: i64,
}

impl DeadEnvelope {
    /// The dead letter stored at `seq` of the dead-letter stream.
    fn into_dead_letter(self, seq: u64) -> DeadLetter {
        DeadLetter {
            id: i64::try_from(seq).unwrap_or(i64::MAX),
            queued: QueuedRecord {
                id: seq,
                record: self.record.record(),
                attempts: self.record.attempts,
                history: self.record.history,
            },
            reason: self.reason,
            at_ms: self.at_ms,
        }
    }
}

impl Envelope {
    fn new(r: &NewRecord, attempts: u32, history: Vec<Attempt>, due_ms: i64) -> Self {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        Envelope {
            integration: r.integration.to_string(),
            stream: r.stream.to_string(),
            timestamp_field: r.timestamp_field.to_string(),
            rule: r.rule.to_string(),
            rules_version: r.rules_version.to_string(),
            source: r.source.as_str().to_string(),
            event_id: r.event_id.to_string(),
            event_type: r.event_type.to_string(),
            body: text(&r.body),
            input: text(&crate::normalize::input_json_bytes(&r.input)),
            traceparent: r.traceparent.as_deref().map(str::to_string),
            accepted_ms: r.accepted_ms,
            attempts,
            history,
            due_ms,
        }
    }

    fn record(&self) -> NewRecord {
        NewRecord {
            integration: Arc::from(self.integration.as_str()),
            stream: Arc::from(self.stream.as_str()),
            timestamp_field: Arc::from(self.timestamp_field.as_str()),
            rule: Arc::from(self.rule.as_str()),
            rules_version: Arc::from(self.rules_version.as_str()),
            source: Source::parse(&self.source).unwrap_or(Source::Signal),
            event_id: Arc::from(self.event_id.as_str()),
            event_type: Arc::from(self.event_type.as_str()),
            body: Bytes::from(self.body.clone().into_bytes()),
            input: Bytes::from(self.input.clone().into_bytes()),
            traceparent: self.traceparent.as_deref().map(Arc::from),
            accepted_ms: self.accepted_ms,
        }
    }

    fn payload(&self) -> Result<Bytes, QueueError> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| QueueError::Store(format!("cannot encode a record: {e}")))
    }
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    consumer: consumer::PullConsumer,
    capacity: usize,
    urls: String,
    /// Leased messages by stream sequence, so ack / retry / dead letter can answer them.
    leased: Mutex<HashMap<RecordId, jetstream::Message>>,
    depth: AtomicUsize,
    connected: AtomicBool,
    work: Notify,
    /// See [`NatsOptions::retry_recheck`].
    retry_recheck: Duration,
    /// When this replica last brought each integration's retries forward (unix ms): a retry
    /// scheduled before then is due whatever its `due_ms`.
    expedited: Mutex<HashMap<String, i64>>,
}

/// A queue on NATS JetStream, shared by every relay connected to the same streams.
pub struct NatsQueue {
    inner: Arc<Inner>,
    _stop: DropGuard,
}

fn store(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Store(format!("{what}: {e}"))
}

impl NatsQueue {
    /// Connects, creates or updates the streams and the shared consumer, and starts the
    /// background refresh of depth and connection state.
    pub async fn connect(
        options: &NatsOptions,
        capacity: usize,
        dedup_window: Duration,
    ) -> Result<Self, QueueError> {
        let urls = options.urls.join(",");
        let addrs = options
            .urls
            .iter()
            .map(|u| ServerAddr::from_str(u).map_err(|e| store(&format!("bad NATS URL `{u}`"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut connect = match &options.creds_file {
            Some(path) => ConnectOptions::with_credentials_file(path).await.map_err(|e| {
                store(
                    &format!("cannot read the NATS credentials `{}`", path.display()),
                    e,
                )
            })?,
            None => ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&options.user, &options.password) {
            connect = connect.user_and_password(user.clone(), password.expose().to_string());
        }
        if let Some(token) = &options.token {
            connect = connect.token(token.expose().to_string());
        }
        let client = connect
            .name("lytics-relay")
            .connection_timeout(Duration::from_secs(5))
            .connect(addrs)
            .await
            .map_err(|e| store(&format!("cannot connect to NATS at `{urls}`"), e))?;
        let js = jetstream::new(client.clone());
        let replicas = options.replicas.max(1);
        let records = ensure_stream(
            &js,
            stream::Config {
                name: RECORDS_STREAM.into(),
                subjects: vec![format!("{RECORDS_SUBJECT}.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_messages: i64::try_from(capacity).unwrap_or(i64::MAX),
                discard: stream::DiscardPolicy::New,
                duplicate_window: dedup_window,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        tracing::debug!(
            stream = RECORDS_STREAM,
            messages = records.state.messages,
            "records stream ready"
        );
        ensure_stream(
            &js,
            stream::Config {
                name: DEAD_STREAM.into(),
                subjects: vec![format!("{DEAD_SUBJECT}.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_messages: DEAD_LETTER_CAP,
                discard: stream::DiscardPolicy::Old,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let stream = js
            .get_stream(RECORDS_STREAM)
            .await
            .map_err(|e| store(&format!("cannot open the stream `{RECORDS_STREAM}`"), e))?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: -1,
                max_ack_pending: -1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| store(&format!("cannot create the consumer `{CONSUMER}`"), e))?;
        let inner = Arc::new(Inner {
            client,
            js,
            consumer,
            capacity,
            urls,
            leased: Mutex::new(HashMap::new()),
            depth: AtomicUsize::new(usize::try_from(records.state.messages).unwrap_or(usize::MAX)),
            connected: AtomicBool::new(true),
            work: Notify::new(),
            retry_recheck: options.retry_recheck,
            expedited: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(refresh(inner.clone(), stream, stop.clone()));
        tokio::spawn(keep_leases(inner.clone(), options.ack_wait, stop.clone()));
        Ok(NatsQueue {
            inner,
            _stop: stop.drop_guard(),
        })
    }
}

impl NatsQueue {
    /// The connection, for other state kept on the same NATS (installed integrations).
    pub fn client(&self) -> async_nats::Client {
        self.inner.client.clone()
    }
}

/// Keeps `depth` and `connected` current.
async fn refresh(inner: Arc<Inner>, mut stream: stream::Stream, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REFRESH) => {}
        }
        let up = inner.client.connection_state() == async_nats::connection::State::Connected;
        inner.connected.store(up, Ordering::Relaxed);
        if up && let Ok(info) = stream.info().await {
            let n = usize::try_from(info.state.messages).unwrap_or(usize::MAX);
            inner.depth.store(n, Ordering::Relaxed);
        }
    }
}

/// Tells the server every leased record is still being worked on, so a long delivery (a slow
/// Lytics, a batch split) keeps its lease while a dead replica's leases expire after `ack_wait`.
async fn keep_leases(inner: Arc<Inner>, ack_wait: Duration, stop: CancellationToken) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let held: Vec<jetstream::Message> = inner
            .leased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        join_all(held.iter().map(|m| m.ack_with(AckKind::Progress))).await;
    }
}

impl Inner {
    /// True when this replica brought `env`'s integration's retries forward after the attempt
    /// that scheduled `env`.
    fn brought_forward(&self, env: &Envelope) -> bool {
        let Some(scheduled) = env.history.last().map(|a| a.at_ms) else {
            return false;
        };
        self.expedited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&env.integration)
            .is_some_and(|&at| at >= scheduled)
    }

    fn take(&self, ids: impl IntoIterator<Item = RecordId>) -> Vec<jetstream::Message> {
        let mut leased = self.leased.lock().unwrap_or_else(|e| e.into_inner());
        ids.into_iter().filter_map(|id| leased.remove(&id)).collect()
    }

    fn less_depth(&self, n: usize) {
        let _ = self
            .depth
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_sub(n))
            });
    }

    fn check_connected(&self) -> Result<(), QueueError> {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            self.connected.store(false, Ordering::Relaxed);
            Err(QueueError::Store(format!(
                "NATS at `{}` is not reachable",
                self.urls
            )))
        }
    }

    fn full_or_store(&self, what: &str, e: impl std::fmt::Display) -> QueueError {
        publish_error(what, &e.to_string(), self.capacity)
    }

    /// Publishes and waits until JetStream stored it; returns whether it was a duplicate.
    async fn publish(
        &self,
        subject: String,
        payload: Bytes,
        msg_id: Option<String>,
    ) -> Result<bool, QueueError> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        }
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| self.full_or_store("cannot publish to NATS", e))?
            .await
            .map_err(|e| self.full_or_store("NATS did not store a record", e))?;
        Ok(ack.duplicate)
    }
}

/// Creates stream `config` or brings it to `config`. A request that timed out is tried again, a
/// few times: replicas starting together on a fresh cluster ask for the same streams at once,
/// and the cluster may answer neither in time while it places them.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<jetstream::stream::Info, QueueError> {
    const TRIES: u32 = 4;
    let name = config.name.clone();
    let mut tried = 0;
    loop {
        tried += 1;
        match js.create_or_update_stream(config.clone()).await {
            Ok(info) => return Ok(info),
            Err(e) if tried < TRIES && e.to_string().contains("timed out") => {
                tracing::warn!(stream = %name, error = %e, "creating a NATS stream timed out; trying again");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(tried))).await;
            }
            Err(e) => return Err(store(&format!("cannot create the stream `{name}`"), e)),
        }
    }
}

/// What a refused publish means: the stream is full, another call is storing the same id, or
/// the store failed.
fn publish_error(what: &str, text: &str, capacity: usize) -> QueueError {
    if text.contains("maximum messages") || text.contains("maximum bytes") {
        QueueError::Full { capacity }
    } else if text.contains("10158") || text.contains("duplicate message id is in process") {
        // JetStream's answer to the second of two simultaneous publishes of one id: the first
        // may still fail, so this one is not a duplicate yet; the sender retries.
        QueueError::InProcess
    } else {
        store(what, text)
    }
}

fn records_subject(integration: &str) -> String {
    format!("{RECORDS_SUBJECT}.{integration}")
}

#[async_trait]
impl Queue for NatsQueue {
    /// Every record is published with `Nats-Msg-Id` = `<dedup key>#<index>`, so a repeated
    /// event (or a repeated call after a partial failure) stores only what is missing; the event
    /// is a duplicate when its first record was.
    async fn enqueue(&self, events: Vec<EventRecords>) -> Result<Vec<bool>, QueueError> {
        let inner = &self.inner;
        inner.check_connected()?;
        let mut in_call = HashSet::new();
        let mut publishes = Vec::new();
        let mut first_of = Vec::with_capacity(events.len());
        for e in &events {
            if e.records.is_empty() || e.dedup_key.as_ref().is_some_and(|k| !in_call.insert(k.clone())) {
                first_of.push(None);
                continue;
            }
            first_of.push(Some(publishes.len()));
            for (i, r) in e.records.iter().enumerate() {
                let payload = Envelope::new(r, 0, Vec::new(), 0).payload()?;
                publishes.push(inner.publish(
                    records_subject(&r.integration),
                    payload,
                    e.dedup_key.as_ref().map(|k| format!("{k}#{i}")),
                ));
            }
        }
        let results = join_all(publishes).await;
        let mut stored = 0;
        for r in &results {
            match r {
                Ok(false) => stored += 1,
                Ok(true) => {}
                Err(e) => return Err(e.clone()),
            }
        }
        let duplicates = events
            .iter()
            .zip(first_of)
            .map(|(e, first)| match first {
                Some(i) => matches!(results[i], Ok(true)),
                None => !e.records.is_empty(),
            })
            .collect();
        inner.depth.fetch_add(stored, Ordering::Relaxed);
        inner.work.notify_one();
        Ok(duplicates)
    }

    async fn lease(&self, max: usize, skip: &HashSet<String>) -> Result<Vec<QueuedRecord>, QueueError> {
        let inner = &self.inner;
        if max == 0 {
            return Ok(Vec::new());
        }
        inner.check_connected()?;
        // A fetch whose consumer leader died is never answered: bound it, so delivery asks
        // again (and reaches the new leader) instead of waiting forever.
        let deadline = tokio::time::Instant::now() + FETCH_TIMEOUT;
        let fetch = inner.consumer.fetch().max_messages(max).messages();
        let mut batch = match tokio::time::timeout_at(deadline, fetch).await {
            Ok(b) => b.map_err(|e| store("cannot fetch from NATS", e))?,
            Err(_) => return Err(QueueError::Store("a NATS fetch timed out".into())),
        };
        let now = now_ms();
        let mut out = Vec::new();
        let mut hand_back = Vec::new();
        loop {
            let m = match tokio::time::timeout_at(deadline, batch.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "NATS fetch ended early");
                    break;
                }
                Err(_) => {
                    tracing::warn!("NATS fetch timed out; asking again");
                    break;
                }
            };
            let Ok((seq, delivered)) = m.info().map(|i| (i.stream_sequence, i.delivered)) else {
                continue;
            };
            let env: Envelope = match serde_json::from_slice(&m.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(sequence = seq, error = %e, "dropping a queued message that is not a record");
                    let _ = m.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            if skip.contains(&env.integration) {
                // Back off the longer an integration stays paused, so a paused integration's
                // records do not churn through every replica.
                let steps = u32::try_from(delivered.clamp(1, 20)).unwrap_or(20);
                let delay = (Duration::from_millis(250) * steps).min(SKIP_DELAY_MAX);
                hand_back.push((m, delay));
                continue;
            }
            if env.due_ms > now && !inner.brought_forward(&env) {
                let delay = Duration::from_millis(u64::try_from(env.due_ms - now).unwrap_or(0));
                hand_back.push((m, delay.min(inner.retry_recheck)));
                continue;
            }
            out.push(QueuedRecord {
                id: seq,
                record: env.record(),
                attempts: env.attempts,
                history: env.history,
            });
            inner
                .leased
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(seq, m);
        }
        join_all(
            hand_back
                .iter()
                .map(|(m, delay)| m.ack_with(AckKind::Nak(Some(*delay)))),
        )
        .await;
        Ok(out)
    }

    fn shared(&self) -> bool {
        true
    }

    /// Naks the messages with `delay`: the records go back to the stream as they were, for any
    /// replica to lease.
    async fn release(&self, records: Vec<QueuedRecord>, delay: Duration) -> Result<(), QueueError> {
        let msgs = self.inner.take(records.iter().map(|r| r.id));
        join_all(msgs.iter().map(|m| m.ack_with(AckKind::Nak(Some(delay))))).await;
        Ok(())
    }

    async fn ack(&self, ids: &[RecordId]) -> Result<(), QueueError> {
        let msgs = self.inner.take(ids.iter().copied());
        let results = join_all(msgs.iter().map(|m| m.double_ack())).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        self.inner.less_depth(msgs.len() - failed);
        match results.into_iter().find_map(Result::err) {
            Some(e) => Err(store(&format!("NATS did not take {failed} ack(s)"), e)),
            None => Ok(()),
        }
    }

    /// Publishes each record again with the attempt in its history and `due_ms`, then acks the
    /// original. When the stream is full the original is handed back with a delayed `Nak`
    /// instead: the delay holds, but that attempt is not counted (the age limit still applies).
    async fn retry(
        &self,
        records: Vec<QueuedRecord>,
        due_ms: i64,
        attempt: Attempt,
    ) -> Result<(), QueueError> {
        let count_attempt = attempt.kind == AttemptKind::Spent;
        let inner = &self.inner;
        let delay = Duration::from_millis(u64::try_from(due_ms - now_ms()).unwrap_or(0));
        let mut first_error = None;
        let work = records.into_iter().map(|mut r| {
            let original = inner.take([r.id]).pop();
            if count_attempt {
                r.attempts += 1;
            }
            r.history.push(attempt.clone());
            let env = Envelope::new(&r.record, r.attempts, r.history, due_ms);
            async move {
                let published = match env.payload() {
                    Ok(p) => inner.publish(records_subject(&env.integration), p, None).await,
                    Err(e) => Err(e),
                };
                match (&published, original) {
                    (Ok(_), Some(m)) => m
                        .double_ack()
                        .await
                        .map_err(|e| store("NATS did not take an ack", e)),
                    (Err(_), Some(m)) => {
                        let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
                        published.map(|_| ())
                    }
                    (_, None) => published.map(|_| ()),
                }
            }
        });
        for r in join_all(work).await {
            if let Err(e) = r
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        inner.work.notify_one();
        match first_error {
            Some(QueueError::Full { .. }) => Ok(()),
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn dead_letter(&self, records: Vec<QueuedRecord>, reason: String) -> Result<(), QueueError> {
        let inner = &self.inner;
        let now = now_ms();
        let mut result = Ok(());
        for r in records {
            let original = inner.take([r.id]);
            let dead = DeadEnvelope {
                record: Envelope::new(&r.record, r.attempts, r.history, 0),
                reason: reason.clone(),
                at_ms: now,
            };
            let payload = serde_json::to_vec(&dead)
                .map(Bytes::from)
                .map_err(|e| QueueError::Store(format!("cannot encode a dead letter: {e}")))?;
            match inner
                .publish(format!("{DEAD_SUBJECT}.{}", r.record.integration), payload, None)
                .await
            {
                Ok(_) => {
                    for m in original {
                        if let Err(e) = m.double_ack().await {
                            result = Err(store("NATS did not take an ack", e));
                        } else {
                            inner.less_depth(1);
                        }
                    }
                }
                // The record stays queued and comes back after the ack wait.
                Err(e) => result = Err(e),
            }
        }
        result
    }

    /// Reads the dead stream backwards from the newest (or from the cursor), one message per
    /// request, filtering in memory until `limit` match.
    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
        let inner = &self.inner;
        inner.check_connected()?;
        let mut stream = inner
            .js
            .get_stream(DEAD_STREAM)
            .await
            .map_err(|e| store("cannot open the dead-letter stream", e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| store("cannot read the dead-letter stream", e))?
            .state
            .clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let mut seq = state.last_sequence;
        if let Some(b) = filter.before_id {
            seq = seq.min(u64::try_from(b.saturating_sub(1)).unwrap_or(0));
        }
        while seq >= state.first_sequence.max(1) && out.len() < filter.limit {
            if let Ok(m) = stream.get_raw_message(seq).await
                && let Ok(d) = serde_json::from_slice::<DeadEnvelope>(&m.payload)
            {
                let dead = d.into_dead_letter(seq);
                if filter.matches(&dead) {
                    out.push(dead);
                }
            }
            seq -= 1;
        }
        Ok(out)
    }

    /// One lookup per id (the default walks back from each id to the nearest dead letter).
    async fn dead_letters_by_id(&self, ids: &[i64]) -> Result<Vec<DeadLetter>, QueueError> {
        let inner = &self.inner;
        inner.check_connected()?;
        let stream = inner
            .js
            .get_stream(DEAD_STREAM)
            .await
            .map_err(|e| store("cannot open the dead-letter stream", e))?;
        let mut out = Vec::new();
        for &id in ids {
            let Ok(seq) = u64::try_from(id) else { continue };
            let m = match stream.get_raw_message(seq).await {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => continue,
                Err(e) => return Err(store("cannot read a dead letter", e)),
            };
            if let Ok(d) = serde_json::from_slice::<DeadEnvelope>(&m.payload) {
                out.push(d.into_dead_letter(seq));
            }
        }
        out.sort_by_key(|d| std::cmp::Reverse(d.id));
        Ok(out)
    }

    async fn replay_records(&self, replays: &[Replay]) -> Result<Vec<i64>, QueueError> {
        let inner = &self.inner;
        inner.check_connected()?;
        let stream = inner
            .js
            .get_stream(DEAD_STREAM)
            .await
            .map_err(|e| store("cannot open the dead-letter stream", e))?;
        let mut replayed = Vec::new();
        for replay in replays {
            let id = &replay.id;
            let Ok(seq) = u64::try_from(*id) else { continue };
            // Only "no such message" means not a dead letter; any other failure is the store's,
            // and reporting it as not found would tell the operator a dead letter is gone.
            let m = match stream.get_raw_message(seq).await {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => continue,
                Err(e) => return Err(store("cannot read a dead letter to replay", e)),
            };
            let d = match serde_json::from_slice::<DeadEnvelope>(&m.payload) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(sequence = seq, error = %e, "a message in the dead-letter stream is not a dead letter; not replayed");
                    continue;
                }
            };
            let fresh = Envelope::new(&replay.record(&d.record.record()), 0, Vec::new(), 0);
            // Keyed by the dead letter's sequence (never reused): two replicas replaying it at
            // once store it once, and the one the server calls the duplicate leaves it to the
            // other.
            let duplicate = match inner
                .publish(
                    records_subject(&fresh.integration),
                    fresh.payload()?,
                    Some(format!("replay:{seq}")),
                )
                .await
            {
                Ok(duplicate) => duplicate,
                // Another replica is publishing it right now and may still fail: its dead
                // letter stays until the one whose publish succeeds deletes it.
                Err(QueueError::InProcess) => continue,
                Err(e) => return Err(e),
            };
            // Published first, deleted second: a failure between leaves a copy in both.
            match stream.delete_message(seq).await {
                Ok(_) => {}
                // Deleted by a replica replaying it at the same moment.
                Err(e)
                    if ["10043", "10057", "not found"]
                        .iter()
                        .any(|t| e.to_string().contains(t)) => {}
                Err(e) => return Err(store("cannot delete a replayed dead letter", e)),
            }
            if duplicate {
                continue;
            }
            inner.depth.fetch_add(1, Ordering::Relaxed);
            replayed.push(*id);
        }
        inner.work.notify_one();
        Ok(replayed)
    }

    fn durable(&self) -> bool {
        true
    }

    /// Waiting retries are held by the server, out of reach: this marks the integration, and a
    /// retry scheduled before the mark is delivered when a lease next meets it, which is within
    /// `retry_recheck` (a lease never hands a retry back for longer). The exception is a retry
    /// the full stream could not take: its original waits out the whole backoff, since its
    /// history does not show the attempt. How many this brings forward is not known here; the
    /// answer is 0.
    async fn expedite(&self, integration: &str) -> Result<usize, QueueError> {
        self.inner
            .expedited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(integration.to_string(), now_ms());
        Ok(0)
    }

    /// Records of other replicas and delayed redeliveries are not visible without asking the
    /// server, so this says "nothing known"; delivery then polls at its idle interval, and an
    /// enqueue or retry on this replica wakes it at once.
    async fn next_due(&self, _skip: &HashSet<String>) -> Result<Option<i64>, QueueError> {
        Ok(None)
    }

    /// Messages in the records stream (waiting, leased or held back), refreshed from the
    /// server every quarter second and adjusted by this replica's own operations in between.
    /// The first message still in the records stream: retries are republished at the end,
    /// so this is the oldest record waiting for its first attempt or longest since its last.
    async fn oldest_accepted_ms(&self) -> Result<Option<i64>, QueueError> {
        let inner = &self.inner;
        inner.check_connected()?;
        let mut stream = inner
            .js
            .get_stream(RECORDS_STREAM)
            .await
            .map_err(|e| store("cannot open the records stream", e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| store("cannot read the records stream", e))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(None);
        }
        // Acked messages leave gaps in a work queue; look a little way for the first one left.
        let first = state.first_sequence.max(1);
        for seq in first..=state.last_sequence.min(first + 63) {
            if let Ok(m) = stream.get_raw_message(seq).await
                && let Ok(e) = serde_json::from_slice::<Envelope>(&m.payload)
            {
                return Ok(Some(e.accepted_ms));
            }
        }
        Ok(None)
    }

    fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    fn capacity(&self) -> usize {
        self.inner.capacity
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.work.notified()).await;
    }

    fn backend(&self) -> &'static str {
        "nats"
    }

    fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_publish_is_told_apart_by_what_the_server_said() {
        let full = "JetStream error: maximum messages exceeded (code 503, error code 10077)";
        assert!(matches!(
            publish_error("x", full, 7),
            QueueError::Full { capacity: 7 }
        ));
        let racing = "JetStream error: duplicate message id is in process (code 409, error code 10158)";
        assert!(matches!(publish_error("x", racing, 7), QueueError::InProcess));
        let down = "timed out: didn't receive an acknowledgement";
        assert!(matches!(publish_error("x", down, 7), QueueError::Store(_)));
    }
}
