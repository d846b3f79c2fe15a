//! Configuration in two layers: a serde mirror of the YAML file ([`FileConfig`], unknown keys
//! refused), then a pure validation step ([`Settings::build`]) that merges flags, environment
//! and file, and reports every problem with its key and a fix hint before anything starts.
//! This module does no I/O except reading the config file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeArgs;
use crate::ingress::http_server::HttpLimits;
use crate::integration::{AccountId, Secret, StreamName};
use crate::queue::{Dedup, NatsOptions};

/// The Lytics API.
pub const LYTICS_URL: &str = "https://api.lytics.io";
/// The emulator's default token, account and stream (seed 000's example values).
pub const EMULATOR_TOKEN: &str = "emulator-token";
/// The emulator's default account.
pub const EMULATOR_ACCOUNT: &str = "1234";
/// The emulator's default stream.
pub const EMULATOR_STREAM: &str = "datafly_events";

/// The config file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// gRPC listen address.
    pub grpc_addr: Option<String>,
    /// HTTP listen address.
    pub http_addr: Option<String>,
    /// State directory.
    pub data_dir: Option<PathBuf>,
    /// Rule file or directory.
    pub rules: Option<PathBuf>,
    /// Reload the rules when their files change (default true).
    pub rules_watch: Option<bool>,
    /// Log format.
    pub log_format: Option<String>,
    /// Seconds shutdown waits for calls in flight and the queue to drain.
    pub shutdown_grace_secs: Option<u64>,
    /// The admin bearer token.
    pub admin_token: Option<String>,
    /// The Lytics integration.
    #[serde(default)]
    pub lytics: FileLytics,
    /// The built-in emulator.
    #[serde(default)]
    pub emulator: FileEmulator,
    /// Delivery tuning.
    #[serde(default)]
    pub delivery: FileDelivery,
    /// Request limits.
    #[serde(default)]
    pub limits: FileLimits,
    /// Queue settings.
    #[serde(default)]
    pub queue: FileQueue,
    /// Trace export tuning.
    #[serde(default)]
    pub telemetry: FileTelemetry,
    /// Signal HTTP ingestion.
    #[serde(default)]
    pub signal: FileSignal,
    /// Customer.io webhooks.
    #[serde(default)]
    pub customerio: FileCustomerIo,
}

/// `signal:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSignal {
    /// The HMAC secret of `X-Signature`.
    pub secret: Option<String>,
    /// How far `X-Timestamp` may be from now.
    pub tolerance_secs: Option<u64>,
}

/// `customerio:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCustomerIo {
    /// The webhook signing key.
    pub signing_key: Option<String>,
    /// How far `X-CIO-Timestamp` may be from now.
    pub tolerance_secs: Option<u64>,
}

/// `lytics:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLytics {
    /// API token.
    pub api_token: Option<String>,
    /// Account id.
    pub account_id: Option<String>,
    /// Stream name.
    pub stream: Option<String>,
    /// API base URL.
    pub url: Option<String>,
}

/// `emulator:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEmulator {
    /// Listen address of the zero-setup emulator.
    pub addr: Option<String>,
}

/// `delivery:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDelivery {
    /// Records per collect call.
    pub batch_max_records: Option<usize>,
    /// Bytes per collect call.
    pub batch_max_bytes: Option<usize>,
    /// How long a partial batch waits for more records.
    pub linger_ms: Option<u64>,
    /// Attempts before a record is dead-lettered.
    pub max_attempts: Option<u32>,
    /// Age after which a failing record is dead-lettered.
    pub max_retry_age_secs: Option<u64>,
    /// First backoff step.
    pub backoff_base_ms: Option<u64>,
    /// Largest backoff step.
    pub backoff_max_ms: Option<u64>,
    /// Timeout of one collect call.
    pub request_timeout_ms: Option<u64>,
    /// Collect calls in flight per integration.
    pub max_in_flight: Option<usize>,
    /// How often a paused integration is probed with a `dryrun` call.
    pub probe_interval_secs: Option<u64>,
}

/// `limits:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Largest accepted event, in bytes of JSON.
    pub max_event_bytes: Option<usize>,
    /// Most events in one batch request.
    pub max_batch_events: Option<usize>,
    /// The longest wait for an HTTP connection's first byte and a request's head, in seconds.
    pub http_head_timeout_secs: Option<u64>,
    /// The longest an HTTP request body may take to arrive, in seconds.
    pub http_body_timeout_secs: Option<u64>,
    /// HTTP request bodies held in memory at once, in bytes.
    pub http_body_budget_bytes: Option<usize>,
    /// HTTP connections open at once.
    pub http_max_connections: Option<usize>,
}

