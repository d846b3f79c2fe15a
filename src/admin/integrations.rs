//! Installing and managing integrations: the operations behind both the HTTP and the gRPC admin
//! APIs, so the two always agree.
//!
//! Input: validated admin requests. Output: integration views (the token always masked), the
//! stored list, and the live set of integrations ingest and delivery use, rebuilt after every
//! change. A config change resumes a delivery paused by a setup error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::catalog::{self, ConfigInput};
use super::store::{IntegrationStore, StoreError, StoredIntegration};
use crate::delivery::{DeliveryState, ProbeFailure, ProbeReporter, probe};
use crate::emulator::Emulator;
use crate::error::{ApiError, ErrorCode, FieldViolation};
use crate::integration::{AccountId, Integration, IntegrationId, Integrations, Secret, StreamName};
use crate::lytics::LyticsClient;
use crate::timefmt::now_ms;

/// An install request (the seed's body).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallRequest {
    /// A display name.
    #[serde(default)]
    pub name: Option<String>,
    /// The variant (`default`).
    #[serde(default)]
    pub variant: Option<String>,
    /// The settings.
    #[serde(default)]
    pub config: ConfigInput,
    /// The delivery mode (`server_side`).
    #[serde(default)]
    pub delivery_mode: Option<String>,
    /// Run a `dryrun` collect call before installing; a failure refuses the install.
    #[serde(default)]
    pub test_connection: bool,
}

/// An update: only the given fields change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// A new name.
    #[serde(default)]
    pub name: Option<String>,
    /// New settings (rotate the token, change the stream or account).
    #[serde(default)]
    pub config: ConfigInput,
}

/// The masked config of a view.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigView {
    /// Always `***`.
    pub api_token: &'static str,
    /// The account id.
    pub account_id: String,
    /// The stream.
    pub stream_name: String,
}

/// An integration as answered: never with its token.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IntegrationView {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The catalog entry (`lytics`).
    pub integration: String,
    /// The variant.
    pub variant: String,
    /// The delivery mode.
    pub delivery_mode: String,
    /// The settings, token masked.
    pub config: ConfigView,
    /// `active`, `paused` (by an operator) or `setup_error`.
    pub status: String,
    /// Why it is not active, with the troubleshooting text.
    pub status_detail: Option<String>,
    /// `api` (installed) or `config` (from flags / config file; read-only here).
    pub managed_by: String,
    /// When it was installed (unix ms; 0 for config-managed).
    pub created_ms: i64,
    /// When it last changed (unix ms).
    pub updated_ms: i64,
}

/// One page of integrations.
#[derive(Debug, Clone, Serialize)]
pub struct IntegrationPage {
    /// The integrations.
    pub integrations: Vec<IntegrationView>,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
    /// Whether more follow.
    pub has_more: bool,
}

/// The result of a connection test.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectionTest {
    /// Whether Lytics accepted a `dryrun` call.
    pub ok: bool,
    /// The failure, with the seed's troubleshooting text.
    pub detail: Option<String>,
}

/// The admin operations on integrations.
#[derive(Clone)]
pub struct IntegrationAdmin {
    store: Arc<dyn IntegrationStore>,
    live: Integrations,
    delivery: Arc<DeliveryState>,
    /// The integration from flags / config file, or the zero-setup emulator default.
    configured: Option<Integration>,
    /// True when `configured` is the zero-setup default, which installed ones replace.
    configured_is_default: bool,
    /// Where installed integrations deliver: `--lytics-url`, or the built-in emulator.
    base_url: String,
    /// The relay's own emulator, which learns installed credentials so the seed's flow works
    /// end to end without Lytics.
    emulator: Option<Emulator>,
    client: LyticsClient,
    /// Where the connection tests' `dryrun` calls are reported.
    probe_reporter: ProbeReporter,
    /// Held by every change this relay makes to the stored list, from what it reads to what it
    /// writes, and while it puts a list changed elsewhere in force: two installs here for one
    /// stream cannot both pass the duplicate check, and two changes to one integration cannot
    /// undo each other. Relays sharing a NATS store do not lock each other out.
    changing: Arc<tokio::sync::Mutex<()>>,
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "integration store failed");
    ApiError::new(
        ErrorCode::Unavailable,
        "the integration store is unavailable; retry later",
    )
}

