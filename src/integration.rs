//! Integrations: where records go and with which credentials.
//!
//! Input: validated settings (or, later, the admin API). Output: [`Integration`] values with
//! validated newtypes; the API token is a [`Secret`] whose `Debug` and `Display` print `***`, so
//! it cannot leak through logs, traces or responses by accident. Holds no I/O.

use std::fmt;
use std::sync::Arc;

use crate::rules::IntegrationContext;

/// A secret string. It prints as `***` and is only readable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The mask shown instead of the secret.
    pub const MASK: &'static str = "***";
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MASK)
    }
}

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// A Lytics stream name: non-empty, case-sensitive, usable as a URL path segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Validates a stream name.
    pub fn new(name: &str) -> Result<Self, InvalidValue> {
        if name.trim().is_empty() {
            return Err(InvalidValue("must not be empty".into()));
        }
        if name.len() > 256 {
            return Err(InvalidValue("must be at most 256 bytes".into()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '%'))
        {
            return Err(InvalidValue(format!(
                "must not contain {c:?}; use the stream name exactly as Lytics shows it in Data > Data Streams"
            )));
        }
        Ok(StreamName(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Lytics account id: non-empty, without spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountId(Arc<str>);

impl AccountId {
    /// Validates an account id.
    pub fn new(id: &str) -> Result<Self, InvalidValue> {
        if id.trim().is_empty() {
            return Err(InvalidValue("must not be empty".into()));
        }
        if id.len() > 128 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidValue(
                "must be the account id shown in Lytics Account > Account Settings".into(),
            ));
        }
        Ok(AccountId(Arc::from(id)))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An integration's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntegrationId(Arc<str>);

impl IntegrationId {
    /// Validates an id: 1–64 characters of `[A-Za-z0-9_-]`.
    pub fn new(id: &str) -> Result<Self, InvalidValue> {
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(InvalidValue(
                "must be 1-64 characters of letters, digits, `_` and `-`".into(),
            ));
        }
        Ok(IntegrationId(Arc::from(id)))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared text, for records that carry it.
    pub fn as_arc(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for IntegrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Lytics integration: an account, a stream and a token.
#[derive(Debug, Clone)]
pub struct Integration {
    /// Its id; records carry it.
    pub id: IntegrationId,
    /// A display name.
    pub name: String,
    /// The Lytics account.
    pub account_id: AccountId,
    /// The stream records go to unless a rule names another.
    pub stream_name: StreamName,
    /// The Lytics API token.
    pub api_token: Secret,
    /// The collect API base, `https://api.lytics.io` or the emulator.
    pub base_url: String,
    /// Whether delivery is switched on.
    pub enabled: bool,
}

impl Integration {
    /// The values rules may read: never the token.
    pub fn context(&self) -> IntegrationContext {
        IntegrationContext {
            integration_id: self.id.as_str().to_string(),
            integration_name: self.name.clone(),
            account_id: self.account_id.as_str().to_string(),
            stream_name: self.stream_name.as_str().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("tok-123");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "tok-123");
    }

    #[test]
    fn stream_names_are_validated_case_preserved() {
        assert_eq!(
            StreamName::new("Datafly_Events").unwrap().as_str(),
            "Datafly_Events"
        );
        assert!(StreamName::new("").is_err());
        assert!(StreamName::new("a/b").is_err());
        assert!(StreamName::new("a b").is_err());
    }

    #[test]
    fn ids_are_validated() {
        assert!(IntegrationId::new("lytics-1").is_ok());
        assert!(IntegrationId::new("no spaces").is_err());
        assert!(AccountId::new(" ").is_err());
    }
}

/// Checks a Lytics API token: it travels in an HTTP header, so it must be printable ASCII
/// without spaces (Lytics issues letters and digits). Says what is wrong without repeating it.
pub fn check_api_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        Err("must not be empty")
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Err("must be printable ASCII without spaces or control characters (as Lytics issues tokens)")
    } else {
        Ok(())
    }
}

/// The id of the integration built from flags, environment or config file. Installed
/// integrations get ids of their own (`lytics-c84f57ef`).
pub const CONFIGURED_ID: &str = "lytics";

/// The id of the zero-setup default, delivering to the built-in emulator: not the configured
/// integration's, so that records queued for Lytics are never delivered to the emulator by a
/// relay restarted without its Lytics settings.
pub const EMULATOR_ID: &str = "emulator";

/// An integration that left the set in force, as it last was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    /// The stream it had.
    pub stream: StreamName,
    /// An installed integration that was uninstalled (gone for every replica), rather than the
    /// configured one, replaced by installed ones on this relay only.
    pub uninstalled: bool,
}

/// The integrations in force, swapped atomically when they change.
#[derive(Debug, Clone, Default)]
pub struct Integrations {
    list: Arc<arc_swap::ArcSwap<Vec<Integration>>>,
    /// Each integration no longer in force, so that records still queued for it are
    /// dead-lettered naming its stream and why (kept until the relay restarts).
    retired: Arc<std::sync::Mutex<std::collections::HashMap<String, Retired>>>,
}

impl Integrations {
    /// Starts with `list`.
    pub fn new(list: Vec<Integration>) -> Self {
        Integrations {
            list: Arc::new(arc_swap::ArcSwap::from_pointee(list)),
            retired: Arc::default(),
        }
    }

    /// The current list.
    pub fn snapshot(&self) -> Arc<Vec<Integration>> {
        self.list.load_full()
    }

    /// Replaces the list.
    pub fn replace(&self, list: Vec<Integration>) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        for gone in self.list.load().iter() {
            if !list.iter().any(|i| i.id == gone.id) {
                retired.insert(
                    gone.id.to_string(),
                    Retired {
                        stream: gone.stream_name.clone(),
                        uninstalled: gone.id.as_str() != CONFIGURED_ID && gone.id.as_str() != EMULATOR_ID,
                    },
                );
            }
        }
        for i in &list {
            retired.remove(i.id.as_str());
        }
        self.list.store(Arc::new(list));
    }

    /// One integration by id.
    pub fn get(&self, id: &str) -> Option<Integration> {
        self.list.load().iter().find(|i| i.id.as_str() == id).cloned()
    }

    /// Integration `id` as it was when it left the list (since the relay started).
    pub fn retired(&self, id: &str) -> Option<Retired> {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}
