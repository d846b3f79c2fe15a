//! The `lytics-relay` binary: parse the command line, set up logging and tracing, run.

use std::process::ExitCode;

use clap::Parser;
use lytics_relay::cli::{Cli, Command, RulesCommand};
use lytics_relay::config::Settings;
use lytics_relay::emulator::{Emulator, EmulatorConfig};
use lytics_relay::{app, rules, telemetry};

/// Exit code for a configuration problem (EX_CONFIG is 78; linkerd and sysexits use 64 for usage).
const EXIT_CONFIG: u8 = 64;

/// mimalloc: the ingest path makes many small, short-lived allocations on every worker thread,
/// where glibc malloc contends on its arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Emulator(args) => emulator(args).await,
            Command::Rules(cmd) => rules_command(cmd).await,
        }
    })
}

async fn serve(args: lytics_relay::cli::ServeArgs) -> ExitCode {
    let settings = match Settings::load(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log_json = settings.log_json;
    telemetry::init_logging(log_json);
    // Installed before anything is served, so a signal at any moment after start-up shuts the
    // relay down gracefully instead of killing it.
    let shutdown = shutdown_signal();
    let result = async {
        let telemetry =
            telemetry::Telemetry::from_env(settings.call_span_queue, settings.ingest_sample_ratio)?;
        let listeners = app::Listeners::bind(&settings).await?;
        app::run(settings, listeners, telemetry, shutdown).await
    }
    .await;
    match result {
        Ok(report) if report.graceful => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(2),
        // Said once: as a JSON line where the log is JSON (for whatever reads it), else plainly.
        Err(e) if log_json => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn emulator(args: lytics_relay::cli::EmulatorArgs) -> ExitCode {
    telemetry::init_logging(false);
    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %args.addr, account = %args.account_id, streams = ?args.streams, sink = args.sink, "Lytics emulator serving");
    let config = EmulatorConfig {
        api_token: args.api_token,
        account_id: args.account_id,
        streams: args.streams,
    };
    let emulator = if args.sink {
        Emulator::sink(config)
    } else {
        Emulator::with_max_events(config, args.max_events_per_stream)
    };
    match emulator.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn rules_command(cmd: RulesCommand) -> ExitCode {
    match cmd {
        RulesCommand::Check { path } => {
            let path = path.unwrap_or_else(|| "rules".into());
            match rules::RuleSet::load(&path) {
                Ok(set) => {
                    let n: usize = set.files().iter().map(|f| f.rules.len()).sum();
                    println!(
                        "ok: {} rule(s) in {} file(s), version {}",
                        n,
                        set.files().len(),
                        set.version()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        RulesCommand::Lql(args) => lql_command(args).await,
        RulesCommand::Test { path } => {
            let path = path.unwrap_or_else(|| "rules".into());
            match rules::RuleSet::load(&path) {
                Ok(set) => {
                    let report = rules::cases::run_all(&set);
                    print!("{}", report.render());
                    if report.failed() == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn lql_command(args: lytics_relay::cli::LqlArgs) -> ExitCode {
    let path = args.path.clone().unwrap_or_else(|| "rules".into());
    let set = match rules::RuleSet::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // A file without `stream:` writes to the integration's stream, which only the caller knows.
    let unplaced: Vec<&str> = set
        .files()
        .iter()
        .filter(|f| {
            f.rules
                .iter()
                .any(|r| r.stream.is_none() && r.fields.iter().any(|x| x.merge.is_some()))
        })
        .map(|f| &*f.file)
        .collect();
    let default_stream = match (&args.lytics_stream, unplaced.is_empty()) {
        (Some(s), _) => s.as_str(),
        (None, true) => "",
        (None, false) => {
            eprintln!(
                "error: rules merging user fields without a `stream:` (in {}) write to the \
                 integration's stream: give it with --lytics-stream (LYTICS_RELAY_LYTICS_STREAM), \
                 or set `stream:` in the file",
                unplaced.join(", ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let queries = rules::lql::queries(set.files(), default_stream);
    if queries.is_empty() {
        eprintln!(
            "no rule in `{}` declares a merged user field (`merge:`)",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    if !args.push {
        for q in &queries {
            println!("-- from {}\n{}", q.file, q.text);
        }
        return ExitCode::SUCCESS;
    }
    let (Some(token), Some(account)) = (args.lytics_api_token, args.lytics_account_id) else {
        eprintln!(
            "error: --push needs --lytics-api-token and --lytics-account-id (or their LYTICS_RELAY_* variables)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let client = match lytics_relay::lytics::LyticsClient::new(std::time::Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = lytics_relay::integration::Secret::new(token);
    for q in &queries {
        match client
            .push_query(&args.lytics_url, &token, &account, &q.text)
            .await
        {
            Ok(()) => println!("pushed query `{}` from {}", q.alias, q.file),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers =
            signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
        async move {
            match handlers {
                Ok((mut term, mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