impl IntegrationAdmin {
    /// Loads the stored integrations and puts the live set in force.
    pub async fn start(
        store: Arc<dyn IntegrationStore>,
        live: Integrations,
        delivery: Arc<DeliveryState>,
        configured: Option<Integration>,
        configured_is_default: bool,
        base_url: String,
        emulator: Option<Emulator>,
    ) -> Result<Self, ApiError> {
        let client = LyticsClient::new(Duration::from_secs(10)).map_err(ApiError::internal)?;
        let admin = IntegrationAdmin {
            store,
            live,
            delivery,
            configured,
            configured_is_default,
            base_url,
            emulator,
            client,
            probe_reporter: ProbeReporter::detached(),
            changing: Arc::default(),
        };
        let stored = admin.store.list().await.map_err(store_error)?;
        for s in &stored {
            if s.paused {
                admin.delivery.pause_manual(&s.id);
            }
            if let Some(e) = &admin.emulator {
                e.add_credentials(&s.api_token, &s.account_id);
            }
        }
        admin.refresh(&stored);
        if !stored.is_empty() {
            let ids: Vec<&str> = stored.iter().map(|s| s.id.as_str()).collect();
            tracing::info!(
                integrations = ?ids,
                replaces_default = admin.configured_is_default,
                "integrations installed over the admin API are in force"
            );
        }
        Ok(admin)
    }

    /// Reports the connection tests' `dryrun` calls to `reporter` (a span and the calls metric
    /// each, as every Lytics call).
    pub fn with_probe_reporter(mut self, reporter: ProbeReporter) -> Self {
        self.probe_reporter = reporter;
        self
    }

    fn refresh(&self, stored: &[StoredIntegration]) {
        let mut list = Vec::new();
        if let Some(c) = &self.configured {
            if !self.configured_is_default || stored.is_empty() {
                list.push(c.clone());
            } else {
                // Replaced by installed ones: a pause of it (kept in memory only) goes with it,
                // or it would show in health and metrics, and hold a memory queue's drain at
                // shutdown, with no way left to resume it.
                self.delivery.resume(c.id.as_str());
            }
        }
        list.extend(stored.iter().filter_map(|s| match to_integration(s) {
            Ok(i) => Some(i),
            Err(e) => {
                // Stored before a check it fails was made (a token with a control character):
                // it cannot deliver; say so instead of dropping it silently.
                tracing::warn!(integration = %s.id, problem = %e.message, "an installed integration is not in force: fix it with PATCH /v1/admin/integrations/{{id}}");
                None
            }
        }));
        self.live.replace(list);
    }

    async fn reload(&self) -> Result<Vec<StoredIntegration>, ApiError> {
        let stored = self.store.list().await.map_err(store_error)?;
        self.refresh(&stored);
        Ok(stored)
    }

    /// Follows a shared store: each time any replica changes the stored list, puts it in force
    /// here too (the live set, operator pauses and resumes, and a resume of a setup-error pause
    /// when an integration's settings changed), until `stop`.
    pub async fn follow(self, stop: tokio_util::sync::CancellationToken) {
        let Some(mut changes) = self.store.changes() else {
            return;
        };
        let mut seen: HashMap<String, i64> = match self.store.list().await {
            Ok(l) => l.into_iter().map(|s| (s.id, s.updated_ms)).collect(),
            Err(_) => HashMap::new(),
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let _changing = self.changing.lock().await;
            match self.reload().await {
                Ok(stored) => self.apply(&stored, &mut seen),
                Err(e) => tracing::warn!(error = %e.message, "cannot follow the shared integration store"),
            }
        }
    }

