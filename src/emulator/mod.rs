//! A built-in Lytics emulator: serves real Lytics paths so that anything written against it
//! works against Lytics, for tests and as the relay's zero-setup default.
//!
//! Input: HTTP requests on Lytics' paths (`POST /collect/json/{stream}`,
//! `GET /api/entity/user/{field}/{value}`, `GET /v2/stream/{name}/events`, `POST|GET /api/query`)
//! and on test-only `/_emulator/*` paths (faults, stats, reset), or the same operations through
//! [`Emulator`]'s methods. Output: Lytics-shaped answers, stored stream events, and user profiles
//! stitched and merged as Lytics does (by default identities, or by registered LQL queries).
//!
//! It never talks to the network beyond the listener it is given, never persists anything
//! (everything lives in memory), and never refers to the rest of the relay.
//!
//! Layout:
//! - [`lql`]: the LQL subset parser (public, so the relay can check the LQL it generates).
//! - `collect`: the collect API's body and size rules (pure).
//! - `mapping`: records to profile updates, by default or by compiled queries (pure).
//! - `profiles`: identity resolution and merge ops.
//! - `faults`: injected faults for tests (decisions only).
//! - `routes`: the axum router and its handlers.
//! - `time`: time parsing and rendering.
//!
//! Memory is bounded per stream: at most [`MAX_EVENTS_PER_STREAM`] events are kept (or the
//! `--max-events-per-stream` of the `emulator` command), and older
//! ones are dropped first (their effect on profiles stays). Profiles are not bounded: they grow
//! with the number of distinct users, which tests and benchmarks keep small.

mod collect;
mod faults;
pub mod lql;
mod mapping;
mod profiles;
mod routes;
mod time;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use profiles::ProfileUpdate;

use axum::body::Body;
use chrono::{DateTime, SecondsFormat, Utc};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

pub use faults::Faults;
pub use lql::{LqlCond, LqlError, LqlExpr, LqlField, LqlFunc, LqlQuery, parse_lql};

use collect::Accepted;
use faults::FaultAction;
use mapping::CompiledQuery;
use profiles::ProfileStore;

/// The most events kept per stream; the oldest are dropped beyond it so a long benchmark
/// cannot exhaust memory.
pub const MAX_EVENTS_PER_STREAM: usize = 1_000_000;

/// How long [`Emulator::serve`] lets open connections finish after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the emulator accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct EmulatorConfig {
    /// The only token accepted (`Authorization: <token>`, `Bearer <token>` or `?access_token=`).
    pub api_token: String,
    /// The account the token belongs to; a different `?account_id=` is refused.
    pub account_id: String,
    /// The streams that exist; names are case-sensitive, as in Lytics.
    pub streams: Vec<String>,
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret even here: debug output ends up in logs.
        f.debug_struct("EmulatorConfig")
            .field("api_token", &"***")
            .field("account_id", &self.account_id)
            .field("streams", &self.streams)
            .finish()
    }
}

/// One record as a stream stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// When the emulator received it.
    pub received_at: DateTime<Utc>,
    /// Its event time: from `timestamp_field` when given and readable, else `received_at`.
    pub event_time_ms: i64,
    /// The record as sent.
    pub record: Map<String, Value>,
}

impl StoredEvent {
    /// Renders the event as `GET /v2/stream/{name}/events` lists it.
    pub fn to_json(&self) -> Value {
        json!({
            "received_at": self.received_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "event_time_ms": self.event_time_ms,
            "record": self.record,
        })
    }
}

/// Counters since start or the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EmulatorStats {
    /// Collect requests received, faulted ones included.
    pub collect_requests: u64,
    /// Records stored (dry runs store none).
    pub records: u64,
    /// Records refused for size or shape (dry runs not counted).
    pub rejected: u64,
    /// Collect requests answered by an injected fault or dropped.
    pub faulted: u64,
}

/// A registered query as `GET /api/query` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueryInfo {
    /// The query's alias.
    pub alias: String,
    /// The stream it maps.
    pub from: String,
    /// The LQL text it was registered with.
    pub text: String,
}

