//! Wiring: builds every stage from validated settings, serves until told to stop, then shuts
//! down in a fixed order and reports whether that was graceful.
//!
//! Start-up: rules (a broken rule file stops start-up) → the emulator when no Lytics integration
//! is configured → queue → ingest → delivery → gRPC and HTTP servers. Shutdown: health goes
//! NOT_SERVING → ingest refuses new events → the servers stop accepting and finish their calls →
//! delivery drains the queue within the grace period → spans are flushed.

use std::future::Future;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::admin::AdminToken;
use crate::admin::dead_letters::DeadLetters;
use crate::admin::grpc::AdminGrpc;
use crate::admin::integrations::IntegrationAdmin;
use crate::admin::rules::RulesAdmin;
use crate::admin::store::{IntegrationStore, NatsIntegrationStore, SqliteIntegrationStore};
use crate::config::{self, QueueBackend, Settings};
use crate::delivery::{Delivery, ProbeReporter};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::ingest::Ingest;
use crate::ingress::grpc::IngestGrpc;
use crate::ingress::http::{self, HttpState};
use crate::integration::{AccountId, Integration, IntegrationId, Integrations, Secret, StreamName};
use crate::live::LiveBus;
use crate::live::grpc::LiveEventsGrpc;
use crate::metrics::{Metrics, MetricsState};
use crate::monitor::Monitor;
use crate::proto::servers::admin_service_server::AdminServiceServer;
use crate::proto::servers::dead_letter_service_server::DeadLetterServiceServer;
use crate::proto::servers::ingest_service_server::IngestServiceServer;
use crate::proto::servers::live_events_service_server::LiveEventsServiceServer;
use crate::proto::servers::rules_service_server::RulesServiceServer;
use crate::queue::{MemoryQueue, NatsQueue, Queue, SqliteQueue};
use crate::reload::{self, Reloader, RulesSource};
use crate::rules::LiveRules;
use crate::telemetry::Telemetry;

/// The largest gRPC message accepted (a batch of events).
pub const MAX_GRPC_MESSAGE: usize = 16 * 1024 * 1024;
/// HTTP/2 flow-control windows of the gRPC port, in bytes (see where the server is built).
const GRPC_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
const GRPC_STREAM_WINDOW: u32 = 256 * 1024;
/// How long past the grace period delivery may take to cut off its calls before it is stopped.
const DELIVERY_STOP_MARGIN: Duration = Duration::from_secs(1);

/// The id of the integration built from settings (flags, environment, config file).
pub const DEFAULT_INTEGRATION: &str = crate::integration::CONFIGURED_ID;

/// The sockets the relay serves on, bound before start-up so tests can use port 0.
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// HTTP.
    pub http: TcpListener,
    /// The built-in emulator, when no Lytics integration is configured.
    pub emulator: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `settings`.
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for {what} on {addr}"))
        };
        Ok(Listeners {
            grpc: bind(settings.grpc_addr, "gRPC").await?,
            http: bind(settings.http_addr, "HTTP").await?,
            emulator: match settings.lytics {
                None => Some(bind(settings.emulator_addr, "the Lytics emulator").await?),
                Some(_) => None,
            },
        })
    }
}

/// How the relay stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Every call in flight finished and the queue drained within the grace period.
    pub graceful: bool,
}

/// Fits the built-in emulator to the rules: creates every stream they name (a rule's own
/// `stream:` would otherwise be answered 404, pausing the whole integration), and registers
/// their LQL so its profiles merge user fields exactly as the rules declare (as `rules lql
/// --push` does for a real account). Runs at start and after every reload.
fn fit_emulator_to_rules(emulator: &Emulator, rules: &crate::rules::RuleSet) {
    for file in rules.files() {
        // A rule's stream is its own or, without one, its file's.
        for stream in file.rules.iter().filter_map(|r| r.stream.as_deref()) {
            if emulator.add_stream(stream) {
                tracing::info!(stream, file = %file.file, "the built-in emulator now has the stream the rules name");
            }
        }
    }
    for q in crate::rules::lql::queries(rules.files(), config::EMULATOR_STREAM) {
        match emulator.register_lql(&q.text) {
            Ok(_) => tracing::info!(alias = %q.alias, "registered the rules' LQL in the emulator"),
            Err(e) => {
                tracing::warn!(alias = %q.alias, error = %e, "cannot register the rules' LQL in the emulator")
            }
        }
    }
}