    fn apply(&self, stored: &[StoredIntegration], seen: &mut HashMap<String, i64>) {
        let manual: HashSet<String> = self
            .delivery
            .paused()
            .into_iter()
            .filter(|(_, p)| p.manual)
            .map(|(id, _)| id)
            .collect();
        let mut now_seen = HashMap::new();
        for s in stored {
            if let Some(e) = &self.emulator {
                e.add_credentials(&s.api_token, &s.account_id);
            }
            let changed = seen.get(&s.id) != Some(&s.updated_ms);
            match seen.get(&s.id) {
                None => {
                    tracing::info!(integration = %s.id, stream = %s.stream_name, "integration installed (picked up from the shared store)")
                }
                Some(_) if changed => {
                    tracing::info!(integration = %s.id, stream = %s.stream_name, paused = s.paused, "integration changed (picked up from the shared store)")
                }
                Some(_) => {}
            }
            if s.paused {
                if !manual.contains(&s.id) {
                    self.delivery.pause_manual(&s.id);
                }
            } else if (changed || manual.contains(&s.id)) && self.delivery.resume(&s.id) {
                tracing::info!(integration = %s.id, "changed on another replica: delivery resumed");
            }
            now_seen.insert(s.id.clone(), s.updated_ms);
        }
        for gone in seen.keys().filter(|id| !now_seen.contains_key(*id)) {
            tracing::info!(integration = %gone, "integration uninstalled (picked up from the shared store)");
            self.delivery.resume(gone);
        }
        *seen = now_seen;
    }

    fn view_stored(&self, s: &StoredIntegration) -> IntegrationView {
        let (status, detail) = self.status(&s.id);
        IntegrationView {
            id: s.id.clone(),
            name: s.name.clone(),
            integration: s.kind.clone(),
            variant: s.variant.clone(),
            delivery_mode: s.delivery_mode.clone(),
            config: ConfigView {
                api_token: Secret::MASK,
                account_id: s.account_id.clone(),
                stream_name: s.stream_name.clone(),
            },
            status,
            status_detail: detail,
            managed_by: "api".into(),
            created_ms: s.created_ms,
            updated_ms: s.updated_ms,
        }
    }