/// The emulator; cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("account_id", &self.inner.account_id)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    api_token: String,
    account_id: String,
    /// More accepted token → account pairs, added at run time.
    credentials: Mutex<HashMap<String, String>>,
    /// Events cap per stream; a field rather than the constant so tests can use a small one.
    max_events: usize,
    /// Counts accepted records without storing them or building profiles (see [`Emulator::sink`]).
    sink: bool,
    /// Streams and profiles share one lock so a reset clears both at once.
    data: Mutex<Data>,
    queries: Mutex<Queries>,
    faults: Mutex<Faults>,
    stats: Counters,
}

#[derive(Default)]
struct Data {
    streams: HashMap<String, VecDeque<StoredEvent>>,
    profiles: ProfileStore,
}

#[derive(Default)]
struct Queries {
    by_alias: BTreeMap<String, Arc<CompiledQuery>>,
    /// Rebuilt on registration so that each collect request only clones an `Arc`.
    by_stream: HashMap<String, Arc<[Arc<CompiledQuery>]>>,
}

#[derive(Default)]
struct Counters {
    collect_requests: AtomicU64,
    records: AtomicU64,
    rejected: AtomicU64,
    faulted: AtomicU64,
}

/// Marks a request whose faults `serve` already applied, so the handler does not apply them
/// a second time.
#[derive(Debug, Clone, Copy)]
struct FaultsApplied;

/// The error that makes hyper close a connection without answering: an emulated drop.
#[derive(Debug, thiserror::Error)]
#[error("emulated fault: connection dropped")]
struct ConnectionDropped;

/// Locks a mutex, carrying on after a panic elsewhere: every critical section leaves the
/// state consistent, so a poisoned lock holds nothing half-written.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How one stored record updates profiles.
enum Update {
    /// The update the stream's queries computed, then the record's other fields by these
    /// identities (as Lytics' own query for a stream maps what custom queries do not).
    Computed(ProfileUpdate, Vec<(String, String)>),
    /// Every field of the record, by these identities (a stream without queries).
    CopyAll(Vec<(String, String)>),
}

impl Emulator {
    /// Creates an emulator with the given token, account and streams, empty and fault-free.
    pub fn new(config: EmulatorConfig) -> Self {
        Self::with_max_events(config, MAX_EVENTS_PER_STREAM)
    }

    /// Creates an emulator that keeps at most `max_events` events per stream (at least one).
    pub fn with_max_events(config: EmulatorConfig, max_events: usize) -> Self {
        Self::build(config, max_events, false)
    }

    /// Creates an emulator for load tests that only count what arrives: collect requests get
    /// every check and answer of the full emulator (auth, account, stream, body shape, record
    /// size limits, faults), and the records are counted in [`Emulator::stats`], but neither
    /// stored nor applied to profiles. Lytics does that work on its own machines; an emulator
    /// sharing the relay's cores would otherwise charge it to the relay.
    pub fn sink(config: EmulatorConfig) -> Self {
        Self::build(config, 1, true)
    }

    fn build(config: EmulatorConfig, max_events: usize, sink: bool) -> Self {
        let streams = config.streams.into_iter().map(|s| (s, VecDeque::new())).collect();
        Emulator {
            inner: Arc::new(Inner {
                api_token: config.api_token,
                account_id: config.account_id,
                credentials: Mutex::new(HashMap::new()),
                max_events: max_events.max(1),
                sink,
                data: Mutex::new(Data {
                    streams,
                    profiles: ProfileStore::default(),
                }),
                queries: Mutex::new(Queries::default()),
                faults: Mutex::new(Faults::default()),
                stats: Counters::default(),
            }),
        }
    }