/// The file in the data directory a running relay holds locked.
pub const LOCK_FILE: &str = "relay.lock";

/// Takes the data directory's lock, or says which process holds it.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "the data directory `{}` is in use by another running relay{}: two relays on one \
                 data directory would deliver each other's records twice and lose some; give each \
                 its own --data-dir (or share a NATS queue, see docs/scaling.md)",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (process {holder})")
                }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock `{}`", path.display()));
        }
    }
    // The holder's pid, for the message above; the lock, not the text, is what counts.
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Runs the relay until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<Report> {
    // The data directory holds queued events (personal data) and the admin token: one the
    // relay creates is the owner's only, as the files in it are.
    if !settings.data_dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.data_dir)
            .with_context(|| {
                format!(
                    "cannot create the data directory `{}`",
                    settings.data_dir.display()
                )
            })?;
    }
    // One relay per data directory: two would each take the other's queued records for their
    // own, deliver them twice and delete records they did not write. Held until `run` returns.
    let _data_dir_lock = lock_data_dir(&settings.data_dir)?;
    // Start-up loads rules the way a reload does: compiled, test cases run, or refused.
    let rules_source = RulesSource::resolve(settings.rules.as_deref());
    let rules = reload::load(&rules_source).map_err(|problems| {
        anyhow::anyhow!(
            "the rules cannot be used ({} problem(s)):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    })?;
    tracing::info!(version = %rules.version(), files = rules.files().len(), source = ?rules_source, "rules loaded");
    let live_rules = LiveRules::new(rules);
    let metrics = Arc::new(Metrics::new());
    let mut reloader = Reloader::new(live_rules.clone(), rules_source).with_metrics(metrics.clone());

    let stop_emulator = CancellationToken::new();
    let mut emulator_task = None;
    let mut own_emulator: Option<(Emulator, String)> = None;
    let integration = match (&settings.lytics, listeners.emulator) {
        (Some(l), _) => Integration {
            id: IntegrationId::new(DEFAULT_INTEGRATION)?,
            name: "Lytics".into(),
            account_id: l.account_id.clone(),
            stream_name: l.stream.clone(),
            api_token: l.api_token.clone(),
            base_url: l.url.clone(),
            enabled: true,
        },
        (None, Some(listener)) => {
            let addr = listener.local_addr()?;
            let emulator = Emulator::new(EmulatorConfig {
                api_token: config::EMULATOR_TOKEN.into(),
                account_id: config::EMULATOR_ACCOUNT.into(),
                streams: vec![config::EMULATOR_STREAM.into(), "customerio_events".into()],
            });
            own_emulator = Some((emulator.clone(), format!("http://{addr}")));
            let stop = stop_emulator.clone();
            emulator_task = Some(tokio::spawn(
                emulator
                    .clone()
                    .serve(listener, async move { stop.cancelled().await }),
            ));
            tracing::info!(
                emulator = %format!("http://{addr}"),
                "no Lytics integration given by flags, environment or config file: the built-in Lytics emulator runs, and \
                 delivers as the default integration (account {}, stream {}) unless integrations installed over the admin API \
                 replace it; set --lytics-api-token, --lytics-account-id and --lytics-stream (or LYTICS_RELAY_LYTICS_*) to deliver to Lytics",
                config::EMULATOR_ACCOUNT,
                config::EMULATOR_STREAM
            );
            fit_emulator_to_rules(&emulator, &live_rules.current());
            reloader = reloader.on_swap({
                let emulator = emulator.clone();
                Arc::new(move |rules: &crate::rules::RuleSet| fit_emulator_to_rules(&emulator, rules))
            });
            Integration {
                id: IntegrationId::new(crate::integration::EMULATOR_ID)?,
                name: "Lytics (built-in emulator)".into(),
                account_id: AccountId::new(config::EMULATOR_ACCOUNT)?,
                stream_name: StreamName::new(config::EMULATOR_STREAM)?,
                api_token: Secret::new(config::EMULATOR_TOKEN),
                base_url: format!("http://{addr}"),
                enabled: true,
            }
        }
        (None, None) => anyhow::bail!("no Lytics integration configured and no emulator listener"),
    };
    let integrations = Integrations::new(vec![integration.clone()]);

    // With NATS, installed integrations live there too, so every replica delivers the same set.
    let mut nats_client = None;
    let queue: Arc<dyn Queue> = match settings.queue_backend {
        QueueBackend::Embedded => {
            let path = settings.data_dir.join("queue.sqlite3");
            let q = SqliteQueue::open(&path, settings.queue_capacity, settings.dedup())?;
            tracing::info!(path = %path.display(), records = q.depth(), "durable queue opened; undelivered records resume");
            Arc::new(q)
        }
        QueueBackend::Memory => Arc::new(MemoryQueue::new(settings.queue_capacity, settings.dedup())),
        QueueBackend::Nats => {
            let q = NatsQueue::connect(&settings.nats, settings.queue_capacity, settings.dedup_window)
                .await
                .with_context(|| {
                    format!(
                        "cannot open the NATS queue at `{}`; check that the servers run with JetStream (-js) and the credentials",
                        settings.nats.urls.join(",")
                    )
                })?;
            tracing::info!(urls = %settings.nats.urls.join(","), records = q.depth(), "NATS JetStream queue opened; shared with every relay on these servers");
            nats_client = Some(q.client());
            Arc::new(q)
        }
    };
    // Ingest and delivery report every event and record here: counted in metrics, and
    // published to watchers of the live bus (which never slows them).
    let live = LiveBus::new(settings.live_buffer);
    let monitor = Monitor::new(live.clone(), metrics.clone());
    let ingest = Ingest::new(live_rules, integrations.clone(), queue.clone(), telemetry.clone())
        .with_monitor(monitor.clone());
    let delivery = Delivery::new(
        queue.clone(),
        integrations.clone(),
        telemetry.clone(),
        settings.delivery.clone(),
    )
    .map_err(anyhow::Error::msg)?
    .with_monitor(monitor.clone());
    let delivery_state = delivery.state();

    // Installed integrations persist beside the queue; the live set is rebuilt from them.
    let store: Arc<dyn IntegrationStore> = match nats_client {
        Some(client) => Arc::new(
            NatsIntegrationStore::open(client, settings.nats.replicas)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        None => Arc::new(
            SqliteIntegrationStore::open(&settings.data_dir.join("integrations.sqlite3"))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
    };
    let install_url = settings
        .lytics_url
        .clone()
        .or_else(|| own_emulator.as_ref().map(|(_, url)| url.clone()))
        .unwrap_or_else(|| config::LYTICS_URL.to_string());
    let integration_admin = IntegrationAdmin::start(
        store,
        integrations.clone(),
        delivery_state.clone(),
        Some(integration),
        settings.lytics.is_none(),
        install_url,
        own_emulator.map(|(e, _)| e),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot load installed integrations: {}", e.message))?
    .with_probe_reporter(ProbeReporter {
        telemetry: telemetry.clone(),
        monitor: monitor.clone(),
    });
    let stop_follower = CancellationToken::new();
    let follower_task = tokio::spawn(integration_admin.clone().follow(stop_follower.clone()));
    let stop_delivery = CancellationToken::new();
    let delivery_task = tokio::spawn(delivery.run(stop_delivery.clone(), settings.shutdown_grace));

    let (admin_token, created) = AdminToken::load_or_create(settings.admin_token.clone(), &settings.data_dir)
        .with_context(|| {
            format!(
                "cannot store the admin token in `{}`",
                settings.data_dir.display()
            )
        })?;
    if created {
        let file = settings.data_dir.join(crate::admin::TOKEN_FILE);
        // Shown once to a person at a terminal; the log (stderr under a service manager, or
        // JSON lines) never carries secrets, so there it names the file only.
        if std::io::stderr().is_terminal() && !settings.log_json {
            eprintln!(
                "admin token (stored in {}, shown only now): {}",
                file.display(),
                admin_token.secret().expose()
            );
        } else {
            tracing::info!(file = %file.display(), "admin token created; read it from its file (owner-only)");
        }
    }
    let rules_admin = RulesAdmin::new(reloader.clone(), integrations.clone(), settings.max_event_bytes);
    let rules_service = tonic::service::interceptor::InterceptedService::new(
        RulesServiceServer::new(rules_admin.clone()),
        admin_token.interceptor(),
    );
    let stop_reloader = CancellationToken::new();
    let reloader_task = tokio::spawn(reloader.clone().run(settings.rules_watch, stop_reloader.clone()));
    let admin_service = tonic::service::interceptor::InterceptedService::new(
        AdminServiceServer::new(AdminGrpc::new(integration_admin.clone())),
        admin_token.interceptor(),
    );
    let dead_letter_service = tonic::service::interceptor::InterceptedService::new(
        DeadLetterServiceServer::new(
            DeadLetters::new(queue.clone())
                .with_integrations(integrations.clone())
                .with_rules(ingest.rules().clone()),
        ),
        admin_token.interceptor(),
    );
    let live_service = tonic::service::interceptor::InterceptedService::new(
        LiveEventsServiceServer::new(LiveEventsGrpc::new(live.clone())),
        admin_token.interceptor(),
    );

    let health = tonic_health::server::HealthReporter::new();
    let health_service = tonic_health::server::HealthService::from_health_reporter(health.clone());
    health.set_serving::<IngestServiceServer<IngestGrpc>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    let stop_fault_watch = CancellationToken::new();
    let fault_watch_task = tokio::spawn(report_queue_fault(
        {
            let queue = queue.clone();
            move || (queue.fault(), queue.connected())
        },
        health.clone(),
        stop_fault_watch.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let ingest_service = IngestServiceServer::new(IngestGrpc::new(
        ingest.clone(),
        settings.max_event_bytes,
        settings.max_batch_events,
    ))
    .max_decoding_message_size(MAX_GRPC_MESSAGE);

    let stop_servers = CancellationToken::new();
    let grpc_addr = listeners.grpc.local_addr()?;
    let grpc_task = {
        let stop = stop_servers.clone();
        // Replies are small HTTP/2 frames: without TCP_NODELAY, Nagle holds one back until the
        // previous is acknowledged (tonic sets it only on listeners it binds itself).
        let incoming = TcpListenerStream::new(listeners.grpc).map(|conn| {
            if let Ok(c) = &conn {
                let _ = c.set_nodelay(true);
            }
            conn
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                // h2 ends a connection (GOAWAY ENHANCE_YOUR_CALM) when small DATA frames waiting
                // to be read cost more than half the connection window: a client streaming
                // one-message frames (grpcurl, grpc-go) while a chunk commits got there with
                // hyper's 1 MiB stream windows. Streams get a quarter of that window each, so
                // what one stream can leave waiting stays under the connection's allowance;
                // a 100-event SendBatch (90 KB) still fits a window.
                .initial_connection_window_size(GRPC_CONNECTION_WINDOW)
                .initial_stream_window_size(GRPC_STREAM_WINDOW)
                .add_service(tonic_health::pb::health_server::HealthServer::new(
                    crate::ingress::health::EndingHealth::new(health_service, stop_servers.clone()),
                ))
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(ingest_service)
                .add_service(dead_letter_service)
                .add_service(admin_service)
                .add_service(rules_service)
                .add_service(live_service)
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        )
    };
    let serving = Arc::new(AtomicBool::new(true));
    let http_addr = listeners.http.local_addr()?;
    let http_task = {
        let stop = stop_servers.clone();
        let app = http::router(HttpState {
            ingest: ingest.clone(),
            delivery: delivery_state.clone(),
            queue: queue.clone(),
            serving: serving.clone(),
            signal_secret: settings.signal_secret.clone(),
            signal_tolerance: settings.signal_tolerance,
            customerio_key: settings.customerio_signing_key.clone(),
            customerio_tolerance: settings.customerio_tolerance,
            max_event_bytes: settings.max_event_bytes,
            max_batch_events: settings.max_batch_events,
            bodies: http::BodyBudget::new(settings.http_limits.body_budget_bytes),
            body_timeout: settings.http_limits.body_timeout,
        });
        let app = app.merge(crate::admin::http::router(
            integration_admin,
            rules_admin.clone(),
            admin_token.clone(),
        ));
        let app = app
            .merge(crate::live::web::router(crate::live::web::LiveWeb {
                bus: live.clone(),
                token: admin_token.clone(),
            }))
            .merge(crate::metrics::router(MetricsState {
                metrics,
                queue: queue.clone(),
                bus: live.clone(),
                delivery: delivery_state.clone(),
            }))
            .fallback(crate::error::no_route)
            .method_not_allowed_fallback(crate::error::wrong_method);
        tokio::spawn(crate::ingress::http_server::serve(
            listeners.http,
            app,
            settings.http_limits,
            stop,
        ))
    };
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "lytics-relay serving");

    shutdown.await;
    let started = Instant::now();
    tracing::info!("shutting down: health NOT_SERVING, refusing new events");
    // The queue watch no longer moves health: from here on it says NOT_SERVING.
    stop_fault_watch.cancel();
    let _ = fault_watch_task.await;
    serving.store(false, Ordering::SeqCst);
    health.set_not_serving::<IngestServiceServer<IngestGrpc>>().await;
    health.set_service_status("", ServingStatus::NotServing).await;
    ingest.close();
    // Open watches would hold the servers open: end them.
    live.close();
    stop_servers.cancel();
    // A durable queue keeps what is not delivered: delivery starts no new call and its calls
    // in flight get the grace period alongside the servers, so the whole shutdown fits in it.
    if queue.durable() {
        stop_delivery.cancel();
    }
    let servers_done = tokio::time::timeout(settings.shutdown_grace, async {
        let _ = grpc_task.await;
        let _ = http_task.await;
    })
    .await
    .is_ok();

    // A durable queue keeps what is left for the next start; the in-memory one loses it, so
    // delivery gets the rest of the grace period to empty it (a paused integration cannot).
    // A fifth of the period is kept for the calls in flight when the draining stops.
    let deadline = started + settings.shutdown_grace;
    let drain_until = started + settings.shutdown_grace * 4 / 5;
    while !queue.durable()
        && queue.depth() > 0
        && Instant::now() < drain_until
        && delivery_state.paused().is_empty()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_reloader.cancel();
    let _ = reloader_task.await;
    stop_follower.cancel();
    let _ = follower_task.await;
    stop_delivery.cancel();
    // Delivery bounds its calls by the grace period from when it is told to stop, and cuts off
    // the rest itself (their spans ended as cut off); a moment more is allowed for that. On a
    // durable queue it is told when the shutdown starts; the memory queue's, told once the
    // draining ends, is stopped from here at the deadline.
    let mut delivery_task = delivery_task;
    let delivery_done = match tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()) + DELIVERY_STOP_MARGIN,
        &mut delivery_task,
    )
    .await
    {
        Ok(done) => done.unwrap_or(false),
        Err(_) => {
            delivery_task.abort();
            let _ = delivery_task.await;
            false
        }
    };
    // What the memory queue still holds once delivery is done is lost with the process.
    let left = if queue.durable() { 0 } else { queue.depth() };
    stop_emulator.cancel();
    if let Some(t) = emulator_task {
        let _ = t.await;
    }
    // Flushing blocks on the exporters, which need the runtime: run it off the async threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    let graceful = servers_done && delivery_done && left == 0;
    if graceful {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shutdown complete: graceful"
        );
    } else {
        tracing::warn!(
            records_lost = left,
            servers_done,
            delivery_done,
            "shutdown complete: not graceful (calls cut off keep their records queued when the queue is durable)"
        );
    }
    Ok(Report { graceful })
}

/// Turns gRPC health to NOT_SERVING once the queue refuses everything until a restart (`fault`
/// says why), as `/healthz` does, so orchestrators probing either restart the relay. Checks
/// every second until `stop`; a fault is for good, so the watch then ends.
async fn report_queue_fault(
    queue: impl Fn() -> (Option<String>, bool),
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let (fault, connected) = queue();
        if let Some(why) = fault {
            tracing::error!(reason = %why, "health NOT_SERVING: the queue refuses every event until the relay restarts");
            health.set_not_serving::<IngestServiceServer<IngestGrpc>>().await;
            health.set_service_status("", ServingStatus::NotServing).await;
            return;
        }
        // A shared queue's server out of reach: events are refused until it returns, so a load
        // balancer should send them to a replica that still reaches it.
        if connected != reachable {
            reachable = connected;
            if connected {
                tracing::info!("the queue's store is reachable again: health SERVING");
                health.set_serving::<IngestServiceServer<IngestGrpc>>().await;
                health.set_service_status("", ServingStatus::Serving).await;
            } else {
                tracing::warn!(
                    "the queue's store is out of reach: health NOT_SERVING and events refused (UNAVAILABLE / 503) until it returns"
                );
                health.set_not_serving::<IngestServiceServer<IngestGrpc>>().await;
                health.set_service_status("", ServingStatus::NotServing).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_server::Health;

    use super::*;

    async fn status(service: &impl Health, name: &str) -> Status {
        let answer = service
            .check(tonic::Request::new(HealthCheckRequest { service: name.into() }))
            .await
            .unwrap();
        answer.into_inner().status()
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_health_stops_serving_once_the_queue_reports_a_fault() {
        let health = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(health.clone());
        health.set_serving::<IngestServiceServer<IngestGrpc>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        let fault = Arc::new(Mutex::new(None::<String>));
        let stop = CancellationToken::new();
        let watch = tokio::spawn(report_queue_fault(
            {
                let fault = fault.clone();
                move || (fault.lock().unwrap().clone(), true)
            },
            health,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(status(&service, "").await, Status::Serving);
        *fault.lock().unwrap() = Some("cannot sync the queue's log (EIO); restart the relay".into());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(status(&service, "").await, Status::NotServing);
        assert_eq!(
            status(&service, "lytics_relay.v1.IngestService").await,
            Status::NotServing
        );
        assert!(watch.is_finished(), "a fault is for good: the watch ends");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_health_follows_a_shared_queue_out_of_reach_and_back() {
        let health = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(health.clone());
        health.set_service_status("", ServingStatus::Serving).await;
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = CancellationToken::new();
        let watch = tokio::spawn(report_queue_fault(
            {
                let connected = connected.clone();
                move || (None, connected.load(Ordering::SeqCst))
            },
            health,
            stop.clone(),
        ));
        connected.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(status(&service, "").await, Status::NotServing);
        connected.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(status(&service, "").await, Status::Serving);
        stop.cancel();
        watch.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_fault_watch_ends_when_told_to() {
        let health = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(health.clone());
        health.set_service_status("", ServingStatus::Serving).await;
        let stop = CancellationToken::new();
        let watch = tokio::spawn(report_queue_fault(|| (None, true), health, stop.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        watch.await.unwrap();
        assert_eq!(status(&service, "").await, Status::Serving);
    }
}
