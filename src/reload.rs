//! Rule reloads: compile to the side, run the rule files' test cases, swap atomically only if
//! everything passes; otherwise keep serving the running set and report why.
//!
//! Input: triggers — a debounced file watch on the rules directory, SIGHUP, and the
//! `RulesService/Reload` call. Output: a new set in [`LiveRules`], and a [`ReloadStatus`] for
//! health, admin and metrics. Start-up loads rules through the same [`load`] function. Events
//! in flight are never affected: each ingest call holds the set it started with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::rules::{LiveRules, RuleSet, RulesError, cases};
use crate::timefmt::now_ms;

/// How long file events are gathered before one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Where rules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesSource {
    /// A file or directory, reloadable.
    Path(PathBuf),
    /// The rules built into the binary.
    Embedded,
}

impl RulesSource {
    /// The given path, else `./rules` when it exists, else the built-in rules.
    pub fn resolve(path: Option<&Path>) -> Self {
        match path {
            Some(p) => RulesSource::Path(p.to_path_buf()),
            None if Path::new("rules").is_dir() => RulesSource::Path(PathBuf::from("rules")),
            None => RulesSource::Embedded,
        }
    }
}

/// Compiles the rules of `source` and runs their test cases; `Err` lists every problem.
pub fn load(source: &RulesSource) -> Result<RuleSet, Vec<String>> {
    let set = match source {
        RulesSource::Path(p) => RuleSet::load(p),
        RulesSource::Embedded => RuleSet::embedded(),
    }
    .map_err(|e| match e {
        RulesError::Invalid(problems) => problems.iter().map(|p| p.to_string()).collect(),
        other => vec![other.to_string()],
    })?;
    if *source == RulesSource::Embedded {
        // The built-in rules' cases ran when the binary was tested; their input files are not
        // beside the binary.
        return Ok(set);
    }
    let report = cases::run_all(&set);
    if report.failed() > 0 {
        return Err(report
            .results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| {
                format!(
                    "{}: test case `{}` failed: {}",
                    r.file,
                    r.name,
                    r.detail.replace('\n', "; ")
                )
            })
            .collect());
    }
    Ok(set)
}

/// What health and admin show about the rules.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct ReloadStatus {
    /// The version in force.
    pub version: String,
    /// When it was put in force (unix ms).
    pub loaded_ms: i64,
    /// Successful reloads since start.
    pub reloads: u64,
    /// Refused reloads since start.
    pub failures: u64,
    /// Why the last refused reload was refused (cleared by the next success).
    pub last_error: Vec<String>,
}

/// The outcome of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// A new set is in force.
    pub swapped: bool,
    /// The version in force now.
    pub version: String,
    /// The version before.
    pub previous_version: String,
    /// Why the reload was refused.
    pub problems: Vec<String>,
    /// Test cases that ran.
    pub test_cases: usize,
}

/// Reloads the live rules.
#[derive(Clone)]
pub struct Reloader {
    live: LiveRules,
    source: RulesSource,
    status: Arc<Mutex<ReloadStatus>>,
    attempts: Arc<AtomicU64>,
    /// Counts swaps in `rule_reloads_total`, when wired.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Told of each set put in force, when wired.
    on_swap: Option<OnSwap>,
}

/// What a [`Reloader`] tells of each rule set it puts in force.
pub type OnSwap = Arc<dyn Fn(&RuleSet) + Send + Sync>;

impl Reloader {
    /// Wraps the live set loaded from `source`.
    pub fn new(live: LiveRules, source: RulesSource) -> Self {
        let status = ReloadStatus {
            version: live.current().version().to_string(),
            loaded_ms: now_ms(),
            ..Default::default()
        };
        Reloader {
            live,
            source,
            status: Arc::new(Mutex::new(status)),
            attempts: Arc::default(),
            metrics: None,
            on_swap: None,
        }
    }

    /// Tells `f` of each rule set a reload puts in force (the built-in emulator fits its
    /// streams and queries to it).
    pub fn on_swap(mut self, f: OnSwap) -> Self {
        self.on_swap = Some(f);
        self
    }

    /// Counts each swap in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The status.
    pub fn status(&self) -> ReloadStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live set.
    pub fn live(&self) -> &LiveRules {
        &self.live
    }

    /// Where the rules come from.
    pub fn source(&self) -> &RulesSource {
        &self.source
    }

    /// Reloads now; `trigger` names the cause in the log.
    pub async fn reload(&self, trigger: &str) -> ReloadOutcome {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let previous = self.live.current().version().to_string();
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&source))
            .await
            .unwrap_or_else(|e| Err(vec![format!("the reload task failed: {e}")]));
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok(set) => {
                let version = set.version().to_string();
                let test_cases = set.specs().iter().map(|(_, _, s)| s.tests.len()).sum();
                let swapped = version != previous;
                if swapped {
                    if let Some(f) = &self.on_swap {
                        f(&set);
                    }
                    self.live.swap(set);
                    status.version = version.clone();
                    status.loaded_ms = now_ms();
                    status.reloads += 1;
                    if let Some(m) = &self.metrics {
                        m.rule_reloaded();
                    }
                    tracing::info!(trigger, version = %version, previous = %previous, "rules reloaded");
                } else if self.source == RulesSource::Embedded {
                    tracing::info!(
                        trigger,
                        version = %version,
                        "rules unchanged: they are built into the binary (start with --rules DIR to edit and reload them)"
                    );
                } else {
                    tracing::info!(trigger, version = %version, "rules unchanged: nothing to swap");
                }
                status.last_error.clear();
                ReloadOutcome {
                    swapped,
                    version,
                    previous_version: previous,
                    problems: Vec::new(),
                    test_cases,
                }
            }
            Err(problems) => {
                status.failures += 1;
                status.last_error = problems.clone();
                tracing::error!(trigger, version = %previous, problems = %problems.join("\n"), "rules reload refused; the running rules stay in force");
                ReloadOutcome {
                    swapped: false,
                    version: previous.clone(),
                    previous_version: previous,
                    problems,
                    test_cases: 0,
                }
            }
        }
    }

    /// Reloads on SIGHUP and, when `watch` is set and the rules are a path, on file changes
    /// (debounced), until `shutdown`.
    pub async fn run(self, watch: bool, shutdown: CancellationToken) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let _watcher = match (&self.source, watch) {
            (RulesSource::Path(p), true) => match watch_path(p, tx.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, path = %p.display(), "cannot watch the rules; reload with SIGHUP or RulesService/Reload");
                    None
                }
            },
            _ => None,
        };
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup => {
                    self.reload("SIGHUP").await;
                }
                Some(()) = rx.recv() => {
                    // Editors write in several steps: gather them, then reload once.
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    self.reload("file change").await;
                }
            }
        }
    }
}

fn watch_path(path: &Path, tx: tokio::sync::mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && matches!(
                e.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
            && e.paths
                .iter()
                .any(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(path, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
