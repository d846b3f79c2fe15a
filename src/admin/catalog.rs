//! The integration catalog: what can be installed and with which settings (REFERENCE §2).
//!
//! Input: nothing (the catalog is fixed). Output: catalog entries as operators browse them, and
//! the validation of an install request against its entry. Pure.

use serde::Serialize;

use crate::error::{ApiError, FieldViolation};

/// One config field of a catalog entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigField {
    /// The key in `config`.
    pub key: &'static str,
    /// A label for forms.
    pub label: &'static str,
    /// `string` or `secret` (secrets are masked in every answer).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Must be given at install.
    pub required: bool,
    /// An example value.
    pub placeholder: &'static str,
    /// Where to find the value.
    pub help_text: &'static str,
}

/// A variant: a ready-to-use configuration of an entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Variant {
    /// Its key.
    pub key: &'static str,
    /// Its name.
    pub name: &'static str,
    /// What it sets up.
    pub description: &'static str,
    /// The settings it installs with, beside the required config.
    pub default_config: serde_json::Value,
}

/// A catalog entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Its key (`lytics`).
    pub key: &'static str,
    /// Its name.
    pub name: &'static str,
    /// Its category (`cdp`).
    pub category: &'static str,
    /// `available`.
    pub status: &'static str,
    /// What it does.
    pub description: &'static str,
    /// The settings an install takes.
    pub config_fields: Vec<ConfigField>,
    /// Ready-to-use configurations.
    pub variants: Vec<Variant>,
    /// How events reach the vendor.
    pub delivery_modes: Vec<&'static str>,
}

/// The one integration the relay installs.
pub const LYTICS: &str = "lytics";

/// The catalog.
pub fn catalog() -> Vec<CatalogEntry> {
    vec![CatalogEntry {
        key: LYTICS,
        name: "Lytics",
        category: "cdp",
        status: "available",
        description: "Customer data platform specialising in real-time behavioural scoring, audience building, and first-party data activation.",
        config_fields: vec![
            ConfigField {
                key: "api_token",
                label: "API Token",
                kind: "secret",
                required: true,
                placeholder: "xxxxxxxxxxxxxxxxxxxx",
                help_text: "Your Lytics API token with data write permission. Generated in Account > API Tokens.",
            },
            ConfigField {
                key: "account_id",
                label: "Account ID",
                kind: "string",
                required: true,
                placeholder: "1234",
                help_text: "Your Lytics account ID. Found in Account > Account Settings.",
            },
            ConfigField {
                key: "stream_name",
                label: "Stream Name",
                kind: "string",
                required: true,
                placeholder: "datafly_events",
                help_text: "The Lytics data stream name. Must match an existing stream exactly (case-sensitive), see Data > Data Streams.",
            },
        ],
        variants: vec![Variant {
            key: "default",
            name: "Default",
            description: "The shipped rules: page and track as stream events, identify as a profile update, Customer.io email activity as user fields.",
            default_config: serde_json::json!({"rules": "shipped", "timestamp_field": "_ts"}),
        }],
        delivery_modes: vec!["server_side"],
    }]
}

/// One entry by key.
pub fn entry(key: &str) -> Option<CatalogEntry> {
    catalog().into_iter().find(|e| e.key == key)
}

/// The settings of an install or update, as given.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ConfigInput {
    /// The API token.
    pub api_token: Option<String>,
    /// The account id.
    pub account_id: Option<String>,
    /// The stream.
    pub stream_name: Option<String>,
}

/// Checks an install against `entry`: every required field present and non-empty, a known
/// variant and delivery mode. Reports every problem at once.
pub fn validate_install(
    entry: &CatalogEntry,
    config: &ConfigInput,
    variant: &str,
    mode: &str,
) -> Result<(), ApiError> {
    let mut violations = Vec::new();
    for f in entry.config_fields.iter().filter(|f| f.required) {
        let value = match f.key {
            "api_token" => &config.api_token,
            "account_id" => &config.account_id,
            _ => &config.stream_name,
        };
        if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
            violations.push(FieldViolation::new(
                format!("config.{}", f.key),
                format!("is required: {}", f.help_text),
            ));
        }
    }
    if !entry.variants.iter().any(|v| v.key == variant) {
        let valid: Vec<&str> = entry.variants.iter().map(|v| v.key).collect();
        violations.push(FieldViolation::new(
            "variant",
            format!(
                "unknown variant `{variant}`; valid variants: {}",
                valid.join(", ")
            ),
        ));
    }
    if !entry.delivery_modes.contains(&mode) {
        violations.push(FieldViolation::new(
            "delivery_mode",
            format!(
                "unknown delivery mode `{mode}`; valid modes: {}",
                entry.delivery_modes.join(", ")
            ),
        ));
    }
    if violations.is_empty() {
        return Ok(());
    }
    let message = format!(
        "invalid install request: {}",
        violations
            .iter()
            .map(|v| format!("`{}` {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Err(ApiError::invalid(message, violations))
}