/// `queue:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQueue {
    /// Records the queue holds before ingest answers RESOURCE_EXHAUSTED / 429.
    pub capacity: Option<usize>,
    /// `embedded` (SQLite under the data dir, durable), `memory` (not durable) or `nats`
    /// (NATS JetStream, shared by several relays).
    pub backend: Option<String>,
    /// How long an event id is remembered to drop duplicates.
    pub dedup_window_secs: Option<u64>,
    /// The most event ids remembered (embedded and memory backends; ~25 bytes of memory each).
    pub dedup_max_ids: Option<usize>,
    /// NATS server URLs (`nats://host:port`), for `backend: nats`.
    pub urls: Option<Vec<String>>,
    /// A NATS credentials file.
    pub creds_file: Option<PathBuf>,
    /// A NATS user (with `password`).
    pub user: Option<String>,
    /// The NATS user's password.
    pub password: Option<String>,
    /// A NATS authentication token.
    pub token: Option<String>,
    /// JetStream stream replicas: 1, or 3 on a three-node cluster.
    pub replicas: Option<usize>,
    /// Seconds a leased record stays hidden from other relays without news from its holder.
    pub ack_wait_secs: Option<u64>,
    /// The longest a retry waits on the NATS server before a relay looks at it again (ms).
    pub retry_recheck_ms: Option<u64>,
}

/// `telemetry:` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTelemetry {
    /// Span queue size of the Lytics-call span exporter.
    pub call_span_queue: Option<usize>,
    /// Share of ingest spans exported (0.0–1.0) when the caller sent no sampled traceparent.
    pub ingest_sample_ratio: Option<f64>,
    /// Live events a watcher may fall behind by before it loses the oldest ones.
    pub live_buffer: Option<usize>,
}

/// Where queued records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueBackend {
    /// SQLite under the data directory: an acknowledged event survives crashes.
    Embedded,
    /// In memory: fast, but a restart loses what is queued.
    Memory,
    /// NATS JetStream: durable, and shared by every relay pointed at the same servers.
    Nats,
}

/// The Lytics integration given by flags, environment or file.
#[derive(Debug, Clone)]
pub struct LyticsSettings {
    /// The token.
    pub api_token: Secret,
    /// The account.
    pub account_id: AccountId,
    /// The stream.
    pub stream: StreamName,
    /// The API base URL.
    pub url: String,
}

/// Delivery tuning.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Records per collect call.
    pub batch_max_records: usize,
    /// Bytes per collect call.
    pub batch_max_bytes: usize,
    /// How long a partial batch waits for more records.
    pub linger: Duration,
    /// Attempts before a record is dead-lettered.
    pub max_attempts: u32,
    /// Age after which a failing record is dead-lettered.
    pub max_retry_age: Duration,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Largest backoff step.
    pub backoff_max: Duration,
    /// Timeout of one collect call.
    pub request_timeout: Duration,
    /// Collect calls in flight per integration.
    pub max_in_flight: usize,
    /// How often a paused integration is probed.
    pub probe_interval: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            batch_max_records: 1000,
            batch_max_bytes: 5 * 1024 * 1024,
            linger: Duration::from_millis(100),
            max_attempts: 5,
            max_retry_age: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(30),
            backoff_max: Duration::from_secs(6 * 3600),
            request_timeout: Duration::from_secs(30),
            max_in_flight: 4,
            probe_interval: Duration::from_secs(30),
        }
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// State directory.
    pub data_dir: PathBuf,
    /// Rule file or directory; `None` means the built-in rules.
    pub rules: Option<PathBuf>,
    /// Reload the rules when their files change.
    pub rules_watch: bool,
    /// Log format is JSON.
    pub log_json: bool,
    /// The Lytics integration; `None` starts the emulator.
    pub lytics: Option<LyticsSettings>,
    /// The Lytics URL when given explicitly; installed integrations deliver there (else to the
    /// built-in emulator when it runs, else to Lytics).
    pub lytics_url: Option<String>,
    /// Where the zero-setup emulator listens.
    pub emulator_addr: SocketAddr,
    /// Delivery tuning.
    pub delivery: DeliverySettings,
    /// Largest accepted event (bytes of JSON).
    pub max_event_bytes: usize,
    /// Most events in one batch request.
    pub max_batch_events: usize,
    /// The HTTP port's timeouts and budgets.
    pub http_limits: HttpLimits,
    /// Queue capacity in records.
    pub queue_capacity: usize,
    /// The queue backend.
    pub queue_backend: QueueBackend,
    /// How to reach NATS, for the `nats` backend.
    pub nats: NatsOptions,
    /// Span queue of the Lytics-call exporter.
    pub call_span_queue: usize,
    /// Ingest span sampling ratio.
    pub ingest_sample_ratio: f64,
    /// Live events a watcher may fall behind by before it loses the oldest ones.
    pub live_buffer: usize,
    /// How long shutdown waits for calls in flight and for the queue to drain.
    pub shutdown_grace: Duration,
    /// How long event ids are remembered to drop duplicates.
    pub dedup_window: Duration,
    /// The most event ids the embedded and memory queues remember.
    pub dedup_max_ids: usize,
    /// The Signal HTTP ingestion secret; without it `/v1/events` and `/v1/batch` refuse.
    pub signal_secret: Option<Secret>,
    /// How far a Signal `X-Timestamp` may be from now.
    pub signal_tolerance: Duration,
    /// The Customer.io signing key; without it the webhook endpoint refuses.
    pub customerio_signing_key: Option<Secret>,
    /// How far a Customer.io `X-CIO-Timestamp` may be from now.
    pub customerio_tolerance: Duration,
    /// The admin bearer token; generated and stored in the data directory when absent.
    pub admin_token: Option<Secret>,
}

