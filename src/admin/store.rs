//! Installed integrations, persisted so they survive restarts.
//!
//! Input: integrations the admin API installs, updates and removes. Output: the stored list. The
//! [`IntegrationStore`] trait is the seam (a distributed backend can share one list between
//! replicas); [`SqliteIntegrationStore`] keeps them in `<data-dir>/integrations.sqlite3` (mode
//! 0600: it holds API tokens); [`NatsIntegrationStore`] keeps them in a JetStream key-value
//! bucket that every relay on the same NATS shares, and tells each replica when the list changed.
//! Never delivers.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// An installed integration as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIntegration {
    /// Its id.
    pub id: String,
    /// The catalog entry it was installed from (`lytics`).
    pub kind: String,
    /// A display name.
    pub name: String,
    /// The variant (`default`).
    pub variant: String,
    /// The delivery mode (`server_side`).
    pub delivery_mode: String,
    /// The Lytics account id.
    pub account_id: String,
    /// The Lytics stream.
    pub stream_name: String,
    /// The Lytics API token.
    pub api_token: String,
    /// The collect API base URL.
    pub base_url: String,
    /// Paused by an operator.
    pub paused: bool,
    /// When it was installed (unix ms).
    pub created_ms: i64,
    /// When it last changed (unix ms).
    pub updated_ms: i64,
}

impl std::fmt::Debug for StoredIntegration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredIntegration")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("account_id", &self.account_id)
            .field("stream_name", &self.stream_name)
            .field("api_token", &"***")
            .field("paused", &self.paused)
            .finish()
    }
}

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
#[error("integration store failed: {0}")]
pub struct StoreError(pub String);

/// Where installed integrations live.
#[async_trait]
pub trait IntegrationStore: Send + Sync + 'static {
    /// Every stored integration, by creation time.
    async fn list(&self) -> Result<Vec<StoredIntegration>, StoreError>;
    /// Inserts or replaces one.
    async fn put(&self, integration: StoredIntegration) -> Result<(), StoreError>;
    /// Removes one; returns whether it existed.
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// One by id.
    async fn get(&self, id: &str) -> Result<Option<StoredIntegration>, StoreError>;
    /// For a store shared between replicas: a counter that moves each time any replica changed
    /// the list. `None` when only this relay writes the store.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteIntegrationStore {
    conn: Arc<Mutex<Connection>>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteIntegrationStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let conn = Connection::open(path).map_err(err)?;
        restrict(path);
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;
             CREATE TABLE IF NOT EXISTS integrations (id TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms INTEGER NOT NULL);",
        )
        .map_err(err)?;
        // Free pages written before `secure_delete` may still hold old tokens: the store is a
        // few rows, so rewriting it at each start costs nothing.
        conn.execute_batch("VACUUM").map_err(err)?;
        forget_old_versions(&conn);
        Ok(SqliteIntegrationStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(err)?
    }
}

/// A replaced or deleted integration's API token must not linger on disk: `secure_delete`
/// zeroes what a write frees in the database, and copying the log into the database and
/// emptying it (`TRUNCATE`) drops the log's copies of the old pages. Admin writes are rare, so
/// the copy is cheap; should it fail (a reader holds the log), the next write tries again.
fn forget_old_versions(c: &Connection) {
    // The first column is 1 when a reader kept the log from being emptied.
    match c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)) {
        Ok(0) => {}
        Ok(_) => tracing::warn!("the integration store's log is in use; it is emptied at the next change"),
        Err(e) => tracing::warn!(error = %e, "cannot empty the integration store's log"),
    }
}

#[cfg(unix)]
fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict(_path: &Path) {}

#[async_trait]
impl IntegrationStore for SqliteIntegrationStore {
    async fn list(&self) -> Result<Vec<StoredIntegration>, StoreError> {
        self.with(|c| {
            let mut stmt = c
                .prepare("SELECT body FROM integrations ORDER BY created_ms, id")
                .map_err(err)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(err)?;
            rows.map(|r| r.map_err(err).and_then(|b| serde_json::from_str(&b).map_err(err)))
                .collect()
        })
        .await
    }

