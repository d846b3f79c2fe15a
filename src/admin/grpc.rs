//! `lytics_relay.v1.AdminService`: the HTTP admin API's operations over gRPC.
//!
//! Input: admin requests (the token is checked by the interceptor in front). Output: the same
//! views as HTTP, converted to protobuf; tokens always masked.

use tonic::{Request, Response, Status};

use super::catalog::{self, CatalogEntry, ConfigInput};
use super::integrations::{InstallRequest, IntegrationAdmin, IntegrationView, UpdateRequest};
use crate::error::{ApiError, ErrorCode};
use crate::normalize::json_to_struct;
use crate::proto::servers::admin_service_server::AdminService;
use crate::proto::v1 as pb;

/// The service.
#[derive(Clone)]
pub struct AdminGrpc {
    admin: IntegrationAdmin,
}

impl AdminGrpc {
    /// Wires the service.
    pub fn new(admin: IntegrationAdmin) -> Self {
        AdminGrpc { admin }
    }
}

fn entry_pb(e: CatalogEntry) -> pb::CatalogEntry {
    pb::CatalogEntry {
        key: e.key.into(),
        name: e.name.into(),
        category: e.category.into(),
        status: e.status.into(),
        description: e.description.into(),
        config_fields: e
            .config_fields
            .into_iter()
            .map(|f| pb::ConfigField {
                key: f.key.into(),
                label: f.label.into(),
                r#type: f.kind.into(),
                required: f.required,
                placeholder: f.placeholder.into(),
                help_text: f.help_text.into(),
            })
            .collect(),
        variants: e
            .variants
            .into_iter()
            .map(|v| pb::Variant {
                key: v.key.into(),
                name: v.name.into(),
                description: v.description.into(),
                default_config: json_to_struct(&v.default_config),
            })
            .collect(),
        delivery_modes: e.delivery_modes.into_iter().map(String::from).collect(),
    }
}

fn view_pb(v: IntegrationView) -> pb::Integration {
    pb::Integration {
        id: v.id,
        name: v.name,
        integration: v.integration,
        variant: v.variant,
        delivery_mode: v.delivery_mode,
        config: Some(pb::IntegrationConfig {
            api_token: v.config.api_token.into(),
            account_id: v.config.account_id,
            stream_name: v.config.stream_name,
        }),
        status: v.status,
        status_detail: v.status_detail.unwrap_or_default(),
        managed_by: v.managed_by,
        created_ms: v.created_ms,
        updated_ms: v.updated_ms,
    }
}

fn config_input(c: Option<pb::IntegrationConfig>) -> ConfigInput {
    let c = c.unwrap_or_default();
    let some = |s: String| (!s.is_empty()).then_some(s);
    ConfigInput {
        api_token: some(c.api_token),
        account_id: some(c.account_id),
        stream_name: some(c.stream_name),
    }
}

