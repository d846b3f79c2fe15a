//! The command line: subcommands and flags, each flag also settable by a `LYTICS_RELAY_*`
//! environment variable. Parsing only; [`crate::config`] validates.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A gRPC/HTTP relay that maps Signal events and Customer.io webhooks to Lytics with YAML rules.
#[derive(Debug, Parser)]
#[command(name = "lytics-relay", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (gRPC and HTTP); without a Lytics integration it starts the built-in
    /// emulator and delivers there.
    Serve(Box<ServeArgs>),
    /// Run the Lytics emulator alone.
    Emulator(EmulatorArgs),
    /// Work with rule files.
    #[command(subcommand)]
    Rules(RulesCommand),
}

/// Flags of `serve`. Unset flags fall back to the config file, then to defaults. Values are
/// taken as text and checked with the config file's (`Settings::build`), so every problem of
/// flags, variables and file is reported at once.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "LYTICS_RELAY_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// HTTP listen address [default: 127.0.0.1:8084].
    #[arg(long, env = "LYTICS_RELAY_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Directory for the relay's state [default: ./data].
    #[arg(long, env = "LYTICS_RELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Rule file or directory [default: ./rules, else the rules built into the binary].
    #[arg(long, env = "LYTICS_RELAY_RULES")]
    pub rules: Option<PathBuf>,
    /// Reload the rules when their files change [default: true]; SIGHUP and
    /// `RulesService/Reload` always work.
    #[arg(long, env = "LYTICS_RELAY_RULES_WATCH")]
    pub rules_watch: Option<String>,
    /// A YAML config file (see README); flags and environment variables override it.
    #[arg(long, env = "LYTICS_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Lytics API token (with data write permission).
    #[arg(long, env = "LYTICS_RELAY_LYTICS_API_TOKEN", hide_env_values = true)]
    pub lytics_api_token: Option<String>,
    /// Lytics account id (Account > Account Settings).
    #[arg(long, env = "LYTICS_RELAY_LYTICS_ACCOUNT_ID")]
    pub lytics_account_id: Option<String>,
    /// Lytics data stream name, exactly as shown in Data > Data Streams (case-sensitive).
    #[arg(long, env = "LYTICS_RELAY_LYTICS_STREAM")]
    pub lytics_stream: Option<String>,
    /// Lytics API base URL [default: https://api.lytics.io].
    #[arg(long, env = "LYTICS_RELAY_LYTICS_URL", hide_env_values = true)]
    pub lytics_url: Option<String>,
    /// Address of the built-in emulator started when no Lytics integration is configured
    /// [default: 127.0.0.1:8085].
    #[arg(long, env = "LYTICS_RELAY_EMULATOR_ADDR")]
    pub emulator_addr: Option<String>,
    /// Secret of Signal HTTP ingestion signatures (`X-Signature`); `/v1/events` and
    /// `/v1/batch` refuse requests until it is set.
    #[arg(long, env = "LYTICS_RELAY_SIGNAL_SECRET", hide_env_values = true)]
    pub signal_secret: Option<String>,
    /// Customer.io reporting-webhook signing key; `/v1/webhooks/customerio` refuses requests
    /// until it is set.
    #[arg(long, env = "LYTICS_RELAY_CUSTOMERIO_SIGNING_KEY", hide_env_values = true)]
    pub customerio_signing_key: Option<String>,
    /// The admin API's bearer token [default: generated at first start, stored in the data
    /// directory and printed once].
    #[arg(long, env = "LYTICS_RELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// NATS server URL(s) of a shared JetStream queue, comma-separated for a cluster
    /// (`nats://host:4222`); selects the `nats` queue backend.
    #[arg(
        long,
        env = "LYTICS_RELAY_QUEUE_URL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub queue_url: Vec<String>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "LYTICS_RELAY_QUEUE_CREDS")]
    pub queue_creds: Option<PathBuf>,
    /// NATS user (with --queue-password).
    #[arg(long, env = "LYTICS_RELAY_QUEUE_USER")]
    pub queue_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "LYTICS_RELAY_QUEUE_PASSWORD", hide_env_values = true)]
    pub queue_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "LYTICS_RELAY_QUEUE_TOKEN", hide_env_values = true)]
    pub queue_token: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "LYTICS_RELAY_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// Flags of `emulator`.
#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Listen address.
    #[arg(long, env = "LYTICS_RELAY_EMULATOR_ADDR", default_value = "127.0.0.1:8085")]
    pub addr: SocketAddr,
    /// The API token the emulator accepts.
    #[arg(
        long,
        env = "LYTICS_RELAY_EMULATOR_API_TOKEN",
        default_value = "emulator-token",
        hide_env_values = true
    )]
    pub api_token: String,
    /// The account id the emulator accepts.
    #[arg(long, default_value = "1234")]
    pub account_id: String,
    /// A stream the emulator knows (repeatable; case-sensitive).
    #[arg(long = "stream", default_values_t = vec!["datafly_events".to_string(), "customerio_events".to_string()])]
    pub streams: Vec<String>,
    /// Events kept per stream for reading back; older ones are dropped first (profiles and
    /// counters keep their effect). A load test that only counts records can keep this small.
    #[arg(long, default_value_t = crate::emulator::MAX_EVENTS_PER_STREAM, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_events_per_stream: usize,
    /// Count collected records without storing them or building profiles: for load tests
    /// that share the relay's machine. Collect requests are checked and answered as usual.
    #[arg(long)]
    pub sink: bool,
}

/// `rules` subcommands.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Compile rule files and report every problem; exits 1 when there is any.
    Check {
        /// Rule file or directory [default: ./rules].
        path: Option<PathBuf>,
    },
    /// Run the test cases kept beside the rules; exits 1 when one fails.
    Test {
        /// Rule file or directory [default: ./rules].
        path: Option<PathBuf>,
    },
    /// Print the LQL query that makes Lytics merge the rules' user fields as they declare;
    /// with `--push`, register it in a Lytics account (`POST /api/query`).
    Lql(LqlArgs),
}

/// Flags of `rules lql`.
#[derive(Debug, Args)]
pub struct LqlArgs {
    /// Rule file or directory [default: ./rules].
    pub path: Option<PathBuf>,
    /// Post the queries to Lytics instead of only printing them.
    #[arg(long)]
    pub push: bool,
    /// Lytics API base URL.
    #[arg(
        long,
        env = "LYTICS_RELAY_LYTICS_URL",
        hide_env_values = true,
        default_value = "https://api.lytics.io"
    )]
    pub lytics_url: String,
    /// Lytics API token (needed with --push).
    #[arg(long, env = "LYTICS_RELAY_LYTICS_API_TOKEN", hide_env_values = true)]
    pub lytics_api_token: Option<String>,
    /// Lytics account id (needed with --push).
    #[arg(long, env = "LYTICS_RELAY_LYTICS_ACCOUNT_ID")]
    pub lytics_account_id: Option<String>,
    /// The integration's data stream: what a rule file without `stream:` writes to, and so
    /// what its query reads (needed when such a file declares merged fields).
    #[arg(long, env = "LYTICS_RELAY_LYTICS_STREAM")]
    pub lytics_stream: Option<String>,
}