    fn view_configured(&self, i: &Integration) -> IntegrationView {
        let (status, detail) = self.status(i.id.as_str());
        // The hint says to update the integration's config; this one is not changed here
        // (unless the stream at fault is a rule's own).
        let detail = match detail {
            Some(d) if status == "setup_error" && self.rule_stream_at_fault(i).is_none() => Some(format!(
                "{d} (this integration comes from the relay's configuration — flags, environment, \
                 config file — so change it there and restart)"
            )),
            d => d,
        };
        IntegrationView {
            id: i.id.to_string(),
            name: i.name.clone(),
            integration: catalog::LYTICS.into(),
            variant: "default".into(),
            delivery_mode: "server_side".into(),
            config: ConfigView {
                api_token: Secret::MASK,
                account_id: i.account_id.as_str().into(),
                stream_name: i.stream_name.as_str().into(),
            },
            status,
            status_detail: detail,
            managed_by: "config".into(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    /// The stream of a setup-error pause when a rule's own `stream:` named it, not the
    /// integration's `stream_name`: the fix is then in Lytics or the rules, not the integration.
    fn rule_stream_at_fault(&self, i: &Integration) -> Option<String> {
        let paused = self.delivery.paused();
        let p = paused.get(i.id.as_str()).filter(|p| !p.manual)?;
        p.stream.clone().filter(|s| s != i.stream_name.as_str())
    }

    fn status(&self, id: &str) -> (String, Option<String>) {
        match self.delivery.paused().get(id) {
            Some(p) if p.manual => ("paused".into(), Some(p.hint.clone())),
            Some(p) => {
                let own_stream = self.live.get(id).map(|i| i.stream_name.as_str().to_string());
                (
                    "setup_error".into(),
                    Some(match &p.stream {
                        // The fix is in Lytics or the rules, not in the integration.
                        Some(stream) if own_stream.is_some_and(|own| own != *stream) => format!(
                            "Lytics answered {} for stream `{stream}`, which a rule names \
                             (`stream:`), not the integration: create the stream in Lytics, or \
                             change the rule and reload the rules; then resume the integration",
                            p.status
                        ),
                        Some(stream) => {
                            format!("Lytics answered {} for stream `{stream}`: {}", p.status, p.hint)
                        }
                        None => format!("Lytics answered {}: {}", p.status, p.hint),
                    }),
                )
            }
            None => match self.delivery.outages().get(id) {
                Some(o) => (
                    "lytics_failing".into(),
                    Some(format!(
                        "{} calls in a row failed with a retryable error (Lytics down?); delivery probes one call at a time, the next not before {}; events stay queued",
                        o.failed_calls,
                        crate::timefmt::ms_to_rfc3339(o.hold_until_ms).unwrap_or_default()
                    )),
                ),
                None => ("active".into(), None),
            },
        }
    }

    /// Every integration in force, then paged by `cursor` (an id) and `limit`.
    pub async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<IntegrationPage, ApiError> {
        let stored = self.reload().await?;
        let live = self.live.snapshot();
        let mut all: Vec<IntegrationView> = Vec::new();
        if let Some(c) = &self.configured
            && live.iter().any(|i| i.id == c.id)
        {
            all.push(self.view_configured(c));
        }
        all.extend(stored.iter().map(|s| self.view_stored(s)));
        let start = match cursor {
            Some(c) => all
                .iter()
                .position(|v| v.id == c)
                .map(|p| p + 1)
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor this API issued"))?,
            None => 0,
        };
        let limit = limit.clamp(1, 500);
        let page: Vec<IntegrationView> = all.iter().skip(start).take(limit).cloned().collect();
        let has_more = start + page.len() < all.len();
        Ok(IntegrationPage {
            next_cursor: if has_more {
                page.last().map(|v| v.id.clone())
            } else {
                None
            },
            integrations: page,
            has_more,
        })
    }

    /// One integration.
    pub async fn get(&self, id: &str) -> Result<IntegrationView, ApiError> {
        if let Some(c) = &self.configured
            && c.id.as_str() == id
            && self.live.get(id).is_some()
        {
            return Ok(self.view_configured(c));
        }
        let s = self.stored(id).await?;
        Ok(self.view_stored(&s))
    }

    /// Installs an integration from the catalog entry `key`.
    pub async fn install(&self, key: &str, req: InstallRequest) -> Result<IntegrationView, ApiError> {
        let entry = catalog::entry(key).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no catalog entry `{key}`; the catalog has: lytics"),
            )
        })?;
        let variant = req.variant.clone().unwrap_or_else(|| "default".into());
        let mode = req.delivery_mode.clone().unwrap_or_else(|| "server_side".into());
        catalog::validate_install(&entry, &req.config, req.name.as_deref(), &variant, &mode)?;
        self.refuse_duplicate(
            req.config.account_id.as_deref().unwrap_or_default().trim(),
            req.config.stream_name.as_deref().unwrap_or_default().trim(),
            None,
        )
        .await?;
        let now = now_ms();
        let stored = StoredIntegration {
            id: format!("{key}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            kind: key.to_string(),
            name: req
                .name
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| entry.name.to_string()),
            variant,
            delivery_mode: mode,
            account_id: req.config.account_id.unwrap_or_default().trim().to_string(),
            stream_name: req.config.stream_name.unwrap_or_default().trim().to_string(),
            api_token: req.config.api_token.unwrap_or_default().trim().to_string(),
            base_url: self.base_url.clone(),
            paused: false,
            created_ms: now,
            updated_ms: now,
        };
        let integration = to_integration(&stored)?;
        if let Some(e) = &self.emulator {
            e.add_credentials(&stored.api_token, &stored.account_id);
        }
        if req.test_connection {
            // Not installed yet (its id may never be): a span, but no metric series for it.
            let uncounted = ProbeReporter {
                telemetry: self.probe_reporter.telemetry.clone(),
                monitor: crate::monitor::Monitor::detached(),
            };
            let stream = integration.stream_name.as_str();
            if let Err(failure) = probe(&self.client, &integration, stream, &uncounted).await {
                let message = format!("connection test failed: {failure}");
                return Err(match &failure {
                    // Lytics refused a setting: a bad value in the request, named.
                    ProbeFailure::Setup { .. } => match failure.setting() {
                        Some(key) => ApiError::field(format!("config.{key}"), message),
                        None => ApiError::new(ErrorCode::FailedPrecondition, message),
                    },
                    ProbeFailure::Unreachable(_) => ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "{message}; Lytics could not be reached: try again, or install without `test_connection`"
                        ),
                    ),
                    ProbeFailure::Refused(_) => ApiError::new(ErrorCode::FailedPrecondition, message),
                });
            }
        }
        // Checked again where it counts: another install may have taken the stream while this
        // one was being tested.
        let _changing = self.changing.lock().await;
        self.refuse_duplicate(&stored.account_id, &stored.stream_name, None)
            .await?;
        self.store.put(stored.clone()).await.map_err(store_error)?;
        self.reload().await?;
        tracing::info!(integration = %stored.id, stream = %stored.stream_name, "integration installed");
        Ok(self.view_stored(&stored))
    }

    /// Refuses a second integration for an account and stream another one (installed, or from
    /// the relay's settings) already delivers to: every event would reach the stream twice
    /// (running an install twice is an easy mistake). `except` is the integration being changed.
    async fn refuse_duplicate(
        &self,
        account_id: &str,
        stream_name: &str,
        except: Option<&str>,
    ) -> Result<(), ApiError> {
        let installed = self.store.list().await.map_err(store_error)?;
        let same = installed
            .iter()
            .filter(|s| Some(s.id.as_str()) != except)
            .find(|s| {
                s.account_id == account_id && s.stream_name == stream_name && s.base_url == self.base_url
            })
            .map(|s| s.id.clone())
            .or_else(|| {
                self.configured
                    .as_ref()
                    .filter(|c| {
                        !self.configured_is_default
                            && c.account_id.as_str() == account_id
                            && c.stream_name.as_str() == stream_name
                            && c.base_url == self.base_url
                    })
                    .map(|c| c.id.to_string())
            });
        match same {
            Some(id) => Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "integration `{id}` already delivers to account `{account_id}`, stream \
                     `{stream_name}`: a second one would deliver every event twice; change or \
                     remove `{id}` instead"
                ),
            )),
            None => Ok(()),
        }
    }

    /// Changes an installed integration; a delivery paused by a setup error resumes.
    pub async fn update(&self, id: &str, req: UpdateRequest) -> Result<IntegrationView, ApiError> {
        let c = &req.config;
        let no_name = req.name.as_deref().is_none_or(|n| n.trim().is_empty());
        if no_name && c.api_token.is_none() && c.account_id.is_none() && c.stream_name.is_none() {
            return Err(ApiError::field(
                "config",
                "nothing to change: give `name` or a `config` field (api_token, account_id, stream_name)",
            ));
        }
        let _changing = self.changing.lock().await;
        let mut s = self.stored(id).await?;
        let before = s.clone();
        let mut violations = Vec::new();
        if let Some(n) = req.name.filter(|n| !n.trim().is_empty()) {
            if let Some(problem) = catalog::name_problem(&n) {
                violations.push(FieldViolation::new("name", problem));
            }
            s.name = n;
        }
        for (key, value, slot) in [
            ("api_token", req.config.api_token, &mut s.api_token),
            ("account_id", req.config.account_id, &mut s.account_id),
            ("stream_name", req.config.stream_name, &mut s.stream_name),
        ] {
            match value {
                Some(v) if v.trim().is_empty() => {
                    violations.push(FieldViolation::new(format!("config.{key}"), "must not be empty"))
                }
                Some(v) => {
                    if let Some(problem) = catalog::setting_problem(key, v.trim()) {
                        violations.push(FieldViolation::new(format!("config.{key}"), problem));
                    }
                    *slot = v.trim().to_string();
                }
                None => {}
            }
        }
        if !violations.is_empty() {
            let named: Vec<String> = violations
                .iter()
                .map(|v| format!("`{}` {}", v.field, v.description))
                .collect();
            return Err(ApiError::invalid(
                format!("invalid update: {}", named.join("; ")),
                violations,
            ));
        }
        to_integration(&s)?;
        if (&s.account_id, &s.stream_name) != (&before.account_id, &before.stream_name) {
            self.refuse_duplicate(&s.account_id, &s.stream_name, Some(&s.id))
                .await?;
        }
        s.updated_ms = now_ms();
        if let Some(e) = &self.emulator {
            e.add_credentials(&s.api_token, &s.account_id);
        }
        self.store.put(s.clone()).await.map_err(store_error)?;
        self.reload().await?;
        if !s.paused && self.delivery.resume(&s.id) {
            tracing::info!(integration = %s.id, "config changed: delivery resumed");
        }
        Ok(self.view_stored(&s))
    }

    /// Pauses (`true`) or resumes delivery of an installed integration; events stay queued.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<IntegrationView, ApiError> {
        // The integration from flags or the config file (or the emulator default) has no stored
        // state to keep a pause in: it pauses here, until resumed or the relay restarts.
        if let Some(c) = &self.configured
            && c.id.as_str() == id
            && self.live.get(id).is_some()
        {
            if paused {
                self.delivery.pause_manual(id);
            } else {
                self.delivery.resume(id);
            }
            tracing::info!(
                integration = id,
                paused,
                "configured integration paused or resumed until the relay restarts"
            );
            return Ok(self.view_configured(c));
        }
        let _changing = self.changing.lock().await;
        let mut s = self.stored(id).await?;
        s.paused = paused;
        s.updated_ms = now_ms();
        self.store.put(s.clone()).await.map_err(store_error)?;
        if paused {
            self.delivery.pause_manual(id);
            tracing::info!(integration = id, "integration paused: its events stay queued");
        } else {
            self.delivery.resume(id);
            tracing::info!(integration = id, "integration resumed");
        }
        Ok(self.view_stored(&s))
    }

    /// Removes an installed integration. Its records still queued are dead-lettered by delivery.
    pub async fn uninstall(&self, id: &str) -> Result<(), ApiError> {
        let _changing = self.changing.lock().await;
        self.stored(id).await?;
        self.store.delete(id).await.map_err(store_error)?;
        self.delivery.resume(id);
        self.reload().await?;
        tracing::info!(integration = id, "integration uninstalled");
        Ok(())
    }

    /// A `dryrun` collect call with the integration's settings.
    pub async fn test_connection(&self, id: &str) -> Result<ConnectionTest, ApiError> {
        let integration = match self.live.get(id) {
            Some(i) => i,
            None => to_integration(&self.stored(id).await?)?,
        };
        Ok(self.test(&integration, &self.probe_reporter).await)
    }

    /// A `dryrun` call with `integration`'s settings, reported to `report`.
    async fn test(&self, integration: &Integration, report: &ProbeReporter) -> ConnectionTest {
        match probe(
            &self.client,
            integration,
            integration.stream_name.as_str(),
            report,
        )
        .await
        {
            Ok(()) => ConnectionTest {
                ok: true,
                detail: None,
            },
            Err(e) => ConnectionTest {
                ok: false,
                detail: Some(e.to_string()),
            },
        }
    }

    async fn stored(&self, id: &str) -> Result<StoredIntegration, ApiError> {
        if self.configured.as_ref().is_some_and(|c| c.id.as_str() == id) {
            if self.configured_is_default && self.live.get(id).is_none() {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no integration `{id}`: the built-in default `{id}` stands in only until an \
                         integration is installed, and one is (list them with GET /v1/admin/integrations)"
                    ),
                ));
            }
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "integration `{id}` comes from the relay's configuration (flags, environment, config file); change it there"
                ),
            ));
        }
        self.store
            .get(id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(id))
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no integration `{id}`"))
}