fn text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The `id` of a request about one integration: required.
fn id_of(id: String) -> Result<String, ApiError> {
    if id.trim().is_empty() {
        return Err(ApiError::field(
            "id",
            "is required: the integration's id (ListIntegrations lists them)",
        ));
    }
    Ok(id)
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn list_catalog(
        &self,
        _: Request<pb::ListCatalogRequest>,
    ) -> Result<Response<pb::ListCatalogResponse>, Status> {
        Ok(Response::new(pb::ListCatalogResponse {
            entries: catalog::catalog().into_iter().map(entry_pb).collect(),
        }))
    }

    async fn get_catalog_entry(
        &self,
        r: Request<pb::GetCatalogEntryRequest>,
    ) -> Result<Response<pb::GetCatalogEntryResponse>, Status> {
        let key = r.into_inner().key;
        if key.trim().is_empty() {
            return Err(ApiError::field("key", "is required: a catalog key (ListCatalog lists them)").into());
        }
        let e = catalog::entry(&key)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no catalog entry `{key}`")))?;
        Ok(Response::new(pb::GetCatalogEntryResponse {
            entry: Some(entry_pb(e)),
        }))
    }

    async fn install_integration(
        &self,
        r: Request<pb::InstallIntegrationRequest>,
    ) -> Result<Response<pb::InstallIntegrationResponse>, Status> {
        let r = r.into_inner();
        let key = text(r.catalog_key).unwrap_or_else(|| catalog::LYTICS.into());
        let req = InstallRequest {
            name: text(r.name),
            variant: text(r.variant),
            config: config_input(r.config),
            delivery_mode: text(r.delivery_mode),
            test_connection: r.test_connection,
        };
        let v = self.admin.install(&key, req).await?;
        Ok(Response::new(pb::InstallIntegrationResponse {
            integration: Some(view_pb(v)),
        }))
    }

    async fn list_integrations(
        &self,
        r: Request<pb::ListIntegrationsRequest>,
    ) -> Result<Response<pb::ListIntegrationsResponse>, Status> {
        let r = r.into_inner();
        let limit = match usize::try_from(r.page_size) {
            Ok(0) => 50,
            Ok(n) => n,
            Err(_) => {
                return Err(ApiError::field("page_size", "must not be negative (0 for the default)").into());
            }
        };
        // The HTTP API calls the token `cursor`; here it is `page_token`.
        let page = self
            .admin
            .list(text(r.page_token).as_deref(), limit)
            .await
            .map_err(|e| match e.violations.iter().find(|v| v.field == "cursor") {
                Some(v) => ApiError::field("page_token", v.description.clone()),
                None => e,
            })?;
        Ok(Response::new(pb::ListIntegrationsResponse {
            integrations: page.integrations.into_iter().map(view_pb).collect(),
            next_page_token: page.next_cursor.unwrap_or_default(),
        }))
    }

    async fn get_integration(
        &self,
        r: Request<pb::GetIntegrationRequest>,
    ) -> Result<Response<pb::GetIntegrationResponse>, Status> {
        let v = self.admin.get(&id_of(r.into_inner().id)?).await?;
        Ok(Response::new(pb::GetIntegrationResponse {
            integration: Some(view_pb(v)),
        }))
    }

    async fn update_integration(
        &self,
        r: Request<pb::UpdateIntegrationRequest>,
    ) -> Result<Response<pb::UpdateIntegrationResponse>, Status> {
        let r = r.into_inner();
        let v = self
            .admin
            .update(
                &id_of(r.id)?,
                UpdateRequest {
                    name: text(r.name),
                    config: config_input(r.config),
                },
            )
            .await?;
        Ok(Response::new(pb::UpdateIntegrationResponse {
            integration: Some(view_pb(v)),
        }))
    }

    async fn pause_integration(
        &self,
        r: Request<pb::PauseIntegrationRequest>,
    ) -> Result<Response<pb::PauseIntegrationResponse>, Status> {
        let v = self.admin.set_paused(&id_of(r.into_inner().id)?, true).await?;
        Ok(Response::new(pb::PauseIntegrationResponse {
            integration: Some(view_pb(v)),
        }))
    }

    async fn resume_integration(
        &self,
        r: Request<pb::ResumeIntegrationRequest>,
    ) -> Result<Response<pb::ResumeIntegrationResponse>, Status> {
        let v = self.admin.set_paused(&id_of(r.into_inner().id)?, false).await?;
        Ok(Response::new(pb::ResumeIntegrationResponse {
            integration: Some(view_pb(v)),
        }))
    }

    async fn uninstall_integration(
        &self,
        r: Request<pb::UninstallIntegrationRequest>,
    ) -> Result<Response<pb::UninstallIntegrationResponse>, Status> {
        self.admin.uninstall(&id_of(r.into_inner().id)?).await?;
        Ok(Response::new(pb::UninstallIntegrationResponse {}))
    }

    async fn test_connection(
        &self,
        r: Request<pb::TestConnectionRequest>,
    ) -> Result<Response<pb::TestConnectionResponse>, Status> {
        let t = self.admin.test_connection(&id_of(r.into_inner().id)?).await?;
        Ok(Response::new(pb::TestConnectionResponse {
            ok: t.ok,
            detail: t.detail.unwrap_or_default(),
        }))
    }
}