impl Settings {
    /// Defaults for tests: loopback port 0 everywhere, built-in rules.
    pub fn for_tests(data_dir: &Path) -> Settings {
        let any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        Settings {
            grpc_addr: any,
            http_addr: any,
            data_dir: data_dir.to_path_buf(),
            rules: None,
            rules_watch: true,
            log_json: false,
            lytics: None,
            lytics_url: None,
            emulator_addr: any,
            delivery: DeliverySettings::default(),
            max_event_bytes: 32 * 1024,
            max_batch_events: 1000,
            http_limits: HttpLimits::default(),
            queue_capacity: 1_000_000,
            queue_backend: QueueBackend::Embedded,
            nats: NatsOptions::default(),
            call_span_queue: 65_536,
            ingest_sample_ratio: 0.01,
            live_buffer: crate::live::DEFAULT_BUFFER,
            shutdown_grace: Duration::from_secs(10),
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            dedup_max_ids: Dedup::DEFAULT_MAX_IDS,
            signal_secret: None,
            signal_tolerance: Duration::from_secs(300),
            customerio_signing_key: None,
            customerio_tolerance: Duration::from_secs(7 * 24 * 3600),
            admin_token: None,
        }
    }
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key: a flag / variable / file key.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl Settings {
    /// The dedup settings of the embedded and memory queues.
    pub fn dedup(&self) -> Dedup {
        Dedup {
            window: self.dedup_window,
            max_ids: self.dedup_max_ids,
        }
    }

    /// Merges flags/environment over the file over defaults and validates the result.
    pub fn build(args: &ServeArgs, file: FileConfig) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| {
            problems.push(ConfigProblem {
                key: key.to_string(),
                message,
            })
        };
        let mut addr = |key: &str, flag: Option<String>, file: Option<String>, default: &str| {
            let text = flag.or(file).unwrap_or_else(|| default.to_string());
            match text.parse() {
                Ok(a) => a,
                Err(_) => {
                    bad(
                        key,
                        format!(
                            "`{text}` is not an IP address and port (host names are not resolved \
                             here); write for example 127.0.0.1:8084, 0.0.0.0:8084 or [::1]:8084"
                        ),
                    );
                    SocketAddr::from(([127, 0, 0, 1], 0))
                }
            }
        };
        let grpc_addr = addr(
            "grpc_addr (--grpc-addr)",
            args.grpc_addr.clone(),
            file.grpc_addr,
            "127.0.0.1:50051",
        );
        let http_addr = addr(
            "http_addr (--http-addr)",
            args.http_addr.clone(),
            file.http_addr,
            "127.0.0.1:8084",
        );
        let emulator_addr = addr(
            "emulator.addr (--emulator-addr)",
            args.emulator_addr.clone(),
            file.emulator.addr,
            "127.0.0.1:8085",
        );
        let rules_watch = match args.rules_watch.as_deref() {
            None => file.rules_watch.unwrap_or(true),
            Some("true") => true,
            Some("false") => false,
            Some(other) => {
                bad(
                    "rules_watch (--rules-watch)",
                    format!("`{other}` is neither true nor false"),
                );
                true
            }
        };

        let log_format = args
            .log_format
            .clone()
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        let log_json = match log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                bad(
                    "log_format (--log-format)",
                    format!("unknown format `{other}`; use `text` or `json`"),
                );
                false
            }
        };

        // Surrounding whitespace (a token pasted from a file with its newline) is not the token.
        let token = args
            .lytics_api_token
            .clone()
            .or(file.lytics.api_token)
            .map(|t| t.trim().to_string());
        let account = args.lytics_account_id.clone().or(file.lytics.account_id);
        let stream = args.lytics_stream.clone().or(file.lytics.stream);
        let explicit_url = args
            .lytics_url
            .clone()
            .or(file.lytics.url)
            .map(|u| u.trim_end_matches('/').to_string());
        let url = explicit_url.clone().unwrap_or_else(|| LYTICS_URL.to_string());
        let scheme = url.split("://").next().unwrap_or_default().to_ascii_lowercase();
        if !(scheme == "http" || scheme == "https") || !url.contains("://") {
            bad(
                "lytics.url (--lytics-url)",
                format!("`{}` must start with http:// or https://", shown_url(&url)),
            );
        } else if let Some(problem) = url_secrets(&url) {
            bad(
                "lytics.url (--lytics-url)",
                format!(
                    "{problem}: the relay logs and traces its Lytics URL, so it must hold no \
                     secret; give the token as lytics.api_token (--lytics-api-token)"
                ),
            );
        }
        let lytics = match (token, account, stream) {
            (None, None, None) => None,
            (token, account, stream) => {
                let mut missing = Vec::new();
                if token.as_deref().is_none_or(str::is_empty) {
                    missing.push("lytics.api_token (--lytics-api-token / LYTICS_RELAY_LYTICS_API_TOKEN)");
                }
                if account.is_none() {
                    missing.push("lytics.account_id (--lytics-account-id / LYTICS_RELAY_LYTICS_ACCOUNT_ID)");
                }
                if stream.is_none() {
                    missing.push("lytics.stream (--lytics-stream / LYTICS_RELAY_LYTICS_STREAM)");
                }
                for m in &missing {
                    bad(m, "is required when any Lytics setting is given; set all three or none (none starts the built-in emulator)".into());
                }
                if let Some(t) = token.as_deref().filter(|t| !t.is_empty())
                    && let Err(e) = crate::integration::check_api_token(t)
                {
                    bad(
                        "lytics.api_token (--lytics-api-token / LYTICS_RELAY_LYTICS_API_TOKEN)",
                        e.into(),
                    );
                }
                let account = account.map(|a| AccountId::new(&a));
                let stream = stream.map(|s| StreamName::new(&s));
                if let Some(Err(e)) = &account {
                    bad("lytics.account_id", e.to_string());
                }
                if let Some(Err(e)) = &stream {
                    bad("lytics.stream", e.to_string());
                }
                match (token, account, stream) {
                    (Some(t), Some(Ok(a)), Some(Ok(s))) if !t.is_empty() => Some(LyticsSettings {
                        api_token: Secret::new(t),
                        account_id: a,
                        stream: s,
                        url: url.trim_end_matches('/').to_string(),
                    }),
                    _ => None,
                }
            }
        };

        let d = DeliverySettings::default();
        let fd = &file.delivery;
        let ms = Duration::from_millis;
        let delivery = DeliverySettings {
            batch_max_records: fd.batch_max_records.unwrap_or(d.batch_max_records),
            batch_max_bytes: fd.batch_max_bytes.unwrap_or(d.batch_max_bytes),
            linger: fd.linger_ms.map(ms).unwrap_or(d.linger),
            max_attempts: fd.max_attempts.unwrap_or(d.max_attempts),
            max_retry_age: fd
                .max_retry_age_secs
                .map(Duration::from_secs)
                .unwrap_or(d.max_retry_age),
            backoff_base: fd.backoff_base_ms.map(ms).unwrap_or(d.backoff_base),
            backoff_max: fd.backoff_max_ms.map(ms).unwrap_or(d.backoff_max),
            request_timeout: fd.request_timeout_ms.map(ms).unwrap_or(d.request_timeout),
            max_in_flight: fd.max_in_flight.unwrap_or(d.max_in_flight),
            probe_interval: fd
                .probe_interval_secs
                .map(Duration::from_secs)
                .unwrap_or(d.probe_interval),
        };
        if !(1..=10_000).contains(&delivery.batch_max_records) {
            bad("delivery.batch_max_records", "must be between 1 and 10000".into());
        }
        if !(16 * 1024..=10 * 1024 * 1024).contains(&delivery.batch_max_bytes) {
            bad(
                "delivery.batch_max_bytes",
                "must be between 16384 and 10485760 (Lytics caps a request at 10 MB)".into(),
            );
        }
        if delivery.max_attempts == 0 {
            bad("delivery.max_attempts", "must be at least 1".into());
        }
        if delivery.max_in_flight == 0 {
            bad("delivery.max_in_flight", "must be at least 1".into());
        }
        if delivery.backoff_base.is_zero() || delivery.backoff_max < delivery.backoff_base {
            bad(
                "delivery.backoff_base_ms",
                "must be positive and not above backoff_max_ms".into(),
            );
        }
        if delivery.request_timeout.is_zero() {
            bad("delivery.request_timeout_ms", "must be positive".into());
        }
        let max_event_bytes = file.limits.max_event_bytes.unwrap_or(32 * 1024);
        if !(1024..=4 * 1024 * 1024).contains(&max_event_bytes) {
            bad(
                "limits.max_event_bytes",
                "must be between 1024 and 4194304".into(),
            );
        }
        let max_batch_events = file.limits.max_batch_events.unwrap_or(1000);
        if !(1..=100_000).contains(&max_batch_events) {
            bad("limits.max_batch_events", "must be between 1 and 100000".into());
        }
        let http_limits = {
            let d = HttpLimits::default();
            let secs = |v: Option<u64>, d: Duration, key: &str, bad: &mut dyn FnMut(&str, String)| {
                let v = v.map_or(d, Duration::from_secs);
                if !(1..=3600).contains(&v.as_secs()) {
                    bad(key, "must be between 1 and 3600".into());
                }
                v
            };
            let head_timeout = secs(
                file.limits.http_head_timeout_secs,
                d.head_timeout,
                "limits.http_head_timeout_secs",
                &mut bad,
            );
            let body_timeout = secs(
                file.limits.http_body_timeout_secs,
                d.body_timeout,
                "limits.http_body_timeout_secs",
                &mut bad,
            );
            let body_budget_bytes = file.limits.http_body_budget_bytes.unwrap_or(d.body_budget_bytes);
            // The budget must hold the largest body a route takes: a batch.
            let largest = max_event_bytes
                .saturating_mul(max_batch_events)
                .min(crate::app::MAX_GRPC_MESSAGE);
            if body_budget_bytes < largest {
                bad(
                    "limits.http_body_budget_bytes",
                    format!("must hold at least the largest batch body ({largest} bytes)"),
                );
            }
            let max_connections = file.limits.http_max_connections.unwrap_or(d.max_connections);
            if max_connections == 0 {
                bad("limits.http_max_connections", "must be at least 1".into());
            }
            HttpLimits {
                head_timeout,
                body_timeout,
                body_budget_bytes,
                max_connections,
            }
        };
        let queue_capacity = file.queue.capacity.unwrap_or(1_000_000);
        if queue_capacity == 0 {
            bad("queue.capacity", "must be at least 1".into());
        }
        let dedup_max_ids = file.queue.dedup_max_ids.unwrap_or(Dedup::DEFAULT_MAX_IDS);
        if dedup_max_ids < 1_000 {
            bad(
                "queue.dedup_max_ids",
                "must be at least 1000 (each id takes about 25 bytes of memory)".into(),
            );
        }
        let fq = &file.queue;
        let urls: Vec<String> = if args.queue_url.is_empty() {
            fq.urls.clone().unwrap_or_default()
        } else {
            args.queue_url.clone()
        };
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let default_backend = if urls.is_empty() { "embedded" } else { "nats" };
        let queue_backend = match fq.backend.as_deref().unwrap_or(default_backend) {
            "embedded" => QueueBackend::Embedded,
            "memory" => QueueBackend::Memory,
            "nats" => QueueBackend::Nats,
            other => {
                bad(
                    "queue.backend",
                    format!("unknown backend `{other}`; use `embedded`, `memory` or `nats`"),
                );
                QueueBackend::Embedded
            }
        };
        if queue_backend == QueueBackend::Nats && urls.is_empty() {
            bad(
                "queue.urls (--queue-url / LYTICS_RELAY_QUEUE_URL)",
                "the nats backend needs at least one server URL, for example nats://127.0.0.1:4222".into(),
            );
        }
        if queue_backend != QueueBackend::Nats && !urls.is_empty() {
            bad(
                "queue.urls (--queue-url / LYTICS_RELAY_QUEUE_URL)",
                "server URLs are only used by `queue.backend: nats`; remove them or choose nats".into(),
            );
        }
        for u in &urls {
            let scheme = u.split("://").next().unwrap_or_default().to_ascii_lowercase();
            if !u.contains("://") || !["nats", "tls", "ws", "wss"].contains(&scheme.as_str()) {
                bad(
                    "queue.urls (--queue-url / LYTICS_RELAY_QUEUE_URL)",
                    format!(
                        "`{}` must start with nats://, tls://, ws:// or wss://",
                        shown_url(u)
                    ),
                );
            } else if let Some(problem) = url_secrets(u) {
                bad(
                    "queue.urls (--queue-url / LYTICS_RELAY_QUEUE_URL)",
                    format!(
                        "{problem}: server URLs are logged, so they must hold no secret; use \
                         queue.user and queue.password, queue.token or queue.creds_file"
                    ),
                );
            }
        }
        let user = args.queue_user.clone().or(fq.user.clone());
        let password = args.queue_password.clone().or(fq.password.clone());
        if user.is_some() != password.is_some() {
            bad(
                "queue.user / queue.password (--queue-user / --queue-password)",
                "give both the NATS user and its password, or neither".into(),
            );
        }
        let replicas = fq.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            bad(
                "queue.replicas",
                "must be between 1 and 5 (use 3 on a three-node cluster)".into(),
            );
        }
        let ack_wait = Duration::from_secs(fq.ack_wait_secs.unwrap_or(30));
        if ack_wait.is_zero() {
            bad("queue.ack_wait_secs", "must be at least 1".into());
        }
        let retry_recheck = Duration::from_millis(fq.retry_recheck_ms.unwrap_or(30_000));
        if retry_recheck < Duration::from_millis(100) {
            bad("queue.retry_recheck_ms", "must be at least 100".into());
        }
        let nats = NatsOptions {
            urls,
            creds_file: args.queue_creds.clone().or(fq.creds_file.clone()),
            user,
            password: password.map(Secret::new),
            token: args
                .queue_token
                .clone()
                .or(fq.token.clone())
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            replicas,
            ack_wait,
            retry_recheck,
        };
        let call_span_queue = file.telemetry.call_span_queue.unwrap_or(65_536);
        if call_span_queue < 64 {
            bad("telemetry.call_span_queue", "must be at least 64".into());
        }
        let ingest_sample_ratio = file.telemetry.ingest_sample_ratio.unwrap_or(0.01);
        if !(0.0..=1.0).contains(&ingest_sample_ratio) {
            bad(
                "telemetry.ingest_sample_ratio",
                "must be between 0.0 and 1.0".into(),
            );
        }
        let live_buffer = file.telemetry.live_buffer.unwrap_or(crate::live::DEFAULT_BUFFER);
        if !(1..=1_000_000).contains(&live_buffer) {
            bad("telemetry.live_buffer", "must be between 1 and 1000000".into());
        }

        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        Ok(Settings {
            grpc_addr,
            http_addr,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("data")),
            rules: args.rules.clone().or(file.rules),
            rules_watch,
            log_json,
            lytics,
            lytics_url: explicit_url,
            emulator_addr,
            delivery,
            max_event_bytes,
            max_batch_events,
            http_limits,
            queue_capacity,
            queue_backend,
            nats,
            call_span_queue,
            ingest_sample_ratio,
            live_buffer,
            shutdown_grace: Duration::from_secs(file.shutdown_grace_secs.unwrap_or(10)),
            dedup_window: Duration::from_secs(file.queue.dedup_window_secs.unwrap_or(7 * 24 * 3600)),
            dedup_max_ids,
            signal_secret: args
                .signal_secret
                .clone()
                .or(file.signal.secret)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            signal_tolerance: Duration::from_secs(file.signal.tolerance_secs.unwrap_or(300)),
            customerio_signing_key: args
                .customerio_signing_key
                .clone()
                .or(file.customerio.signing_key)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            customerio_tolerance: Duration::from_secs(
                file.customerio.tolerance_secs.unwrap_or(7 * 24 * 3600),
            ),
            admin_token: args
                .admin_token
                .clone()
                .or(file.admin_token)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
        })
    }

    /// Reads the config file named by `--config`, if any.
    pub fn load(args: &ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let problem = |message: String| {
                    ConfigError(vec![ConfigProblem {
                        key: format!("--config {}", path.display()),
                        message,
                    }])
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| problem(format!("cannot read the file: {e}")))?;
                let (file, mut problems) = match serde_yaml::from_str::<FileConfig>(&text) {
                    Ok(file) => (file, Vec::new()),
                    Err(first) => {
                        let (file, mut problems) =
                            parse_file(&text).map_err(|e| problem(format!("invalid config: {e}")))?;
                        // Alone, the problem keeps the position the whole-file reading gives.
                        if let [only] = problems.as_mut_slice() {
                            only.message = first.to_string();
                        }
                        (file, problems)
                    }
                };
                if !problems.is_empty() {
                    // The keys that fit are still checked, so every problem shows at once; a
                    // key left out is not reported again as missing.
                    if let Err(ConfigError(more)) = Self::build(args, file) {
                        let reported: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
                        problems.extend(
                            more.into_iter()
                                .filter(|p| !reported.iter().any(|k| p.key.starts_with(k.as_str()))),
                        );
                    }
                    return Err(ConfigError(problems));
                }
                file
            }
        };
        Self::build(args, file)
    }
}

