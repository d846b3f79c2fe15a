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
    name: Option<&str>,
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
    // Every problem in one answer: the values given are checked too.
    for (key, value) in [
        ("api_token", &config.api_token),
        ("account_id", &config.account_id),
        ("stream_name", &config.stream_name),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.trim().is_empty())
            && let Some(problem) = setting_problem(key, v.trim())
        {
            violations.push(FieldViolation::new(format!("config.{key}"), problem));
        }
    }
    if let Some(problem) = name.and_then(name_problem) {
        violations.push(FieldViolation::new("name", problem));
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
    Err(ApiError::violations("install request", violations))
}

/// What is wrong with a (trimmed, non-empty) integration setting, if anything.
pub fn setting_problem(key: &str, value: &str) -> Option<String> {
    use crate::integration::{AccountId, StreamName, check_api_token};
    match key {
        "api_token" => check_api_token(value).err().map(str::to_string),
        "account_id" => AccountId::new(value).err().map(|e| e.to_string()),
        "stream_name" => StreamName::new(value).err().map(|e| e.to_string()),
        _ => None,
    }
}

/// The longest integration name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// What is wrong with an integration's display name, if anything.
pub fn name_problem(name: &str) -> Option<String> {
    if name.chars().count() > MAX_NAME_CHARS {
        Some(format!("must be at most {MAX_NAME_CHARS} characters"))
    } else if name.chars().any(char::is_control) {
        Some("must not hold control characters (line breaks, tabs, NUL)".into())
    } else {
        None
    }
}