fn to_integration(s: &StoredIntegration) -> Result<Integration, ApiError> {
    let mut violations = Vec::new();
    let id = IntegrationId::new(&s.id)
        .map_err(|e| violations.push(FieldViolation::new("id", e.to_string())))
        .ok();
    let account = AccountId::new(&s.account_id)
        .map_err(|e| violations.push(FieldViolation::new("config.account_id", e.to_string())))
        .ok();
    let stream = StreamName::new(&s.stream_name)
        .map_err(|e| violations.push(FieldViolation::new("config.stream_name", e.to_string())))
        .ok();
    let token = crate::integration::check_api_token(&s.api_token)
        .map_err(|e| violations.push(FieldViolation::new("config.api_token", e)))
        .ok();
    match (id, account, stream, token) {
        (Some(id), Some(account_id), Some(stream_name), Some(())) => Ok(Integration {
            id,
            name: s.name.clone(),
            account_id,
            stream_name,
            api_token: Secret::new(s.api_token.clone()),
            base_url: s.base_url.clone(),
            enabled: true,
        }),
        _ => {
            let named: Vec<String> = violations
                .iter()
                .map(|v| format!("`{}` {}", v.field, v.description))
                .collect();
            Err(ApiError::invalid(
                format!("invalid integration settings: {}", named.join("; ")),
                violations,
            ))
        }
    }
}