/// Reads the config file's YAML. A key that does not fit (unknown, or a value of the wrong
/// type) is reported and left out rather than ending the reading, so the answer lists every such
/// key, with the settings made of the others; within a section (`delivery:`, `queue:`, …) each
/// key is judged on its own. `Err` only for text that is not YAML.
fn parse_file(text: &str) -> Result<(FileConfig, Vec<ConfigProblem>), serde_yaml::Error> {
    use serde_yaml::{Mapping, Value};
    let value: Value = serde_yaml::from_str(text)?;
    let top = match value {
        Value::Null => return Ok((FileConfig::default(), Vec::new())),
        Value::Mapping(m) => m,
        other => return serde_yaml::from_value(other).map(|f| (f, Vec::new())),
    };
    let fits = |k: &Value, v: Value| {
        serde_yaml::from_value::<FileConfig>(Value::Mapping(Mapping::from_iter([(k.clone(), v)])))
    };
    let name = |k: &Value| match k {
        Value::String(s) => s.clone(),
        other => format!("{other:?}"),
    };
    let mut problems = Vec::new();
    let mut kept = Mapping::new();
    for (k, v) in top {
        let Err(e) = fits(&k, v.clone()) else {
            kept.insert(k, v);
            continue;
        };
        match v {
            // A section that exists: judge its keys one by one.
            Value::Mapping(section) if fits(&k, Value::Mapping(Mapping::new())).is_ok() => {
                let mut good = Mapping::new();
                for (sk, sv) in section {
                    let one = Value::Mapping(Mapping::from_iter([(sk.clone(), sv.clone())]));
                    match fits(&k, one) {
                        Ok(_) => {
                            good.insert(sk, sv);
                        }
                        Err(e) => problems.push(ConfigProblem {
                            key: format!("{}.{}", name(&k), name(&sk)),
                            message: e.to_string(),
                        }),
                    }
                }
                kept.insert(k, Value::Mapping(good));
            }
            _ => problems.push(ConfigProblem {
                key: name(&k),
                message: e.to_string(),
            }),
        }
    }
    let file = serde_yaml::from_value(Value::Mapping(kept))?;
    Ok((file, problems))
}