    /// All routes, Lytics' and `/_emulator/*`. Served this way a drop fault cannot close the
    /// connection, so it is answered 502 instead: use [`Emulator::serve`] for real drops.
    pub fn router(&self) -> axum::Router {
        routes::router(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then stops accepting, lets open
    /// connections finish their requests for up to five seconds, and returns. Collect
    /// requests chosen to be dropped have their connection closed with no response at all
    /// (over HTTP/2, which multiplexes, hyper resets the request's stream instead).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        let builder = auto::Builder::new(TokioExecutor::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                // Reaping finished connections keeps the set from growing without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(
                            self.clone(),
                            router.clone(),
                            builder.clone(),
                            stream,
                            stop_rx.clone(),
                        ));
                    }
                    Err(error) => {
                        // Accept errors (such as running out of descriptors) pass; back off
                        // briefly so the loop does not spin on them.
                        tracing::warn!(%error, "emulator failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        // A send error only means no connection is listening, which is fine.
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = connections.len(),
                "emulator shutdown grace period elapsed, closing remaining connections"
            );
            connections.abort_all();
        }
        Ok(())
    }

    /// Replaces the fault settings; rates are clamped to 0..=1.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.inner.faults) = faults.clamped();
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        *lock(&self.inner.faults)
    }

    /// The events a stream holds, oldest first (empty for an unknown stream).
    pub fn stream_events(&self, stream: &str) -> Vec<StoredEvent> {
        lock(&self.inner.data)
            .streams
            .get(stream)
            .map(|events| events.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The newest `limit` events of a stream, newest first (`limit` 0 means all), or `None`
    /// for an unknown stream.
    fn recent_events(&self, stream: &str, limit: usize) -> Option<Vec<StoredEvent>> {
        let data = lock(&self.inner.data);
        let events = data.streams.get(stream)?;
        let take = if limit == 0 { events.len() } else { limit };
        Some(events.iter().rev().take(take).cloned().collect())
    }

    /// The merged profile found by an identity (or any field) value, as the entity API
    /// renders its `data`.
    pub fn profile(&self, field: &str, value: &str) -> Option<Map<String, Value>> {
        lock(&self.inner.data).profiles.find(field, value)
    }

    /// Creates stream `name` if it does not exist yet; returns whether it was created.
    pub fn add_stream(&self, name: &str) -> bool {
        let mut data = lock(&self.inner.data);
        if data.streams.contains_key(name) {
            return false;
        }
        data.streams.insert(name.to_string(), VecDeque::new());
        true
    }

    /// Parses and registers a query; it maps records of its stream received from now on.
    /// A query with the same alias is replaced.
    pub fn register_lql(&self, text: &str) -> Result<LqlQuery, LqlError> {
        let query = parse_lql(text)?;
        let compiled = Arc::new(CompiledQuery::new(query.clone(), text));
        let mut queries = lock(&self.inner.queries);
        let previous = queries
            .by_alias
            .insert(query.alias.clone(), compiled)
            .map(|q| q.query.from.clone());
        let mut touched = vec![query.from.clone()];
        touched.extend(previous);
        for stream in touched {
            let list: Vec<Arc<CompiledQuery>> = queries
                .by_alias
                .values()
                .filter(|q| q.query.from == stream)
                .cloned()
                .collect();
            if list.is_empty() {
                queries.by_stream.remove(&stream);
            } else {
                queries.by_stream.insert(stream, list.into());
            }
        }
        Ok(query)
    }

    /// The registered queries, by alias.
    pub fn queries(&self) -> Vec<QueryInfo> {
        lock(&self.inner.queries)
            .by_alias
            .values()
            .map(|q| QueryInfo {
                alias: q.query.alias.clone(),
                from: q.query.from.clone(),
                text: q.text.clone(),
            })
            .collect()
    }

    /// Counters since start or the last reset.
    pub fn stats(&self) -> EmulatorStats {
        let stats = &self.inner.stats;
        EmulatorStats {
            collect_requests: stats.collect_requests.load(Ordering::Relaxed),
            records: stats.records.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            faulted: stats.faulted.load(Ordering::Relaxed),
        }
    }

    /// Empties every stream, forgets every profile and zeroes the counters; streams, queries
    /// and faults stay.
    pub fn reset(&self) {
        let mut data = lock(&self.inner.data);
        for events in data.streams.values_mut() {
            events.clear();
        }
        data.profiles = ProfileStore::default();
        let stats = &self.inner.stats;
        for counter in [
            &stats.collect_requests,
            &stats.records,
            &stats.rejected,
            &stats.faulted,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// Accepts another token, for another account (as a Lytics instance serves many).
    pub fn add_credentials(&self, api_token: &str, account_id: &str) {
        lock(&self.inner.credentials).insert(api_token.to_string(), account_id.to_string());
    }

    fn token_matches(&self, token: &str) -> bool {
        token == self.inner.api_token || lock(&self.inner.credentials).contains_key(token)
    }

    fn account_matches(&self, account_id: &str) -> bool {
        account_id == self.inner.account_id || lock(&self.inner.credentials).values().any(|a| a == account_id)
    }

    fn has_stream(&self, stream: &str) -> bool {
        lock(&self.inner.data).streams.contains_key(stream)
    }

    /// Counts a collect request and draws its fault; returns the latency to add first.
    fn begin_collect(&self) -> (Duration, FaultAction) {
        let faults = self.faults();
        let stats = &self.inner.stats;
        stats.collect_requests.fetch_add(1, Ordering::Relaxed);
        let mut rng = rand::rng();
        let action = faults::decide(&faults, &mut rng);
        let (delay_ms, slow) = faults::delay_ms(&faults, &mut rng);
        if action != FaultAction::Pass || slow {
            stats.faulted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?action, slow, "emulator injected a fault");
        }
        (Duration::from_millis(delay_ms), action)
    }

    /// Whether this emulator only counts records (see [`Emulator::sink`]).
    fn is_sink(&self) -> bool {
        self.inner.sink
    }

    /// Counts records accepted and refused (stored or not).
    fn count(&self, accepted: usize, rejected: usize) {
        let stats = &self.inner.stats;
        stats.rejected.fetch_add(rejected as u64, Ordering::Relaxed);
        stats.records.fetch_add(accepted as u64, Ordering::Relaxed);
    }

    /// Stores accepted records in a stream and applies them to profiles. The profile updates
    /// are computed before taking the lock, so the critical section only appends and merges.
    fn ingest(&self, stream: &str, accepted: Vec<Accepted>, rejected: usize, received_at: DateTime<Utc>) {
        if accepted.is_empty() {
            self.count(0, rejected);
            return;
        }
        let queries = lock(&self.inner.queries).by_stream.get(stream).cloned();
        // The fields the stream's queries select merge as they declare; every other field is
        // copied latest-wins, as on a stream without queries (Lytics keeps its own generated
        // query for a stream beside custom ones). Copied fields are read in place under the
        // lock (only the identities are computed here).
        let declared: Vec<String> = queries
            .iter()
            .flat_map(|qs| qs.iter().flat_map(|q| q.field_names().map(str::to_string)))
            .collect();
        let updates: Vec<_> = accepted
            .iter()
            .map(|a| match &queries {
                Some(queries) => Update::Computed(
                    mapping::query_update(queries, &a.record, a.event_time_ms),
                    mapping::default_ids(&a.record),
                ),
                None => Update::CopyAll(mapping::default_ids(&a.record)),
            })
            .collect();
        let accepted_n = accepted.len();
        let mut data = lock(&self.inner.data);
        let Data { streams, profiles } = &mut *data;
        // The stream exists unless it vanished since the handler checked, which cannot happen
        // today (streams are never removed); the records are then kept anyway.
        let events = match streams.get_mut(stream) {
            Some(events) => events,
            None => streams.entry(stream.to_string()).or_default(),
        };
        for (a, update) in accepted.into_iter().zip(updates) {
            match update {
                Update::Computed(update, ids) => {
                    profiles.apply(update);
                    profiles.apply_record_except(ids, &a.record, a.event_time_ms, &declared);
                }
                Update::CopyAll(ids) => profiles.apply_record(ids, &a.record, a.event_time_ms),
            }
            if events.len() >= self.inner.max_events {
                events.pop_front();
            }
            events.push_back(StoredEvent {
                received_at,
                event_time_ms: a.event_time_ms,
                record: a.record,
            });
        }
        drop(data);
        self.count(accepted_n, rejected);
    }

    /// Handles one request of a served connection: collect requests get their faults here,
    /// where a drop can still close the connection, and everything goes on to the router.
    async fn handle(
        self,
        router: axum::Router,
        mut request: http::Request<Incoming>,
    ) -> Result<http::Response<Body>, ConnectionDropped> {
        if request.method() == http::Method::POST && request.uri().path().starts_with("/collect/") {
            let (latency, action) = self.begin_collect();
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            match action {
                FaultAction::Pass => {}
                FaultAction::Drop => return Err(ConnectionDropped),
                other => return Ok(routes::fault_response(other)),
            }
            request.extensions_mut().insert(FaultsApplied);
        }
        let Ok(response) = router.oneshot(request.map(Body::new)).await;
        Ok(response)
    }
}

/// Serves one accepted connection until it ends, or shuts it down gracefully on `stop`.
async fn serve_connection(
    emulator: Emulator,
    router: axum::Router,
    builder: auto::Builder<TokioExecutor>,
    stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) {
    // Small JSON answers must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| emulator.clone().handle(router.clone(), request));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "emulator connection ended with an error");
            }
        }
        // The watch guard is dropped inside the block, as it must not live across an await.
        _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
            connection.as_mut().graceful_shutdown();
            if let Err(error) = connection.await {
                tracing::debug!(%error, "emulator connection ended with an error during shutdown");
            }
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
mod tests {
    use super::*;

    fn emulator_with_cap(cap: usize) -> Emulator {
        Emulator::with_max_events(
            EmulatorConfig {
                api_token: "t".into(),
                account_id: "a".into(),
                streams: vec!["s".into()],
            },
            cap,
        )
    }

    fn accepted(n: i64) -> Accepted {
        let mut record = Map::new();
        record.insert("n".into(), Value::from(n));
        record.insert("user_id".into(), Value::from("u"));
        Accepted {
            record,
            event_time_ms: n,
        }
    }

    #[test]
    fn debug_output_masks_the_token() {
        let config = EmulatorConfig {
            api_token: "secret-token".into(),
            account_id: "a".into(),
            streams: vec![],
        };
        assert!(!format!("{config:?}").contains("secret-token"));
    }

    #[test]
    fn streams_keep_at_most_the_cap_dropping_the_oldest() {
        let emu = emulator_with_cap(3);
        emu.ingest("s", (1..=5).map(accepted).collect(), 0, Utc::now());
        let kept: Vec<i64> = emu.stream_events("s").iter().map(|e| e.event_time_ms).collect();
        assert_eq!(kept, [3, 4, 5]);
        // Dropped events still shaped the profile: the latest value came from record 5.
        let profile = emu.profile("user_id", "u").expect("profile");
        assert_eq!(profile["n"], Value::from(5));
        assert_eq!(emu.stats().records, 5);
    }

    #[test]
    fn registering_an_alias_again_replaces_the_query_and_its_stream() {
        let emu = emulator_with_cap(10);
        emu.register_lql("SELECT a AS a FROM s INTO user BY user_id ALIAS q")
            .expect("valid");
        emu.register_lql("SELECT b AS b FROM other INTO user BY user_id ALIAS q")
            .expect("valid");
        let queries = emu.queries();
        assert_eq!(queries.len(), 1);
        assert_eq!(queries[0].from, "other");
        // Stream `s` has no query any more, so its records are copied whole.
        emu.ingest("s", vec![accepted(1)], 0, Utc::now());
        let profile = emu.profile("user_id", "u").expect("profile");
        assert!(profile.contains_key("n"));
    }

    #[test]
    fn reset_clears_data_and_counters_but_keeps_streams_and_queries() {
        let emu = emulator_with_cap(10);
        emu.register_lql("SELECT n AS n FROM s INTO user BY user_id ALIAS q")
            .expect("valid");
        emu.ingest("s", vec![accepted(1)], 2, Utc::now());
        assert_eq!(emu.stats().rejected, 2);
        emu.reset();
        assert!(emu.stream_events("s").is_empty());
        assert!(emu.has_stream("s"));
        assert_eq!(emu.profile("user_id", "u"), None);
        assert_eq!(emu.stats(), EmulatorStats::default());
        assert_eq!(emu.queries().len(), 1);
    }
}