    async fn put(&self, i: StoredIntegration) -> Result<(), StoreError> {
        self.with(move |c| {
            let body = serde_json::to_string(&i).map_err(err)?;
            c.execute(
                "INSERT OR REPLACE INTO integrations (id, body, created_ms) VALUES (?1, ?2, ?3)",
                params![i.id, body, i.created_ms],
            )
            .map_err(err)?;
            forget_old_versions(c);
            Ok(())
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let deleted = c
                .execute("DELETE FROM integrations WHERE id = ?1", params![id])
                .map_err(err)?
                > 0;
            forget_old_versions(c);
            Ok(deleted)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<StoredIntegration>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let body: Option<String> = c
                .query_row("SELECT body FROM integrations WHERE id = ?1", params![id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(err)?;
            body.map(|b| serde_json::from_str(&b).map_err(err)).transpose()
        })
        .await
    }
}

/// The JetStream key-value bucket of installed integrations.
pub const KV_BUCKET: &str = "LYTICS_RELAY_INTEGRATIONS";

/// Installed integrations in a JetStream key-value bucket (one key per integration id), shared
/// by every relay on the same NATS. The bucket holds API tokens: restrict it with NATS
/// permissions as you would the SQLite file.
pub struct NatsIntegrationStore {
    kv: async_nats::jetstream::kv::Store,
    changes: tokio::sync::watch::Receiver<u64>,
    _stop: tokio_util::sync::DropGuard,
}

impl NatsIntegrationStore {
    /// Creates or opens the bucket and starts watching it.
    pub async fn open(client: async_nats::Client, replicas: usize) -> Result<Self, StoreError> {
        let js = async_nats::jetstream::new(client);
        let kv = js
            .create_or_update_key_value(async_nats::jetstream::kv::Config {
                bucket: KV_BUCKET.into(),
                history: 1,
                num_replicas: replicas.max(1),
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError(format!("cannot open the bucket `{KV_BUCKET}`: {e}")))?;
        let mut watch = kv.watch_all().await.map_err(err)?;
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    entry = watch.next() => match entry {
                        Some(_) => tx.send_modify(|n| *n += 1),
                        None => return,
                    },
                }
            }
        });
        Ok(NatsIntegrationStore {
            kv,
            changes: rx,
            _stop: stop.drop_guard(),
        })
    }
}

#[async_trait]
impl IntegrationStore for NatsIntegrationStore {
    async fn list(&self) -> Result<Vec<StoredIntegration>, StoreError> {
        use futures::TryStreamExt as _;
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(k) => k.try_collect().await.map_err(err)?,
            Err(e) => return Err(err(e)),
        };
        let mut all = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(i) = self.get(&k).await? {
                all.push(i);
            }
        }
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(all)
    }

    async fn put(&self, i: StoredIntegration) -> Result<(), StoreError> {
        let body = serde_json::to_vec(&i).map_err(err)?;
        self.kv.put(&i.id, body.into()).await.map_err(err)?;
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let existed = self.get(id).await?.is_some();
        if existed {
            self.kv.delete(id).await.map_err(err)?;
        }
        Ok(existed)
    }

    async fn get(&self, id: &str) -> Result<Option<StoredIntegration>, StoreError> {
        match self.kv.get(id).await.map_err(err)? {
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(err),
            None => Ok(None),
        }
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> StoredIntegration {
        StoredIntegration {
            id: id.into(),
            kind: "lytics".into(),
            name: "Lytics".into(),
            variant: "default".into(),
            delivery_mode: "server_side".into(),
            account_id: "1234".into(),
            stream_name: "datafly_events".into(),
            api_token: "secret-token".into(),
            base_url: "https://api.lytics.io".into(),
            paused: false,
            created_ms: 1,
            updated_ms: 1,
        }
    }

    #[tokio::test]
    async fn integrations_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("integrations.sqlite3");
        {
            let s = SqliteIntegrationStore::open(&path).unwrap();
            s.put(sample("a")).await.unwrap();
            s.put(sample("b")).await.unwrap();
            assert!(s.delete("b").await.unwrap());
        }
        let s = SqliteIntegrationStore::open(&path).unwrap();
        let all = s.list().await.unwrap();
        assert_eq!(all, vec![sample("a")]);
        assert_eq!(s.get("a").await.unwrap(), Some(sample("a")));
        assert!(!format!("{:?}", all[0]).contains("secret-token"));
    }

    #[tokio::test]
    async fn a_replaced_or_deleted_token_is_not_left_in_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("integrations.sqlite3");
        let on_disk = |token: &str| {
            ["integrations.sqlite3", "integrations.sqlite3-wal"]
                .iter()
                .filter_map(|f| std::fs::read(dir.path().join(f)).ok())
                .any(|bytes| bytes.windows(token.len()).any(|w| w == token.as_bytes()))
        };
        let s = SqliteIntegrationStore::open(&path).unwrap();
        let with_token = |id: &str, token: &str| StoredIntegration {
            api_token: token.into(),
            ..sample(id)
        };
        s.put(with_token("a", "first-token-AAAA")).await.unwrap();
        s.put(with_token("b", "other-token-BBBB")).await.unwrap();
        assert!(on_disk("first-token-AAAA"));
        // Rotated, then removed.
        s.put(with_token("a", "second-token-CCCC")).await.unwrap();
        assert!(
            !on_disk("first-token-AAAA"),
            "the replaced token is still on disk"
        );
        assert!(on_disk("second-token-CCCC"));
        assert!(s.delete("a").await.unwrap());
        assert!(
            !on_disk("second-token-CCCC"),
            "the deleted token is still on disk"
        );
        assert!(on_disk("other-token-BBBB"), "the other integration is kept");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