/// What in a URL could be a secret (user and password, a query), if anything; said without
/// repeating it.
fn url_secrets(url: &str) -> Option<&'static str> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        // Unreadable, it would be shown whole in every delivery error: refused here.
        return Some("the URL cannot be read (host, port or characters)");
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        Some("the URL carries credentials (`user:password@`)")
    } else if parsed.query().is_some() || parsed.fragment().is_some() {
        Some("the URL carries a query (`?…`) or fragment (`#…`)")
    } else {
        None
    }
}

/// A URL as it may be shown in an error: without anything [`url_secrets`] would refuse.
fn shown_url(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    match without_query.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, path)) => format!(
                "{scheme}://{}/{path}",
                authority.rsplit('@').next().unwrap_or_default()
            ),
            None => format!("{scheme}://{}", rest.rsplit('@').next().unwrap_or_default()),
        },
        None => without_query.rsplit('@').next().unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_holding_secrets_are_refused_without_repeating_them() {
        let args = ServeArgs {
            lytics_url: Some("http://user:URLPASS@127.0.0.1:9/x?access_token=QTOKEN".into()),
            ..ServeArgs::default()
        };
        let file: FileConfig = serde_yaml::from_str(
            "queue: { backend: nats, urls: ['nats://natsuser:NATSPASS@127.0.0.1:4222', 'ftp://u:FTPPASS@h'] }",
        )
        .unwrap();
        let err = Settings::build(&args, file).unwrap_err();
        let text = err.to_string();
        for secret in ["URLPASS", "QTOKEN", "NATSPASS", "FTPPASS", "natsuser"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(
            text.contains("lytics.url (--lytics-url): the URL carries credentials"),
            "{text}"
        );
        assert!(
            text.contains("queue.urls (--queue-url / LYTICS_RELAY_QUEUE_URL): the URL carries credentials"),
            "{text}"
        );
        assert!(text.contains("`ftp://h` must start with nats://"), "{text}");
        let query = ServeArgs {
            lytics_url: Some("https://api.lytics.io?access_token=QTOKEN".into()),
            ..ServeArgs::default()
        };
        let text = Settings::build(&query, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("carries a query") && !text.contains("QTOKEN"),
            "{text}"
        );
        // A URL that cannot be read at all is refused too, without being repeated.
        for bad in [
            "https://user:SECRETD@[::1",
            "https://api.lytics.io:99999/?access_token=SECRETE",
        ] {
            let args = ServeArgs {
                lytics_url: Some(bad.into()),
                ..ServeArgs::default()
            };
            let text = Settings::build(&args, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(
                text.contains("cannot be read") && !text.contains("SECRET"),
                "{text}"
            );
        }
        // The scheme's case does not matter.
        let upper = ServeArgs {
            lytics_url: Some("HTTPS://api.lytics.io".into()),
            ..ServeArgs::default()
        };
        Settings::build(&upper, FileConfig::default()).unwrap();
    }

    #[test]
    fn a_token_that_cannot_travel_in_a_header_is_refused_and_whitespace_around_it_trimmed() {
        let args = |token: &str| ServeArgs {
            lytics_api_token: Some(token.into()),
            lytics_account_id: Some("1234".into()),
            lytics_stream: Some("s".into()),
            ..ServeArgs::default()
        };
        let text = Settings::build(&args("NL_TOKEN\nX"), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("lytics.api_token") && text.contains("control characters"),
            "{text}"
        );
        assert!(!text.contains("NL_TOKEN"), "{text}");
        let s = Settings::build(&args(" tok123\n"), FileConfig::default()).unwrap();
        assert_eq!(s.lytics.unwrap().api_token.expose(), "tok123");
    }

    #[test]
    fn defaults_start_the_emulator() {
        let s = Settings::build(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(s.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8084");
        assert_eq!(s.emulator_addr.to_string(), "127.0.0.1:8085");
        assert!(s.lytics.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let args = ServeArgs {
            lytics_account_id: Some("1234".into()),
            lytics_url: Some("ftp://x".into()),
            ..ServeArgs::default()
        };
        let file: FileConfig =
            serde_yaml::from_str("http_addr: nope\ndelivery: { batch_max_records: 0, max_attempts: 0 }\n")
                .unwrap();
        let err = Settings::build(&args, file).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.iter().any(|k| k.starts_with("http_addr")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("lytics.url")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("lytics.api_token")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("lytics.stream")), "{keys:?}");
        assert!(keys.contains(&"delivery.batch_max_records"), "{keys:?}");
        assert!(keys.contains(&"delivery.max_attempts"), "{keys:?}");
    }

    #[test]
    fn every_key_that_does_not_fit_the_file_is_reported_with_the_value_problems() {
        let text = "foo: 1\ngrpc_addr: nope\ndelivery: { max_attempts: -1, batch_max_records: 0, bar: 2 }\nqueue: { backend: sqlite }\n";
        let (file, problems) = parse_file(text).unwrap();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["foo", "delivery.max_attempts", "delivery.bar"]);
        assert!(
            problems[0].message.contains("unknown field `foo`"),
            "{problems:?}"
        );
        assert!(problems[1].message.contains("-1"), "{problems:?}");
        // What fits is kept, and checked.
        assert_eq!(file.delivery.batch_max_records, Some(0));
        let err = Settings::build(&ServeArgs::default(), file).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.iter().any(|k| k.starts_with("grpc_addr")), "{keys:?}");
        assert!(keys.contains(&"delivery.batch_max_records"), "{keys:?}");
        // Through `load`, all of them in one answer.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, text).unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        let err = Settings::load(&args).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "foo",
            "delivery.max_attempts",
            "delivery.bar",
            "queue.backend",
            "delivery.batch_max_records",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(keys.iter().any(|k| k.starts_with("grpc_addr")), "{keys:?}");
        // One problem alone keeps its position in the file; a key left out for its type is not
        // reported again as missing.
        std::fs::write(
            &path,
            "grpc_addr: 127.0.0.1:1\nqueue: { backend: nats, urls: 7 }\n",
        )
        .unwrap();
        let err = Settings::load(&args).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].key, "queue.urls");
        assert!(err.0[0].message.contains("line 2"), "{err}");
        // Not YAML at all: one problem.
        assert!(parse_file("a: [").is_err());
        assert_eq!(parse_file("").unwrap().1.len(), 0);
    }

    #[test]
    fn a_queue_url_selects_nats_and_a_nats_backend_needs_one() {
        let args = ServeArgs {
            queue_url: vec!["nats://127.0.0.1:4222".into(), "nats://127.0.0.1:4223".into()],
            ..ServeArgs::default()
        };
        let s = Settings::build(&args, FileConfig::default()).unwrap();
        assert_eq!(s.queue_backend, QueueBackend::Nats);
        assert_eq!(s.nats.urls.len(), 2);
        let file: FileConfig =
            serde_yaml::from_str("queue: { backend: nats, user: u, urls: ['http://x'] }").unwrap();
        let err = Settings::build(&ServeArgs::default(), file).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.iter().any(|k| k.starts_with("queue.urls")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("queue.user")), "{keys:?}");
        let file: FileConfig = serde_yaml::from_str("queue: { backend: nats }").unwrap();
        assert!(Settings::build(&ServeArgs::default(), file).is_err());
        assert_eq!(s.nats.retry_recheck, Duration::from_secs(30));
        let file: FileConfig = serde_yaml::from_str("queue: { retry_recheck_ms: 2000 }").unwrap();
        let recheck = Settings::build(&args, file).unwrap().nats.retry_recheck;
        assert_eq!(recheck, Duration::from_secs(2));
        let file: FileConfig = serde_yaml::from_str("queue: { retry_recheck_ms: 10 }").unwrap();
        let err = Settings::build(&args, file).unwrap_err();
        assert!(err.0.iter().any(|p| p.key == "queue.retry_recheck_ms"), "{err:?}");
    }

    #[test]
    fn the_dedup_bound_is_read_and_checked() {
        let s = Settings::build(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(s.dedup().max_ids, Dedup::DEFAULT_MAX_IDS);
        assert_eq!(s.dedup().window, Duration::from_secs(7 * 24 * 3600));
        let file: FileConfig =
            serde_yaml::from_str("queue: { dedup_max_ids: 50000000, dedup_window_secs: 86400 }").unwrap();
        let s = Settings::build(&ServeArgs::default(), file).unwrap();
        assert_eq!(
            s.dedup(),
            Dedup {
                window: Duration::from_secs(86400),
                max_ids: 50_000_000
            }
        );
        let file: FileConfig = serde_yaml::from_str("queue: { dedup_max_ids: 10 }").unwrap();
        let err = Settings::build(&ServeArgs::default(), file).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].key, "queue.dedup_max_ids");
        assert!(err.0[0].message.contains("at least 1000"), "{}", err.0[0].message);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(serde_yaml::from_str::<FileConfig>("grpc_adr: x").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let args = ServeArgs {
            lytics_api_token: Some("t".into()),
            lytics_account_id: Some("99".into()),
            lytics_stream: Some("Events".into()),
            ..ServeArgs::default()
        };
        let file: FileConfig = serde_yaml::from_str("lytics: { account_id: '1', url: 'http://x/' }").unwrap();
        let s = Settings::build(&args, file).unwrap();
        let l = s.lytics.unwrap();
        assert_eq!(l.account_id.as_str(), "99");
        assert_eq!(l.url, "http://x");
        assert_eq!(format!("{:?}", l.api_token), "***");
    }
}
