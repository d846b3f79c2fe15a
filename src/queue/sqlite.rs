//! The embedded durable queue, on SQLite (rusqlite, bundled) in WAL mode: an enqueue returns
//! only after its records are fsynced.
//!
//! Input: queue operations from ingest and delivery. Output: their results, after commit. One
//! writer thread owns the connection and group-commits: it takes whatever operations queued up
//! while the previous transaction committed, runs them in one transaction, and answers all of
//! them together, so durability costs one fsync per group rather than per event. The writer does
//! not wait for that fsync either: it commits with `synchronous=NORMAL` and a syncer thread
//! (`wal_sync.rs`) syncs the log and then answers, while the writer runs the next group. Copying
//! the log into the database is left to a checkpointer thread (`checkpoint.rs`).
//!
//! The table holds each record once, written at enqueue and deleted at ack, with no secondary
//! index. Which records wait, and when they fall due, the writer keeps in memory
//! ([`Schedule`], rebuilt from the table at start); a lease is a change to that schedule only,
//! so a process that dies releases every lease and its records are delivered again
//! (at-least-once). Records this process enqueued are also kept in memory until leased, so in
//! steady state delivery never reads a record back. Never delivers and never maps.
//!
//! Dedup: the ids accepted within the window are kept in memory ([`Seen`], see `dedup.rs`), so
//! a lookup reads nothing. To rebuild that index at start, each transaction that accepts events
//! with ids appends one `dedup_log` row (its time and the ids' hashes), and rows whose ids are
//! all forgotten are deleted from the front: the log is written sequentially, never indexed.
//!
//! Disk: SQLite reuses the pages of delivered records but never gives them back, so after a
//! backlog drains the writer compacts the database ([`Compaction`]: `VACUUM`, then a `TRUNCATE`
//! checkpoint that also empties the log).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::{FromSqlError, Type};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::checkpoint::{Checkpointer, Counts, Limits};
use super::dedup::{Dedup, HashSetOf, KeyHash, Seen, key_hash, key_hashes};
use super::wal_sync::{Failure, Pending, WalSync};
use super::{
    Attempt, AttemptKind, DeadLetter, DeadLetterFilter, EventRecords, NewRecord, Queue, QueueError,
    QueuedRecord, RecordId, Replay,
};
use crate::rules::Source;
use crate::telemetry::Throttle;
use crate::timefmt::now_ms;

/// Operations one transaction takes at most.
const GROUP_MAX: usize = 4096;
/// Group commit: the writer lingers only when the last commit held at least this many
/// enqueue calls...
const LINGER_MIN_CALLERS: usize = 4;
/// ...and only until the waiting operations hold this many records (an operation that is not
/// an enqueue counts as one): a few batch calls already make a commit worth its fsync, and
/// lingering then only holds the writer, which bounds how fast batches are taken...
const LINGER_UNTIL_RECORDS: usize = 256;
/// ...and at most this long, in `LINGER_NAPS` naps.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
const LINGER_NAPS: u32 = 4;
/// How often at most the dedup bound's early forgetting is warned about: under steady traffic
/// above the bound it happens all the time, and once a day says it.
const EARLY_WARNING_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Operations waiting for the writer; callers wait for room beyond this.
const PENDING_MAX: usize = 65_536;
/// Bytes of enqueued records kept in memory for delivery to lease without reading them back.
/// Records past it go back to the enqueuing caller to be freed there.
const FRESH_MAX_BYTES: usize = 16 * 1024 * 1024;

/// When the writer gives a drained backlog's disk back. Delivered records leave their pages free
/// inside the database file; SQLite reuses them for later records but never shrinks the file, so
/// an outage's backlog (1.6 KB a record: a million records is 1.6 GB) would hold its disk for
/// good. Once the queue is nearly empty and most of the file is free, the writer runs `VACUUM`
/// (which copies only what is left: a few records, dedup keys, dead letters) and then a
/// `TRUNCATE` checkpoint, which moves the result into the database file, shrinks it, and empties
/// the log. Operations wait meanwhile (0.16 s after a 200,000-record backlog drained). A
/// checkpointer pass running at that moment makes the `TRUNCATE` give up at once; it is tried
/// again at the next look.
#[derive(Clone, Copy, Debug)]
struct Compaction {
    /// The free pages are worth at least this many bytes and at least half the file...
    min_free_bytes: i64,
    /// ...while at most this many records are queued...
    max_depth: usize,
    /// ...looked at no more often than this.
    every: Duration,
}

/// What is left is copied in memory up to this size, else through a temporary file.
const COMPACT_IN_MEMORY_BYTES: i64 = 64 * 1024 * 1024;
/// After a failed `VACUUM`, the next try waits this long.
const COMPACT_RETRY: Duration = Duration::from_secs(3600);

impl Compaction {
    const DEFAULT: Compaction = Compaction {
        min_free_bytes: 128 * 1024 * 1024,
        max_depth: 1_000,
        every: Duration::from_secs(10),
    };
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    integration TEXT NOT NULL,
    stream TEXT NOT NULL,
    timestamp_field TEXT NOT NULL,
    rule TEXT NOT NULL,
    rules_version TEXT NOT NULL,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    body BLOB NOT NULL,
    input BLOB NOT NULL,
    traceparent TEXT,
    accepted_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    history TEXT NOT NULL DEFAULT '[]',
    due_ms INTEGER NOT NULL
);
DROP INDEX IF EXISTS records_due;
CREATE TABLE IF NOT EXISTS dedup_log (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, keys BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    integration TEXT NOT NULL,
    stream TEXT NOT NULL,
    timestamp_field TEXT NOT NULL,
    rule TEXT NOT NULL,
    rules_version TEXT NOT NULL,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    body BLOB NOT NULL,
    input BLOB NOT NULL,
    traceparent TEXT,
    accepted_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    history TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters (at_ms);
";

const RECORD_COLUMNS: &str = "id, integration, stream, timestamp_field, rule, rules_version, source, event_id, \
     event_type, body, input, traceparent, accepted_ms, attempts, history";
/// The columns of `dead_letters`.
const DEAD_LETTER_COLUMNS: &str = "id, integration, stream, timestamp_field, rule, rules_version, source, \
     event_id, event_type, body, input, traceparent, accepted_ms, attempts, history, reason, at_ms";

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Op {
    /// Events with the hashes of their dedup keys (computed by the caller, off the writer).
    Enqueue(Vec<EventRecords>, Vec<Option<KeyHash>>, Reply<Enqueued>),
    Lease(usize, HashSet<String>, Reply<Vec<QueuedRecord>>),
    Ack(Vec<RecordId>, Reply<()>),
    Retry(Vec<QueuedRecord>, i64, Reply<()>),
    DeadLetter(Vec<QueuedRecord>, String, Reply<()>),
    DeadLetters(DeadLetterFilter, Reply<Vec<DeadLetter>>),
    DeadLetterIds(DeadLetterFilter, Reply<Vec<i64>>),
    Replay(Vec<Replay>, Reply<Vec<i64>>),
    DeadLettersById(Vec<i64>, Reply<Vec<DeadLetter>>),
    NextDue(HashSet<String>, Reply<Option<i64>>),
    Expedite(String, Reply<usize>),
    Oldest(Reply<Option<i64>>),
}

impl Op {
    /// Answers the operation with `e` without doing it.
    fn refuse(self, e: &QueueError) {
        let e = e.clone();
        match self {
            Op::Enqueue(_, _, reply) => drop(reply.send(Err(e))),
            Op::Lease(_, _, reply) => drop(reply.send(Err(e))),
            Op::Ack(_, reply) => drop(reply.send(Err(e))),
            Op::Retry(_, _, reply) => drop(reply.send(Err(e))),
            Op::DeadLetter(_, _, reply) => drop(reply.send(Err(e))),
            Op::DeadLetters(_, reply) => drop(reply.send(Err(e))),
            Op::DeadLetterIds(_, reply) => drop(reply.send(Err(e))),
            Op::Replay(_, reply) => drop(reply.send(Err(e))),
            Op::DeadLettersById(_, reply) => drop(reply.send(Err(e))),
            Op::NextDue(_, reply) => drop(reply.send(Err(e))),
            Op::Expedite(_, reply) => drop(reply.send(Err(e))),
            Op::Oldest(reply) => drop(reply.send(Err(e))),
        }
    }
}

/// The SQLite-backed queue.
pub struct SqliteQueue {
    ops: mpsc::Sender<Op>,
    depth: Arc<AtomicUsize>,
    work: Arc<Notify>,
    /// Set once the log could not be synced.
    failure: Failure,
    /// The database and its log, as SQLite names them.
    files: [std::path::PathBuf; 2],
    /// The database file's device and inode at open: a file gone from its path, or another in
    /// its place, means what is committed from then on is lost at exit.
    identity: Option<(u64, u64)>,
    /// Event ids the dedup index remembers, as of the last commit.
    dedup_ids: Arc<AtomicUsize>,
    /// The most records it holds.
    capacity: usize,
    /// Checkpoints run, by whom.
    #[cfg(test)]
    checkpoints: Arc<Counts>,
}

impl SqliteQueue {
    /// Opens (or creates) the queue at `path`; every stored record waits again, whatever a
    /// previous process had leased.
    pub fn open(path: &Path, capacity: usize, dedup: impl Into<Dedup>) -> Result<Self, QueueError> {
        Self::open_with(
            path,
            capacity,
            dedup.into(),
            (Limits::DEFAULT, Compaction::DEFAULT),
            WalSync::for_file,
        )
        .map_err(|e| match e {
            // Name the file, and what can be done, when it cannot be used at all.
            QueueError::Store(why) if why.contains("malformed") || why.contains("not a database") => {
                QueueError::Store(format!(
                    "the queue's database `{}` is damaged ({why}): restore it from a backup, or \
                     move it (and its -wal file) aside to start with an empty queue, losing the \
                     records it held",
                    path.display()
                ))
            }
            other => other,
        })
    }

    /// `open`, with the checkpoint limits, when to compact, and the way the log is synced given.
    fn open_with(
        path: &Path,
        capacity: usize,
        dedup: Dedup,
        (checkpoints, compaction): (Limits, Compaction),
        syncer: impl FnOnce(std::fs::File) -> Result<WalSync, QueueError>,
    ) -> Result<Self, QueueError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| QueueError::Store(format!("cannot create `{}`: {e}", dir.display())))?;
        }
        let mut conn =
            Connection::open(path).map_err(|e| store(format!("cannot open `{}`", path.display()), e))?;
        // Queued events carry personal data (emails, addresses): owner-only, as the admin token
        // and the integration store are. SQLite gives its log and shared-memory files the
        // database file's mode when it creates them.
        restrict_to_owner(path);
        conn.execute_batch(
            "PRAGMA page_size = 16384; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = OFF;
             PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;",
        )
        .map_err(|e| store("cannot configure the store", e))?;
        check_schema_version(&conn, path)?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| store("cannot create the schema", e))?;
        check_columns(&conn, path)?;
        never_reuse_dead_letter_ids(&mut conn).map_err(|e| store("cannot migrate the dead letters", e))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| store("cannot record the schema version", e))?;
        let schedule = Schedule::load(&conn).map_err(|e| store("cannot read the queued records", e))?;
        let seen = load_seen(&mut conn, dedup).map_err(|e| store("cannot read the dedup log", e))?;
        for suffix in ["-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            restrict_to_owner(Path::new(&file));
        }
        let synced = syncer(open_log(&conn)?)?;
        // Named as `open_log` found them (it fails for a database without a file).
        let db = conn.path().unwrap_or_default();
        let files: [std::path::PathBuf; 2] = [db.into(), format!("{db}-wal").into()];
        let identity = file_identity(&files[0]);
        let failure = synced.failure();
        let counts = Arc::new(Counts::default());
        let checkpointer =
            Checkpointer::start(path, &mut conn, checkpoints, counts.clone(), failure.clone())?;
        let depth = Arc::new(AtomicUsize::new(schedule.waiting()));
        let dedup_ids = Arc::new(AtomicUsize::new(seen.len()));
        let work = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(PENDING_MAX);
        let writer = Writer {
            conn,
            synced,
            checkpointer,
            capacity,
            seen,
            dedup_ids: dedup_ids.clone(),
            dedup_rows_to_delete: 0,
            last_early_warning: None,
            depth: depth.clone(),
            work: work.clone(),
            next_expiry: std::time::Instant::now(),
            compaction,
            next_compaction_check: std::time::Instant::now(),
            log_to_empty: false,
            schedule,
            pending_acks: Vec::new(),
            next_pending_ack: std::time::Instant::now(),
        };
        std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| QueueError::Store(format!("cannot start the queue writer: {e}")))?;
        Ok(SqliteQueue {
            ops: tx,
            depth,
            work,
            failure,
            files,
            identity,
            dedup_ids,
            capacity,
            #[cfg(test)]
            checkpoints: counts,
        })
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(op(tx)).await.map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }
}

/// The queue file's layout, as `PRAGMA user_version` records it (0: a file from before the
/// version was recorded, which the migrations at open bring up to this one).
const SCHEMA_VERSION: i64 = 1;

/// Refuses a file a newer relay wrote: its layout may mean things this one cannot know.
fn check_schema_version(conn: &Connection, path: &Path) -> Result<(), QueueError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| store(format!("cannot read `{}`", path.display()), e))?;
    if version > SCHEMA_VERSION {
        return Err(QueueError::Store(format!(
            "the queue's database `{}` has layout version {version}, written by a newer \
             lytics-relay; this one knows up to {SCHEMA_VERSION}: run the newer version (it \
             delivers what is queued), or move the file aside",
            path.display()
        )));
    }
    Ok(())
}

/// Refuses a file whose tables lack a column this relay reads or writes, naming it, rather
/// than starting and failing every operation.
fn check_columns(conn: &Connection, path: &Path) -> Result<(), QueueError> {
    for (table, columns) in [
        ("records", format!("{RECORD_COLUMNS}, due_ms")),
        ("dead_letters", DEAD_LETTER_COLUMNS.to_string()),
    ] {
        let mut present = std::collections::HashSet::new();
        let mut stmt = conn
            .prepare(&format!("PRAGMA table_info({table})"))
            .map_err(|e| store("cannot read the schema", e))?;
        let mut rows = stmt.query([]).map_err(|e| store("cannot read the schema", e))?;
        while let Some(row) = rows.next().map_err(|e| store("cannot read the schema", e))? {
            present.insert(
                row.get::<_, String>(1)
                    .map_err(|e| store("cannot read the schema", e))?,
            );
        }
        let missing: Vec<&str> = columns
            .split(',')
            .map(str::trim)
            .filter(|c| !present.contains(*c))
            .collect();
        if !missing.is_empty() {
            return Err(QueueError::Store(format!(
                "the queue's database `{}` is not one this relay can use: table `{table}` lacks \
                 {}; was it written by another program or version?",
                path.display(),
                missing.join(", ")
            )));
        }
    }
    Ok(())
}

/// Dead letters are replayed by id, so an id must never name a second dead letter: a table
/// from before `AUTOINCREMENT` (where SQLite reuses the highest id once it is deleted) is
/// rebuilt with it, keeping every row and id.
fn never_reuse_dead_letter_ids(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    let sql: String = conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'",
        [],
        |r| r.get(0),
    )?;
    if sql.contains("AUTOINCREMENT") {
        return Ok(());
    }
    let txn = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    txn.execute_batch(&format!(
        "ALTER TABLE dead_letters RENAME TO dead_letters_before;
         DROP INDEX IF EXISTS dead_letters_at;
         {create}
         INSERT INTO dead_letters ({DEAD_LETTER_COLUMNS}) SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters_before;
         DROP TABLE dead_letters_before;
         CREATE INDEX dead_letters_at ON dead_letters (at_ms);",
        create = SCHEMA
            .split_once("CREATE TABLE IF NOT EXISTS dead_letters")
            .and_then(|(_, rest)| rest.split_once(';'))
            .map(|(columns, _)| format!("CREATE TABLE dead_letters{columns};"))
            .unwrap_or_default()
    ))?;
    txn.commit()?;
    tracing::info!("dead-letter ids are never reused from now on (table rebuilt with AUTOINCREMENT)");
    Ok(())
}

/// A file's device and inode, if it exists.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether the file at `path` is gone or another than `was`; a path that cannot be looked at
/// (permissions) says nothing either way.
fn file_replaced(path: &Path, was: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(path) {
        Ok(m) => (m.dev(), m.ino()) != was,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Rebuilds the dedup index from `dedup_log`, forgetting (and deleting) what has expired. A database from before the log keeps its ids:
/// the newest `max_ids` of its `dedup` table move into the log first.
fn load_seen(conn: &mut Connection, dedup: Dedup) -> Result<Seen, rusqlite::Error> {
    let txn = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let former: i64 = txn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'dedup'",
        [],
        |r| r.get(0),
    )?;
    if former > 0 {
        let moved = move_former_dedup(&txn, dedup)?;
        tracing::info!(
            ids = moved,
            "moved the dedup ids of the former dedup table into the dedup log"
        );
    }
    let mut seen = Seen::new(dedup);
    let mut forgotten = 0;
    let mut early = 0;
    let now = now_ms();
    {
        let mut read = txn.prepare("SELECT id, at_ms, keys FROM dedup_log ORDER BY id")?;
        let mut rows = read.query([])?;
        while let Some(row) = rows.next()? {
            let (id, at_ms): (i64, i64) = (row.get(0)?, row.get(1)?);
            let keys = row.get_ref(2)?.as_blob()?;
            if keys.len() % 16 != 0 {
                return Err(rusqlite::Error::FromSqlConversionFailure(
                    2,
                    Type::Blob,
                    format!(
                        "dedup log row {id} holds {} bytes, not 16-byte hashes",
                        keys.len()
                    )
                    .into(),
                ));
            }
            for key in keys.chunks_exact(16) {
                let mut hash = [0u8; 16];
                hash.copy_from_slice(key);
                seen.insert(u128::from_be_bytes(hash), at_ms, id);
            }
            // A log longer than the bound never holds much more than it in memory.
            if seen.len() > seen.max_ids() {
                let expired = seen.expire(now);
                forgotten = forgotten.max(expired.last_row);
                early += expired.early.map_or(0, |(n, _)| n);
            }
        }
    }
    let expired = seen.expire(now);
    forgotten = forgotten.max(expired.last_row);
    early += expired.early.map_or(0, |(n, _)| n);
    if early > 0 {
        tracing::warn!(
            forgotten = early,
            max_ids = seen.max_ids(),
            "the dedup log held more ids of the window than queue.dedup_max_ids: the oldest were \
             forgotten, so a sender retrying one of them now gets it accepted twice"
        );
    }
    if forgotten > 0 {
        txn.execute("DELETE FROM dedup_log WHERE id <= ?1", params![forgotten])?;
    }
    txn.commit()?;
    Ok(seen)
}

/// Moves the keys of the former `dedup` table (one row a key, by text) still within the window,
/// the newest `max_ids` at most, into `dedup_log`, a row per 4,096, and drops the table;
/// returns how many moved.
fn move_former_dedup(txn: &Transaction<'_>, dedup: Dedup) -> Result<usize, rusqlite::Error> {
    let limit = i64::try_from(dedup.max_ids).unwrap_or(i64::MAX);
    let window = i64::try_from(dedup.window.as_millis()).unwrap_or(i64::MAX);
    let since: Option<i64> = txn
        .query_row(
            "SELECT at_ms FROM dedup ORDER BY at_ms DESC LIMIT 1 OFFSET ?1",
            params![limit - 1],
            |r| r.get(0),
        )
        .optional()?;
    let mut log = txn.prepare("INSERT INTO dedup_log (at_ms, keys) VALUES (?1, ?2)")?;
    let mut read = txn.prepare("SELECT key, at_ms FROM dedup WHERE at_ms >= ?1 ORDER BY at_ms")?;
    let since = since.unwrap_or(i64::MIN).max(now_ms().saturating_sub(window));
    let mut rows = read.query(params![since])?;
    // A row is as old as its newest key, so each key is remembered at least its window; a row
    // spans at most an eighth of the window, so at most that much longer.
    let span = (window / 8).max(1);
    let (mut chunk, mut oldest, mut newest, mut moved) = (Vec::new(), i64::MIN, i64::MIN, 0);
    while let Some(row) = rows.next()? {
        let (key, at_ms): (String, i64) = (row.get(0)?, row.get(1)?);
        if !chunk.is_empty() && (chunk.len() == 4096 * 16 || at_ms.saturating_sub(oldest) >= span) {
            log.execute(params![newest, std::mem::take(&mut chunk)])?;
        }
        if chunk.is_empty() {
            oldest = at_ms;
        }
        chunk.extend_from_slice(&key_hash(&key).to_be_bytes());
        newest = newest.max(at_ms);
        moved += 1;
    }
    if !chunk.is_empty() {
        log.execute(params![newest, chunk])?;
    }
    drop(rows);
    txn.execute_batch("DROP TABLE dedup")?;
    Ok(moved)
}

/// Opens the log file of `conn`'s database for syncing it, and syncs the directory entry of a
/// log SQLite has just created (SQLite would do so at its first sync of the log, which
/// `synchronous=NORMAL` leaves to checkpoints). The name is the one SQLite gives the log: its
/// full path of the database (symbolic links resolved) with `-wal` appended.
fn open_log(conn: &Connection) -> Result<std::fs::File, QueueError> {
    let db = conn
        .path()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| QueueError::Store("the queue's database has no file".into()))?;
    let name = format!("{db}-wal");
    let wal = std::fs::File::open(&name)
        .map_err(|e| QueueError::Store(format!("cannot open the queue's log `{name}`: {e}")))?;
    // SQLite's path is a full one, so it always has a parent.
    let dir = Path::new(db).parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
        QueueError::Store(format!(
            "cannot sync the queue's directory `{}`: {e}",
            dir.display()
        ))
    })?;
    Ok(wal)
}

/// Makes `path` readable and writable by its owner only (a file already there may have been
/// created before this was done).
fn restrict_to_owner(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %path.display(), error = %e, "cannot make the queue file owner-only");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn store(what: impl std::fmt::Display, e: rusqlite::Error) -> QueueError {
    QueueError::Store(format!("{what}: {e}"))
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(&self, events: Vec<EventRecords>) -> Result<Vec<bool>, QueueError> {
        let keys = key_hashes(&events);
        let enqueued = self.call(|r| Op::Enqueue(events, keys, r)).await?;
        // Freed here, on the thread that most likely allocated them, not on the writer.
        drop(enqueued.spare);
        Ok(enqueued.duplicates)
    }

    async fn lease(&self, max: usize, skip: &HashSet<String>) -> Result<Vec<QueuedRecord>, QueueError> {
        self.call(|r| Op::Lease(max, skip.clone(), r)).await
    }

    async fn ack(&self, ids: &[RecordId]) -> Result<(), QueueError> {
        self.call(|r| Op::Ack(ids.to_vec(), r)).await
    }

    async fn retry(
        &self,
        records: Vec<QueuedRecord>,
        due_ms: i64,
        attempt: Attempt,
    ) -> Result<(), QueueError> {
        let count_attempt = attempt.kind == AttemptKind::Spent;
        let records = records
            .into_iter()
            .map(|mut q| {
                if count_attempt {
                    q.attempts += 1;
                }
                q.history.push(attempt.clone());
                q
            })
            .collect();
        self.call(|r| Op::Retry(records, due_ms, r)).await
    }

    async fn dead_letter(&self, records: Vec<QueuedRecord>, reason: String) -> Result<(), QueueError> {
        self.call(|r| Op::DeadLetter(records, reason, r)).await
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
        self.call(|r| Op::DeadLetters(filter, r)).await
    }

    async fn replay_records(&self, replays: &[Replay]) -> Result<Vec<i64>, QueueError> {
        self.call(|r| Op::Replay(replays.to_vec(), r)).await
    }

    async fn dead_letter_ids(&self, filter: DeadLetterFilter) -> Result<Vec<i64>, QueueError> {
        self.call(|r| Op::DeadLetterIds(filter, r)).await
    }

    async fn dead_letters_by_id(&self, ids: &[i64]) -> Result<Vec<DeadLetter>, QueueError> {
        self.call(|r| Op::DeadLettersById(ids.to_vec(), r)).await
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    async fn expedite(&self, integration: &str) -> Result<usize, QueueError> {
        let integration = integration.to_string();
        self.call(|r| Op::Expedite(integration, r)).await
    }

    async fn next_due(&self, skip: &HashSet<String>) -> Result<Option<i64>, QueueError> {
        self.call(|r| Op::NextDue(skip.clone(), r)).await
    }

    fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    fn durable(&self) -> bool {
        true
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }

    async fn oldest_accepted_ms(&self) -> Result<Option<i64>, QueueError> {
        self.call(Op::Oldest).await
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn fault(&self) -> Option<String> {
        if self.failure.get().is_none()
            && let Some(was) = self.identity
            && file_replaced(&self.files[0], was)
        {
            // Deleted (a cleanup of the data directory) or replaced: commits go to a file no
            // path leads to, which is gone at exit. Acknowledging more would lose it.
            super::wal_sync::fail(
                &self.failure,
                "the queue's database file was deleted or replaced while the relay ran: what \
                 was stored since is lost when the relay exits"
                    .to_string(),
            );
        }
        self.failure.get().cloned()
    }

    fn dedup_ids(&self) -> Option<usize> {
        Some(self.dedup_ids.load(Ordering::Relaxed))
    }

    fn disk_bytes(&self) -> Option<u64> {
        Some(
            self.files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum(),
        )
    }
}

struct Writer {
    conn: Connection,
    /// Syncs the log and then answers each committed group.
    synced: WalSync,
    checkpointer: Checkpointer,
    capacity: usize,
    /// The dedup keys accepted within the window (committed ones only).
    seen: Seen,
    /// `seen`'s size, for metrics.
    dedup_ids: Arc<AtomicUsize>,
    /// `dedup_log` rows up to this id hold only forgotten keys and are not deleted yet (0: none).
    dedup_rows_to_delete: i64,
    /// When the dedup bound last forgot keys younger than the window (warned about).
    last_early_warning: Option<std::time::Instant>,
    depth: Arc<AtomicUsize>,
    work: Arc<Notify>,
    /// When the writer next forgets expired dedup ids (once a second, by the monotonic clock:
    /// a wall clock stepped back must not stop expiry and with it the bound).
    next_expiry: std::time::Instant,
    compaction: Compaction,
    next_compaction_check: std::time::Instant,
    /// A compaction's `TRUNCATE` checkpoint gave up (a checkpointer pass was running).
    log_to_empty: bool,
    schedule: Schedule,
    /// Delivered records whose ack failed to commit: deleted again later, never redelivered.
    pending_acks: Vec<RecordId>,
    /// When to try them again.
    next_pending_ack: std::time::Instant,
}

/// A waiting record's place in its integration's order: (due time in unix ms, id).
type Slot = (i64, i64);

/// A record that waits from the commit of the transaction that queued it (or put it back).
struct Waiting {
    integration: Arc<str>,
    due_ms: i64,
    id: i64,
    /// The record itself, when it is new and kept in memory for its lease.
    record: Option<QueuedRecord>,
}

/// How long records whose retry or dead letter failed to commit wait before they are leased
/// again.
const SETTLE_RETRY_MS: i64 = 30_000;

/// The writer's view of the records that wait (queued, not leased): per integration, their
/// (due time, id) in order, and the new records kept in memory until leased.
///
/// Invariants: every row of `records` is either in exactly one integration's set or leased by
/// this process; a lease moves it out of its set (no write), an ack or dead letter deletes the
/// leased row, a retry puts it back with its new due time. The table's `due_ms` is the time
/// the record was last scheduled for: an expedite brings records forward here only, so after a
/// restart they keep their scheduled time until delivery expedites them again.
#[derive(Default)]
struct Schedule {
    by_integration: HashMap<Arc<str>, BTreeSet<Slot>>,
    fresh: HashMap<i64, QueuedRecord>,
    fresh_bytes: usize,
    /// Records waiting again after their settling failed, with their slot: settled after all
    /// (an operation repeated once the disk has room), they leave their set.
    unsettled: HashMap<i64, (Arc<str>, i64)>,
}

impl Schedule {
    /// Every stored record waits again.
    fn load(conn: &Connection) -> Result<Self, rusqlite::Error> {
        let mut schedule = Schedule::default();
        let mut stmt = conn.prepare("SELECT id, integration, due_ms FROM records")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let integration: String = row.get(1)?;
            schedule.wait(Waiting {
                integration: Arc::from(integration),
                due_ms: row.get(2)?,
                id: row.get(0)?,
                record: None,
            });
        }
        Ok(schedule)
    }

    fn waiting(&self) -> usize {
        self.by_integration.values().map(BTreeSet::len).sum()
    }

    /// `w` waits; its record, if it has one, is kept in memory (the caller staged it within
    /// the room [`FRESH_MAX_BYTES`] leaves).
    fn wait(&mut self, w: Waiting) {
        if let Some(record) = w.record {
            self.fresh_bytes += record.record.body.len() + record.record.input.len();
            self.fresh.insert(w.id, record);
        }
        match self.by_integration.get_mut(&*w.integration) {
            Some(set) => {
                set.insert((w.due_ms, w.id));
            }
            None => {
                self.by_integration
                    .insert(w.integration, BTreeSet::from([(w.due_ms, w.id)]));
            }
        }
    }

    /// Takes up to `max` records due at `now`, not of a `skip` integration, earliest first.
    fn take(&mut self, max: usize, skip: &HashSet<String>, now: i64) -> Vec<(Arc<str>, Slot)> {
        let mut active: Vec<_> = self
            .by_integration
            .iter_mut()
            .filter(|(i, set)| !set.is_empty() && !skip.contains(&***i))
            .collect();
        let mut taken = Vec::new();
        while taken.len() < max {
            let best = active
                .iter()
                .enumerate()
                .filter_map(|(n, (_, set))| set.first().filter(|(due, _)| *due <= now).map(|k| (n, *k)))
                .min_by_key(|(_, k)| *k);
            let Some((n, key)) = best else { break };
            active[n].1.pop_first();
            taken.push((active[n].0.clone(), key));
        }
        taken
    }

    /// The record kept in memory for `id`, if any.
    fn take_fresh(&mut self, id: i64) -> Option<QueuedRecord> {
        let record = self.fresh.remove(&id)?;
        self.fresh_bytes -= record.record.body.len() + record.record.input.len();
        Some(record)
    }

    /// Records whose settling failed to commit wait again, due at `due_ms` (their rows are as
    /// they were before).
    fn unsettle(&mut self, records: Vec<(i64, Arc<str>)>, due_ms: i64) {
        for (id, integration) in records {
            if self.unsettled.contains_key(&id) {
                continue;
            }
            self.unsettled.insert(id, (integration.clone(), due_ms));
            self.wait(Waiting {
                integration,
                due_ms,
                id,
                record: None,
            });
        }
    }

    /// Records settled by a committed operation: neither leased nor waiting any more (a retry
    /// makes them wait again afterwards, at their new time).
    fn settled(&mut self, ids: impl Iterator<Item = i64>) {
        if self.unsettled.is_empty() {
            return;
        }
        for id in ids {
            let id = &id;
            // By id: an expedite may have moved the slot since it was unsettled.
            if let Some((integration, _)) = self.unsettled.remove(id)
                && let Some(set) = self.by_integration.get_mut(&integration)
            {
                set.retain(|(_, waiting)| waiting != id);
            }
        }
    }

    /// Records leased by a committed operation (no longer waiting after a failed settle).
    fn leased(&mut self, taken: &[(Arc<str>, Slot)]) {
        if self.unsettled.is_empty() {
            return;
        }
        for (_, (_, id)) in taken {
            self.unsettled.remove(id);
        }
    }

    /// Puts taken records back (their lease failed).
    fn untake(&mut self, taken: Vec<(Arc<str>, Slot)>) {
        for (integration, (due_ms, id)) in taken {
            self.wait(Waiting {
                integration,
                due_ms,
                id,
                record: None,
            });
        }
    }

    fn next_due(&self, skip: &HashSet<String>) -> Option<i64> {
        self.by_integration
            .iter()
            .filter(|(i, _)| !skip.contains(&***i))
            .filter_map(|(_, set)| set.first().map(|(due, _)| *due))
            .min()
    }

    /// Makes `integration`'s records due later than `now` due now; returns how many.
    fn expedite(&mut self, integration: &str, now: i64) -> usize {
        let Some(set) = self.by_integration.get_mut(integration) else {
            return 0;
        };
        let later = set.split_off(&(now.saturating_add(1), i64::MIN));
        let n = later.len();
        set.extend(later.into_iter().map(|(_, id)| (now, id)));
        n
    }
}

fn pending<T: Send + 'static>(reply: Reply<T>, result: Result<T, QueueError>) -> Pending {
    Box::new(move |commit_error: Option<&QueueError>| {
        let _ = reply.send(match commit_error {
            Some(e) => Err(e.clone()),
            None => result,
        });
    })
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let drain = |rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>| {
            while ops.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
        };
        let mut last_enqueues = 0;
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            drain(&mut rx, &mut ops);
            // Group commit under concurrent load: when the last commit served several callers,
            // wait a little for more to join this one. Each commit costs an fsync and rewrites
            // the last, partly filled page, so fewer, larger commits save CPU; a caller waits at
            // most LINGER longer. A lone sender (one call per commit) never waits.
            if last_enqueues >= LINGER_MIN_CALLERS {
                for _ in 0..LINGER_NAPS {
                    if records_in(&ops) >= LINGER_UNTIL_RECORDS {
                        break;
                    }
                    std::thread::sleep(LINGER / LINGER_NAPS);
                    drain(&mut rx, &mut ops);
                }
            }
            last_enqueues = ops.iter().filter(|op| matches!(op, Op::Enqueue(..))).count();
            self.group(ops);
        }
        // Answer what is committed, then close the connection, which drops its commit hook,
        // the checkpointer's only caller.
        let Writer {
            conn,
            synced,
            checkpointer,
            ..
        } = self;
        synced.finish();
        drop(conn);
        checkpointer.join();
    }

    /// Runs a group of operations in one transaction and answers them once the commit is
    /// durable (or at once, if it failed).
    fn group(&mut self, ops: Vec<Op>) {
        // The log may have lost writes: nothing is done, so a sender's retry is not stored twice
        // while it is told each time that its event was not.
        if let Some(why) = self.synced.failed() {
            let refused = QueueError::Store(why.clone());
            for op in ops {
                op.refuse(&refused);
            }
            return;
        }
        self.retry_pending_acks();
        let changes_before = self.conn.total_changes();
        let mut depth = self.depth.load(Ordering::Relaxed);
        let mut answers: Vec<Pending> = Vec::with_capacity(ops.len());
        let mut woke = false;
        let now = now_ms();
        // Records that wait once the transaction commits, and records leased in it (put back
        // should it fail).
        let mut staged: Vec<Waiting> = Vec::new();
        let mut taken = Vec::new();
        // Dedup keys this transaction stores.
        let mut marked = Marked::default();
        let at = std::time::Instant::now();
        if at >= self.next_expiry {
            self.next_expiry = at + Duration::from_secs(1);
            self.forget_expired_keys(now);
        }
        let forgotten = self.dedup_rows_to_delete;
        // The leased records this group settles: acked, and retried or dead-lettered.
        let mut acking: Vec<RecordId> = Vec::new();
        let mut rescheduling: Vec<(i64, Arc<str>)> = Vec::new();
        for op in &ops {
            match op {
                Op::Ack(ids, _) => acking.extend_from_slice(ids),
                Op::Retry(records, ..) | Op::DeadLetter(records, ..) => {
                    rescheduling.extend(records.iter().map(|q| {
                        (
                            i64::try_from(q.id).unwrap_or(i64::MAX),
                            q.record.integration.clone(),
                        )
                    }))
                }
                _ => {}
            }
        }
        let schedule = &mut self.schedule;
        // Bytes of new records this transaction may keep in memory for their lease.
        let mut room = FRESH_MAX_BYTES.saturating_sub(schedule.fresh_bytes);
        let seen = &self.seen;
        let result = (|| -> Result<(), rusqlite::Error> {
            // Immediate: the write lock is taken (waiting out a checkpointer that briefly holds
            // it) before anything is read, never in the middle of the transaction.
            let txn = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for op in ops {
                match op {
                    Op::Enqueue(events, keys, reply) => {
                        let r = enqueue(
                            &txn,
                            (events, keys),
                            now,
                            self.capacity,
                            (seen, &mut marked),
                            &mut depth,
                            (&mut staged, &mut room),
                        )?;
                        woke |= r.as_ref().is_ok_and(|e| e.duplicates.iter().any(|dup| !dup));
                        answers.push(pending(reply, r));
                    }
                    Op::Lease(max, skip, reply) => {
                        let r = lease(&txn, schedule, max, &skip, now, &mut taken);
                        answers.push(pending(reply, r));
                    }
                    // A statement failing in a change fails the whole transaction (every
                    // operation in it is answered with the error), so no change is left half
                    // done: a record copied to the dead letters but not deleted, a call's
                    // records partly stored with its ids marked.
                    Op::Ack(ids, reply) => {
                        ack(&txn, &ids, &mut depth)?;
                        answers.push(pending(reply, Ok(())));
                    }
                    Op::Retry(records, due, reply) => {
                        woke = true;
                        retry(&txn, &records, due, &mut staged)?;
                        answers.push(pending(reply, Ok(())));
                    }
                    Op::DeadLetter(records, reason, reply) => {
                        dead_letter(&txn, &records, &reason, now, &mut depth)?;
                        answers.push(pending(reply, Ok(())));
                    }
                    Op::DeadLetters(filter, reply) => {
                        answers.push(pending(reply, dead_letters(&txn, &filter)))
                    }
                    Op::DeadLetterIds(filter, reply) => {
                        answers.push(pending(reply, dead_letter_ids(&txn, &filter)))
                    }
                    Op::DeadLettersById(ids, reply) => {
                        answers.push(pending(reply, dead_letters_by_id(&txn, &ids)))
                    }
                    Op::Replay(replays, reply) => {
                        woke = true;
                        let ids: Vec<i64> = replays.iter().map(|r| r.id).collect();
                        let r = if depth + dead_letters_among(&txn, &ids)? > self.capacity {
                            Err(QueueError::Full {
                                capacity: self.capacity,
                            })
                        } else {
                            Ok(replay(&txn, &replays, now, &mut depth, &mut staged)?)
                        };
                        answers.push(pending(reply, r));
                    }
                    Op::NextDue(skip, reply) => answers.push(pending(reply, Ok(schedule.next_due(&skip)))),
                    Op::Expedite(integration, reply) => {
                        let n = schedule.expedite(&integration, now);
                        woke |= n > 0;
                        answers.push(pending(reply, Ok(n)));
                    }
                    Op::Oldest(reply) => answers.push(pending(reply, oldest(&txn))),
                }
            }
            if !marked.order.is_empty() {
                let keys: Vec<u8> = marked.order.iter().flat_map(|k| k.to_be_bytes()).collect();
                txn.prepare_cached("INSERT INTO dedup_log (at_ms, keys) VALUES (?1, ?2)")?
                    .execute(params![now, keys])?;
                marked.row = txn.last_insert_rowid();
            }
            if forgotten > 0 {
                txn.prepare_cached("DELETE FROM dedup_log WHERE id <= ?1")?
                    .execute(params![forgotten])?;
            }
            txn.commit()
        })();
        let commit_error = result.err().map(|e| store("commit failed", e));
        match &commit_error {
            None => {
                self.depth.store(depth, Ordering::Relaxed);
                let ids = acking.iter().map(|id| i64::try_from(*id).unwrap_or(i64::MAX));
                self.schedule
                    .settled(ids.chain(rescheduling.iter().map(|(id, _)| *id)));
                self.schedule.leased(&taken);
                for w in staged {
                    self.schedule.wait(w);
                }
                for key in marked.order {
                    self.seen.insert(key, now, marked.row);
                }
                self.dedup_ids.store(self.seen.len(), Ordering::Relaxed);
                self.dedup_rows_to_delete = 0;
            }
            Some(e) => {
                tracing::error!(error = %e, "queue transaction failed; its operations were refused");
                self.schedule.untake(taken);
                // Records it would have acked are delivered: they stay leased, and their delete
                // is tried again apart (a full disk must not make delivery send them again and
                // again). Records it would have retried or dead-lettered are unchanged in the
                // table: they wait again, and are delivered after a pause.
                self.pending_acks.extend(acking);
                let acked: HashSet<i64> = self
                    .pending_acks
                    .iter()
                    .filter_map(|id| i64::try_from(*id).ok())
                    .collect();
                rescheduling.retain(|(id, _)| !acked.contains(id));
                if !rescheduling.is_empty() {
                    self.schedule.unsettle(rescheduling, now + SETTLE_RETRY_MS);
                    self.work.notify_one();
                }
            }
        }
        match commit_error {
            None => {
                let wrote = self.conn.total_changes() != changes_before;
                self.synced.committed(answers, wrote);
                if woke {
                    self.work.notify_one();
                }
                if depth <= self.compaction.max_depth {
                    let at = std::time::Instant::now();
                    if at >= self.next_compaction_check {
                        self.next_compaction_check = at + self.compaction.every;
                        self.compact_if_mostly_free();
                    }
                }
            }
            Some(e) => {
                for answer in answers {
                    answer(Some(&e));
                }
            }
        }
    }
}

impl Writer {
    /// Deletes delivered records whose ack failed to commit, at most once a second, in a
    /// transaction of their own (so that a delete that keeps failing holds up nothing else).
    fn retry_pending_acks(&mut self) {
        if self.pending_acks.is_empty() || std::time::Instant::now() < self.next_pending_ack {
            return;
        }
        let mut depth = self.depth.load(Ordering::Relaxed);
        let ids = std::mem::take(&mut self.pending_acks);
        let result = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .and_then(|txn| {
                ack(&txn, &ids, &mut depth)?;
                txn.commit()
            });
        match result {
            Ok(()) => {
                self.depth.store(depth, Ordering::Relaxed);
                self.schedule
                    .settled(ids.iter().map(|id| i64::try_from(*id).unwrap_or(i64::MAX)));
                tracing::info!(
                    records = ids.len(),
                    "deleted delivered records whose ack had failed"
                );
            }
            Err(e) => {
                static LOGGED: Throttle = Throttle::new(10_000);
                if LOGGED.pass().is_some() {
                    tracing::error!(error = %e, records = ids.len(), "cannot delete delivered records (their ack failed); retrying every second");
                }
                self.pending_acks = ids;
                self.next_pending_ack = std::time::Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// Forgets the dedup keys past the window (or the bound); the next transaction deletes
    /// their log rows.
    fn forget_expired_keys(&mut self, now: i64) {
        let expired = self.seen.expire(now);
        self.dedup_rows_to_delete = self.dedup_rows_to_delete.max(expired.last_row);
        let Some((forgotten, left)) = expired.early else {
            return;
        };
        let at = std::time::Instant::now();
        if self
            .last_early_warning
            .is_some_and(|t| at.duration_since(t) < EARLY_WARNING_EVERY)
        {
            return;
        }
        self.last_early_warning = Some(at);
        tracing::warn!(
            forgotten,
            remembered_secs = left.as_secs(),
            max_ids = self.seen.max_ids(),
            "the dedup index is full (queue.dedup_max_ids): event ids were forgotten before the dedup \
             window ran out, so a sender retrying one of them now gets it accepted twice; raise \
             queue.dedup_max_ids (about 25 bytes of memory an id) or shorten queue.dedup_window_secs"
        );
    }

    /// Compacts the database when [`Compaction`] says its free pages are worth giving back, or
    /// empties the log a compaction left full.
    /// Committed operations are unaffected: `VACUUM` keeps every row and its id, and the
    /// checkpoint syncs the log before copying it and the database after.
    fn compact_if_mostly_free(&mut self) {
        let pages = |conn: &Connection| -> Result<(i64, i64, i64), rusqlite::Error> {
            let read = |pragma: &str| conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get::<_, i64>(0));
            Ok((read("freelist_count")?, read("page_count")?, read("page_size")?))
        };
        let (free, total, page_size) = match pages(&self.conn) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the queue's free pages; not compacting");
                return;
            }
        };
        if free.saturating_mul(page_size) < self.compaction.min_free_bytes || free * 2 < total {
            if self.log_to_empty && self.empty_log() {
                tracing::info!("emptied the queue's log after compacting its database");
            }
            return;
        }
        let started = std::time::Instant::now();
        // VACUUM builds its copy of what is left in a temporary database: in memory when that is
        // small, else in a temporary file (SQLITE_TMPDIR, else /var/tmp or /tmp).
        let live = (total - free).saturating_mul(page_size);
        let vacuumed = if live <= COMPACT_IN_MEMORY_BYTES {
            self.conn.execute_batch("VACUUM;")
        } else {
            let r = self.conn.execute_batch("PRAGMA temp_store = FILE; VACUUM;");
            if let Err(e) = self.conn.execute_batch("PRAGMA temp_store = MEMORY;") {
                tracing::warn!(error = %e, "cannot set the queue's temp_store back to memory");
            }
            r
        };
        if let Err(e) = vacuumed {
            // Its commit writes the log like any other: an I/O error there may be a lost write.
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure) {
                super::wal_sync::fail(
                    &self.synced.failure(),
                    format!("the queue writer could not compact the database ({e})"),
                );
            } else {
                tracing::warn!(error = %e, "cannot compact the queue's database; tried again in an hour");
                self.next_compaction_check = std::time::Instant::now() + COMPACT_RETRY;
            }
            return;
        }
        let emptied = self.empty_log();
        let after = pages(&self.conn).map(|(_, total, _)| total).unwrap_or(0);
        tracing::info!(
            freed_mib = (total - after) * page_size / (1024 * 1024),
            left_mib = after * page_size / (1024 * 1024),
            log_emptied = emptied,
            took_ms = started.elapsed().as_millis() as u64,
            "compacted the queue's database after its backlog drained"
        );
    }

    /// Copies the whole log into the database and empties it (`TRUNCATE`); false when a
    /// checkpointer pass was running (tried again at the next look) or it failed.
    fn empty_log(&mut self) -> bool {
        let done = match self
            .conn
            .wal_checkpoint_v2(Some("main"), rusqlite::wal::CheckpointMode::TRUNCATE)
        {
            Ok(_) => true,
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => false,
            Err(e) => {
                super::checkpoint::failed_checkpoint(&self.synced.failure(), &e, "the queue writer");
                false
            }
        };
        self.log_to_empty = !done;
        done
    }
}

/// How many records `ops` would write: an enqueue counts its records, any other operation one.
fn records_in(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Enqueue(events, _, _) => events.iter().map(|e| e.records.len()).sum::<usize>().max(1),
            _ => 1,
        })
        .sum()
}

fn sql(e: rusqlite::Error) -> QueueError {
    store("queue operation failed", e)
}

/// The dedup keys one transaction stores, in one `dedup_log` row.
#[derive(Default)]
struct Marked {
    keys: HashSetOf,
    /// In the order they were marked.
    order: Vec<KeyHash>,
    /// The log row, once written.
    row: i64,
}

/// What an enqueue answers: which events were duplicates, and the records stored but not kept
/// in memory (past [`FRESH_MAX_BYTES`]), handed back for the caller to drop.
struct Enqueued {
    duplicates: Vec<bool>,
    spare: Vec<NewRecord>,
}

/// Queues `events` unless they would overflow `capacity` (an `Ok(Err(Full))`, before anything is
/// written). A failed statement is an `Err` that must fail the whole transaction: the call's
/// records would be partly stored and its ids marked, so a retry would be refused as a duplicate.
fn enqueue(
    txn: &Transaction<'_>,
    (events, keys): (Vec<EventRecords>, Vec<Option<KeyHash>>),
    now: i64,
    capacity: usize,
    (seen, marked): (&Seen, &mut Marked),
    depth: &mut usize,
    (staged, room): (&mut Vec<Waiting>, &mut usize),
) -> Result<Result<Enqueued, QueueError>, rusqlite::Error> {
    let mut in_call = HashSetOf::default();
    let mut duplicates = Vec::with_capacity(events.len());
    let mut spare = Vec::new();
    let mut fresh = 0;
    for (e, key) in events.iter().zip(&keys) {
        let dup = key.is_some_and(|k| seen.contains(k) || marked.keys.contains(&k) || !in_call.insert(k));
        if !dup {
            fresh += e.records.len();
        }
        duplicates.push(dup);
    }
    if fresh > 0 && *depth + fresh > capacity {
        return Ok(Err(QueueError::Full { capacity }));
    }
    let mut insert = txn.prepare_cached(
        "INSERT INTO records (integration, stream, timestamp_field, rule, rules_version, source, event_id, \
             event_type, body, input, traceparent, accepted_ms, due_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    for ((e, dup), key) in events.into_iter().zip(&duplicates).zip(keys) {
        if *dup || e.records.is_empty() {
            continue;
        }
        if let Some(key) = key {
            marked.keys.insert(key);
            marked.order.push(key);
        }
        for r in e.records {
            insert.execute(params![
                &*r.integration,
                &*r.stream,
                &*r.timestamp_field,
                &*r.rule,
                &*r.rules_version,
                r.source.as_str(),
                &*r.event_id,
                &*r.event_type,
                &r.body[..],
                &r.input[..],
                r.traceparent.as_deref(),
                r.accepted_ms,
                now,
            ])?;
            let id = txn.last_insert_rowid();
            let integration = r.integration.clone();
            let size = r.body.len() + r.input.len();
            let record = if size <= *room {
                *room -= size;
                Some(QueuedRecord {
                    id: u64::try_from(id).unwrap_or(0),
                    record: r,
                    attempts: 0,
                    history: Vec::new(),
                })
            } else {
                spare.push(r);
                None
            };
            staged.push(Waiting {
                integration,
                due_ms: now,
                id,
                record,
            });
        }
    }
    *depth += fresh;
    Ok(Ok(Enqueued { duplicates, spare }))
}

/// Leases from the schedule: records kept in memory need no read; the others are read in runs
/// of consecutive ids (a backlog is leased in id order), one range scan per run rather than one
/// lookup per record. The lease keeps the schedule's order.
fn lease(
    txn: &Transaction<'_>,
    schedule: &mut Schedule,
    max: usize,
    skip: &HashSet<String>,
    now: i64,
    taken_in_group: &mut Vec<(Arc<str>, Slot)>,
) -> Result<Vec<QueuedRecord>, QueueError> {
    let taken = schedule.take(max, skip, now);
    let mut slots: Vec<Option<QueuedRecord>> = Vec::with_capacity(taken.len());
    let mut unread: Vec<i64> = Vec::new();
    for (_, (_, id)) in &taken {
        let fresh = schedule.take_fresh(*id);
        if fresh.is_none() {
            unread.push(*id);
        }
        slots.push(fresh);
    }
    let mut read = || -> Result<(), rusqlite::Error> {
        if unread.is_empty() {
            return Ok(());
        }
        unread.sort_unstable();
        let mut by_range = txn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE id BETWEEN ?1 AND ?2 ORDER BY id"
        ))?;
        let mut names = Names::default();
        // In id order: runs ascend, and each run's rows come in id order.
        let mut stored: Vec<(i64, Option<QueuedRecord>)> = Vec::with_capacity(unread.len());
        for run in unread.chunk_by(|a, b| a.checked_add(1) == Some(*b)) {
            if let (Some(first), Some(last)) = (run.first(), run.last()) {
                let mut rows = by_range.query(params![first, last])?;
                while let Some(row) = rows.next()? {
                    let record = read_record(row, &mut names)?;
                    stored.push((i64::try_from(record.id).unwrap_or(i64::MAX), Some(record)));
                }
            }
        }
        for (slot, (_, (_, id))) in slots.iter_mut().zip(&taken) {
            if slot.is_none()
                && let Ok(i) = stored.binary_search_by_key(id, |(stored_id, _)| *stored_id)
                && let Some((_, record)) = stored.get_mut(i)
            {
                *slot = record.take();
            }
        }
        Ok(())
    };
    match read() {
        Ok(()) => {
            taken_in_group.extend(taken);
            Ok(slots.into_iter().flatten().collect())
        }
        Err(e) => {
            // Every record waits again; those held in memory stay there.
            for ((integration, (due_ms, id)), record) in taken.into_iter().zip(slots) {
                schedule.wait(Waiting {
                    integration,
                    due_ms,
                    id,
                    record,
                });
            }
            Err(sql(e))
        }
    }
}

/// The texts records repeat (integration, stream, rule, rules version, …), shared between the
/// records one read builds: reading a record back allocates only what is its own.
#[derive(Default)]
struct Names(Vec<Arc<str>>);

impl Names {
    /// Names kept at most; past it the oldest make room.
    const MAX: usize = 32;

    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(known) = self.0.iter().find(|n| ***n == *text) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(text);
        if self.0.len() == Self::MAX {
            self.0.remove(0);
        }
        self.0.push(name.clone());
        name
    }
}

/// The error for column `i` not holding the `wanted` type.
fn column_error(i: usize, wanted: rusqlite::types::Type) -> impl Fn(FromSqlError) -> rusqlite::Error {
    move |e| rusqlite::Error::FromSqlConversionFailure(i, wanted, Box::new(e))
}

/// The text in column `i`, borrowed from the row.
fn text_at<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str, rusqlite::Error> {
    row.get_ref(i)?.as_str().map_err(column_error(i, Type::Text))
}

/// The bytes in column `i` (a blob, or text from older stores).
fn bytes_at(row: &rusqlite::Row<'_>, i: usize) -> Result<Bytes, rusqlite::Error> {
    row.get_ref(i)?
        .as_bytes()
        .map(Bytes::copy_from_slice)
        .map_err(column_error(i, Type::Blob))
}

fn read_record(row: &rusqlite::Row<'_>, names: &mut Names) -> Result<QueuedRecord, rusqlite::Error> {
    let history = text_at(row, 14)?;
    Ok(QueuedRecord {
        id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        record: NewRecord {
            integration: names.get(text_at(row, 1)?),
            stream: names.get(text_at(row, 2)?),
            timestamp_field: names.get(text_at(row, 3)?),
            rule: names.get(text_at(row, 4)?),
            rules_version: names.get(text_at(row, 5)?),
            source: Source::parse(text_at(row, 6)?).unwrap_or(Source::Signal),
            event_id: Arc::from(text_at(row, 7)?),
            event_type: names.get(text_at(row, 8)?),
            body: bytes_at(row, 9)?,
            input: bytes_at(row, 10)?,
            traceparent: row
                .get_ref(11)?
                .as_str_or_null()
                .map_err(column_error(11, Type::Text))?
                .map(Arc::from),
            accepted_ms: row.get(12)?,
        },
        attempts: u32::try_from(row.get::<_, i64>(13)?).unwrap_or(0),
        history: if history == "[]" {
            Vec::new()
        } else {
            serde_json::from_str(history).unwrap_or_default()
        },
    })
}

/// Deletes acked records; a run of consecutive ids (what a batch usually is) goes in one
/// statement, which walks the table once instead of seeking every row.
fn ack(txn: &Transaction<'_>, ids: &[RecordId], depth: &mut usize) -> Result<(), rusqlite::Error> {
    let mut stmt = txn.prepare_cached("DELETE FROM records WHERE id BETWEEN ?1 AND ?2")?;
    let mut sorted: Vec<i64> = ids.iter().filter_map(|id| i64::try_from(*id).ok()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    for run in sorted.chunk_by(|a, b| a.checked_add(1) == Some(*b)) {
        if let (Some(first), Some(last)) = (run.first(), run.last()) {
            let n = stmt.execute(params![first, last])?;
            *depth = depth.saturating_sub(n);
        }
    }
    Ok(())
}

fn retry(
    txn: &Transaction<'_>,
    records: &[QueuedRecord],
    due: i64,
    staged: &mut Vec<Waiting>,
) -> Result<(), rusqlite::Error> {
    let mut stmt =
        txn.prepare_cached("UPDATE records SET attempts = ?2, history = ?3, due_ms = ?4 WHERE id = ?1")?;
    for r in records {
        let id = i64::try_from(r.id).unwrap_or(-1);
        let history = serde_json::to_string(&r.history).unwrap_or_else(|_| "[]".into());
        if stmt.execute(params![id, r.attempts, history, due])? > 0 {
            staged.push(Waiting {
                integration: r.record.integration.clone(),
                due_ms: due,
                id,
                record: None,
            });
        }
    }
    Ok(())
}

fn dead_letter(
    txn: &Transaction<'_>,
    records: &[QueuedRecord],
    reason: &str,
    now: i64,
    depth: &mut usize,
) -> Result<(), rusqlite::Error> {
    // The stored row is copied in place, as `replay` copies back: only what changed in memory
    // (the resolved stream, attempts, history) and the verdict travel as parameters.
    let mut insert = txn
        .prepare_cached(
            "INSERT INTO dead_letters (integration, stream, timestamp_field, rule, rules_version, source, event_id, \
             event_type, body, input, traceparent, accepted_ms, attempts, history, reason, at_ms) \
             SELECT integration, ?2, timestamp_field, rule, rules_version, source, event_id, event_type, body, \
             input, traceparent, accepted_ms, ?3, ?4, ?5, ?6 FROM records WHERE id = ?1",
        )?;
    let mut delete = txn.prepare_cached("DELETE FROM records WHERE id = ?1")?;
    for q in records {
        let id = i64::try_from(q.id).unwrap_or(-1);
        let history = serde_json::to_string(&q.history).unwrap_or_else(|_| "[]".into());
        insert.execute(params![id, &*q.record.stream, q.attempts, history, reason, now])?;
        let n = delete.execute(params![id])?;
        *depth = depth.saturating_sub(n);
    }
    Ok(())
}

/// The query for the dead letters `f` selects, newest first, reading `columns`.
fn dead_letter_query(columns: &str, f: &DeadLetterFilter) -> (String, Vec<Box<dyn rusqlite::ToSql>>) {
    let mut query = format!("SELECT {columns} FROM dead_letters WHERE 1 = 1");
    let mut values: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    let mut add = |clause: &str, v: Box<dyn rusqlite::ToSql>, query: &mut String| {
        values.push(v);
        query.push_str(&clause.replace('?', &format!("?{}", values.len())));
    };
    if let Some(i) = &f.integration {
        add(" AND integration = ?", Box::new(i.clone()), &mut query);
    }
    if let Some(s) = &f.stream {
        add(" AND stream = ?", Box::new(s.clone()), &mut query);
    }
    if let Some(r) = &f.reason {
        add(" AND instr(reason, ?) > 0", Box::new(r.clone()), &mut query);
    }
    if let Some(t) = f.since_ms {
        add(" AND at_ms >= ?", Box::new(t), &mut query);
    }
    if let Some(t) = f.until_ms {
        add(" AND at_ms < ?", Box::new(t), &mut query);
    }
    if let Some(b) = f.before_id {
        add(" AND id < ?", Box::new(b), &mut query);
    }
    add(
        " ORDER BY id DESC LIMIT ?",
        Box::new(i64::try_from(f.limit).unwrap_or(i64::MAX)),
        &mut query,
    );
    (query, values)
}

fn dead_letter_ids(txn: &Transaction<'_>, f: &DeadLetterFilter) -> Result<Vec<i64>, QueueError> {
    let (query, values) = dead_letter_query("id", f);
    let mut stmt = txn.prepare(&query).map_err(sql)?;
    let refs: Vec<&dyn rusqlite::ToSql> = values.iter().map(|v| v.as_ref()).collect();
    stmt.query_map(refs.as_slice(), |row| row.get(0))
        .map_err(sql)?
        .collect::<Result<Vec<i64>, _>>()
        .map_err(sql)
}

fn dead_letters(txn: &Transaction<'_>, f: &DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
    let (query, values) = dead_letter_query(&format!("{RECORD_COLUMNS}, reason, at_ms"), f);
    let mut stmt = txn.prepare(&query).map_err(sql)?;
    let refs: Vec<&dyn rusqlite::ToSql> = values.iter().map(|v| v.as_ref()).collect();
    let mut names = Names::default();
    let rows = stmt
        .query_map(refs.as_slice(), |row| read_dead_letter(row, &mut names))
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    Ok(rows)
}

/// A dead letter from a row of `{RECORD_COLUMNS}, reason, at_ms`.
fn read_dead_letter(row: &rusqlite::Row<'_>, names: &mut Names) -> Result<DeadLetter, rusqlite::Error> {
    let queued = read_record(row, names)?;
    Ok(DeadLetter {
        id: queued.id as i64,
        queued,
        reason: row.get(15)?,
        at_ms: row.get(16)?,
    })
}

/// The dead letters with these ids, newest first: one statement, a lookup per id.
fn dead_letters_by_id(txn: &Transaction<'_>, ids: &[i64]) -> Result<Vec<DeadLetter>, QueueError> {
    let mut stmt = txn
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS}, reason, at_ms FROM dead_letters WHERE id = ?1"
        ))
        .map_err(sql)?;
    let mut names = Names::default();
    let mut out = Vec::new();
    for id in ids.iter().collect::<HashSet<_>>() {
        let found = stmt
            .query_row(params![id], |row| read_dead_letter(row, &mut names))
            .optional()
            .map_err(sql)?;
        out.extend(found);
    }
    out.sort_by_key(|d| std::cmp::Reverse(d.id));
    Ok(out)
}

/// How many of `ids` (each counted once) are dead letters.
fn dead_letters_among(txn: &Transaction<'_>, ids: &[i64]) -> Result<usize, rusqlite::Error> {
    let mut exists = txn.prepare_cached("SELECT 1 FROM dead_letters WHERE id = ?1")?;
    let mut n = 0;
    for id in ids.iter().collect::<HashSet<_>>() {
        if exists.exists(params![id])? {
            n += 1;
        }
    }
    Ok(n)
}

/// Copies each dead letter back into `records` (with a remapped record's fields, where a
/// replay carries one) and deletes it.
fn replay(
    txn: &Transaction<'_>,
    replays: &[Replay],
    now: i64,
    depth: &mut usize,
    staged: &mut Vec<Waiting>,
) -> Result<Vec<i64>, rusqlite::Error> {
    let mut copy = txn.prepare_cached(
        "INSERT INTO records (integration, stream, timestamp_field, rule, rules_version, source, event_id, \
             event_type, body, input, traceparent, accepted_ms, due_ms) \
             SELECT integration, coalesce(?3, stream), coalesce(?4, timestamp_field), coalesce(?5, rule), \
             coalesce(?6, rules_version), source, event_id, event_type, coalesce(?7, body), \
             input, traceparent, accepted_ms, ?2 FROM dead_letters WHERE id = ?1 RETURNING id, integration",
    )?;
    let mut delete = txn.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
    let mut replayed = Vec::new();
    for replay in replays {
        let id = &replay.id;
        let r = replay.remapped.as_ref();
        let copied: Option<(i64, String)> = copy
            .query_row(
                params![
                    id,
                    now,
                    r.map(|r| &*r.stream),
                    r.map(|r| &*r.timestamp_field),
                    r.map(|r| &*r.rule),
                    r.map(|r| &*r.rules_version),
                    r.map(|r| &r.body[..]),
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        delete.execute(params![id])?;
        if let Some((new_id, integration)) = copied {
            replayed.push(*id);
            staged.push(Waiting {
                integration: Arc::from(integration),
                due_ms: now,
                id: new_id,
                record: None,
            });
        }
    }
    *depth += replayed.len();
    Ok(replayed)
}

/// The `accepted_ms` of the lowest id: a primary-key lookup, where the lowest `accepted_ms`
/// would scan the table.
fn oldest(txn: &Transaction<'_>) -> Result<Option<i64>, QueueError> {
    txn.prepare_cached("SELECT accepted_ms FROM records ORDER BY id LIMIT 1")
        .map_err(sql)?
        .query_row([], |r| r.get(0))
        .optional()
        .map_err(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(integration: &str, id: &str) -> NewRecord {
        NewRecord {
            integration: Arc::from(integration),
            stream: Arc::from("s"),
            timestamp_field: Arc::from("_ts"),
            rule: Arc::from("r"),
            rules_version: Arc::from("v1"),
            source: Source::CustomerIo,
            event_id: Arc::from(id),
            event_type: Arc::from("email_opened"),
            body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
            input: Bytes::from_static(b"{\"in\":1}"),
            traceparent: Some(Arc::from(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )),
            accepted_ms: 5,
        }
    }

    fn event(key: &str, records: Vec<NewRecord>) -> EventRecords {
        EventRecords {
            dedup_key: Some(Arc::from(key)),
            records,
        }
    }

    /// Events `e0`, `e1`, … with one record each for integration `a`.
    fn one_record_each(n: usize) -> Vec<EventRecords> {
        (0..n)
            .map(|i| {
                let id = format!("e{i}");
                event(&id, vec![rec("a", &id)])
            })
            .collect()
    }

    fn open(dir: &Path) -> SqliteQueue {
        SqliteQueue::open(&dir.join("queue.sqlite3"), 100, Duration::from_secs(3600)).unwrap()
    }

    /// Opens the queue again once the dropped one's writer has let go of the file.
    async fn reopen(open: impl Fn() -> Result<SqliteQueue, QueueError>) -> SqliteQueue {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Ok(q) = open() {
                return q;
            }
        }
        panic!("the queue could not be opened again");
    }

    /// Compaction that looks after every group, at a 1 MiB scale.
    const EAGER: Compaction = Compaction {
        min_free_bytes: 1024 * 1024,
        max_depth: 10,
        every: Duration::ZERO,
    };

    fn open_eager(path: &Path) -> Result<SqliteQueue, QueueError> {
        SqliteQueue::open_with(
            path,
            100_000,
            Duration::from_secs(3600).into(),
            (Limits::DEFAULT, EAGER),
            WalSync::for_file,
        )
    }

    fn file_size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    /// A record of about 4 KB.
    fn big(id: &str) -> NewRecord {
        NewRecord {
            body: Bytes::from(format!("{{\"id\":\"{id}\",\"pad\":\"{}\"}}", "x".repeat(4000))),
            ..rec("a", id)
        }
    }

    /// Queues a backlog of 2,000 records of 4 KB, in 20 calls.
    async fn queue_backlog(q: &SqliteQueue) {
        for call in 0..20 {
            let records = (0..100).map(|i| big(&format!("{call}-{i}"))).collect();
            q.enqueue(vec![event(&format!("k{call}"), records)])
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn after_the_log_fails_to_sync_nothing_is_acknowledged_and_the_queue_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open_with(
            &dir.path().join("queue.sqlite3"),
            100,
            Duration::from_secs(3600).into(),
            (Limits::DEFAULT, Compaction::DEFAULT),
            |_| WalSync::start(|| Err(std::io::Error::other("EIO"))),
        )
        .unwrap();
        assert_eq!(q.fault(), None);
        let refused = q
            .enqueue(vec![event("k1", vec![rec("a", "1")])])
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("restart the relay"), "{refused}");
        let fault = q.fault().expect("the queue reports the failure");
        assert!(fault.contains("EIO"), "{fault}");
        // Later operations, even those that write nothing, are refused too.
        assert!(q.enqueue(vec![event("k2", vec![rec("a", "2")])]).await.is_err());
        assert!(q.lease(10, &HashSet::new()).await.is_err());
        // What was refused after the failure was not stored either: only the first event, whose
        // commit preceded the failed sync, is there after a restart.
        drop(q);
        let q =
            reopen(|| SqliteQueue::open(&dir.path().join("queue.sqlite3"), 100, Duration::from_secs(3600)))
                .await;
        let stored = q.lease(10, &HashSet::new()).await.unwrap();
        let ids: Vec<&str> = stored.iter().map(|r| &*r.record.event_id).collect();
        assert_eq!(ids, ["1"]);
    }

    #[tokio::test]
    async fn a_dead_letter_id_never_names_a_second_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let mut ids = Vec::new();
        for key in ["a", "b", "c"] {
            q.enqueue(vec![event(key, vec![rec("a", key)])]).await.unwrap();
            let leased = q.lease(10, &HashSet::new()).await.unwrap();
            q.dead_letter(leased, "rejected".into()).await.unwrap();
            let newest = q
                .dead_letter_ids(DeadLetterFilter {
                    limit: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
            ids.push(newest[0]);
        }
        // The newest is replayed (its row deleted); the next dead letter gets a new id.
        assert_eq!(q.replay(&[ids[2]]).await.unwrap(), vec![ids[2]]);
        let replayed = q.lease(10, &HashSet::new()).await.unwrap();
        q.ack(&replayed.iter().map(|r| r.id).collect::<Vec<_>>())
            .await
            .unwrap();
        q.enqueue(vec![event("d", vec![rec("a", "d")])]).await.unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.dead_letter(leased, "rejected".into()).await.unwrap();
        let all = q
            .dead_letter_ids(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(all[0] > ids[2], "{all:?} against {ids:?}");
        // Replaying the replayed id again finds nothing, rather than the new dead letter.
        assert_eq!(q.replay(&[ids[2]]).await.unwrap(), Vec::<i64>::new());
        drop(q);

        // A table from before AUTOINCREMENT is rebuilt with its rows and ids.
        {
            let conn = Connection::open(dir.path().join("queue.sqlite3")).unwrap();
            let columns: String = conn
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'dead_letters'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            conn.execute_batch(&format!(
                "ALTER TABLE dead_letters RENAME TO d0; DROP INDEX dead_letters_at;
                 {}; INSERT INTO dead_letters SELECT * FROM d0; DROP TABLE d0;",
                columns.replace(" AUTOINCREMENT", "")
            ))
            .unwrap();
        }
        let q =
            reopen(|| SqliteQueue::open(&dir.path().join("queue.sqlite3"), 100, Duration::from_secs(3600)))
                .await;
        let kept = q
            .dead_letter_ids(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(kept, all);
        drop(q);
        let conn = Connection::open(dir.path().join("queue.sqlite3")).unwrap();
        let sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'dead_letters'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("AUTOINCREMENT"), "{sql}");
    }

    #[tokio::test]
    async fn files_this_relay_cannot_use_are_refused_at_open_naming_the_file_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let open = || SqliteQueue::open(&path, 100, Duration::from_secs(3600));
        drop(open().unwrap());
        let conn = || Connection::open(&path).unwrap();
        let version: i64 = conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // A newer relay's file.
        conn()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = open().err().unwrap().to_string();
        assert!(
            e.contains("written by a newer lytics-relay") && e.contains("queue.sqlite3"),
            "{e}"
        );
        conn()
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .unwrap();
        // A table without a column the relay uses.
        conn()
            .execute_batch("ALTER TABLE records DROP COLUMN traceparent")
            .unwrap();
        let e = open().err().unwrap().to_string();
        assert!(e.contains("table `records` lacks traceparent"), "{e}");
        // Not a database at all.
        for name in ["queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm"] {
            let _ = std::fs::remove_file(dir.path().join(name));
        }
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let e = open().err().unwrap().to_string();
        assert!(e.contains("is damaged") && e.contains("move it"), "{e}");
    }

    #[tokio::test]
    async fn dead_letters_are_read_by_id_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![
            event("1", vec![rec("a", "one")]),
            event("2", vec![rec("a", "two")]),
        ])
        .await
        .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.dead_letter(leased, "rejected".into()).await.unwrap();
        let ids = q
            .dead_letter_ids(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        let found = q
            .dead_letters_by_id(&[ids[1], 999, ids[0], ids[1]])
            .await
            .unwrap();
        let got: Vec<(i64, &str)> = found.iter().map(|d| (d.id, &*d.queued.record.event_id)).collect();
        assert_eq!(got, [(ids[0], "two"), (ids[1], "one")]);
    }

    #[tokio::test]
    async fn a_database_deleted_while_open_is_a_fault_and_nothing_more_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![event("k1", vec![rec("a", "1")])]).await.unwrap();
        assert_eq!(q.fault(), None);
        for name in ["queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm"] {
            let _ = std::fs::remove_file(dir.path().join(name));
        }
        let fault = q.fault().expect("the deleted database is reported");
        assert!(fault.contains("was deleted or replaced"), "{fault}");
        let refused = q
            .enqueue(vec![event("k2", vec![rec("a", "2")])])
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("restart the relay"), "{refused}");
    }

    #[tokio::test]
    async fn a_drained_backlog_gives_its_disk_back_and_what_is_left_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let wal = dir.path().join("queue.sqlite3-wal");
        let size = file_size;
        let q = open_eager(&path).unwrap();
        queue_backlog(&q).await;
        let mut leased = Vec::new();
        loop {
            let chunk = q.lease(500, &HashSet::new()).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            leased.extend(chunk);
        }
        assert_eq!(leased.len(), 2000);
        let backlog = size(&path) + size(&wal);
        assert!(backlog > 8 * 1024 * 1024, "{backlog} bytes");
        assert_eq!(q.disk_bytes(), Some(backlog));
        let inode = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().ino()
        };
        let log_inode = inode(&wal);
        // Five records wait for a retry, one is a dead letter, the rest is delivered: first all
        // but 50, which is still more than compaction leaves alone.
        let later: Vec<QueuedRecord> = leased.drain(..5).collect();
        let kept: Vec<String> = later.iter().map(|r| r.record.event_id.to_string()).collect();
        let attempt = Attempt {
            at_ms: 1,
            status: Some(503),
            detail: "unavailable".into(),
            kind: AttemptKind::Spent,
        };
        q.retry(later, now_ms() + 3_600_000, attempt).await.unwrap();
        q.dead_letter(leased.drain(..1).collect(), "rejected".into())
            .await
            .unwrap();
        let acked: Vec<RecordId> = leased.iter().map(|r| r.id).collect();
        q.ack(&acked[50..]).await.unwrap();
        // The writer runs operations in order: this one is answered after any compaction.
        q.next_due(&HashSet::new()).await.unwrap();
        assert!(
            size(&path) + size(&wal) >= backlog,
            "55 records queued: not compacted"
        );
        q.ack(&acked[..50]).await.unwrap();
        q.next_due(&HashSet::new()).await.unwrap();
        let compacted = size(&path) + size(&wal);
        assert_eq!(q.disk_bytes(), Some(compacted));
        assert!(
            compacted < 1024 * 1024,
            "database {} and log {} bytes after the backlog drained",
            size(&path),
            size(&wal)
        );
        assert_eq!(
            inode(&wal),
            log_inode,
            "the syncer's log is emptied, not replaced"
        );
        // The queue goes on (its cached statements are prepared again for the new schema
        // version), its schedule still names the rows that are left, and what was left is all
        // there, in this process and after a restart.
        q.enqueue(vec![event("after", vec![rec("b", "after")])])
            .await
            .unwrap();
        let after = q.lease(10, &HashSet::new()).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(&*after[0].record.event_id, "after");
        q.ack(&[after[0].id]).await.unwrap();
        let mut kept = kept;
        kept.sort();
        let event_ids = |records: &[QueuedRecord]| {
            let mut ids: Vec<String> = records.iter().map(|r| r.record.event_id.to_string()).collect();
            ids.sort();
            ids
        };
        assert_eq!(q.expedite("a").await.unwrap(), 5);
        let back = q.lease(100, &HashSet::new()).await.unwrap();
        assert_eq!(event_ids(&back), kept, "read back from the compacted table by id");
        let attempt = Attempt {
            at_ms: 2,
            status: Some(503),
            detail: "unavailable".into(),
            kind: AttemptKind::Spent,
        };
        q.retry(back, now_ms() + 3_600_000, attempt).await.unwrap();
        assert_eq!(q.depth(), 5);
        drop(q);
        let q = reopen(|| open_eager(&path)).await;
        assert_eq!(q.expedite("a").await.unwrap(), 5);
        let back = q.lease(100, &HashSet::new()).await.unwrap();
        assert_eq!(event_ids(&back), kept, "after a restart");
        let dead = q
            .dead_letters(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, "rejected");
    }

    #[tokio::test]
    async fn a_log_a_reader_kept_from_emptying_is_emptied_at_a_later_look() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let wal = dir.path().join("queue.sqlite3-wal");
        let size = file_size;
        let q = open_eager(&path).unwrap();
        queue_backlog(&q).await;
        let leased = q.lease(5000, &HashSet::new()).await.unwrap();
        assert_eq!(leased.len(), 2000);
        // A reader in the middle of a transaction: the database can be compacted, but the log
        // cannot be emptied under it (the writer waits out its busy timeout, then gives up).
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2000);
        let ids: Vec<RecordId> = leased.iter().map(|r| r.id).collect();
        q.ack(&ids).await.unwrap();
        q.next_due(&HashSet::new()).await.unwrap();
        let free: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(free, 0, "the database was compacted");
        assert!(
            size(&wal) > 8 * 1024 * 1024,
            "the log is still full: {}",
            size(&wal)
        );
        // Once the reader is done, the next look empties the log although nothing is free now.
        reader.execute_batch("COMMIT").unwrap();
        q.next_due(&HashSet::new()).await.unwrap();
        assert_eq!(size(&wal), 0);
        assert!(size(&path) < 1024 * 1024, "{}", size(&path));
    }

    #[tokio::test]
    async fn a_queue_opened_through_a_symbolic_link_syncs_the_log_sqlite_writes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        let real = dir.path().join("real/queue.sqlite3");
        let link = dir.path().join("queue.sqlite3");
        Connection::open(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let q = SqliteQueue::open(&link, 100, Duration::from_secs(3600)).unwrap();
        q.enqueue(vec![event("k", vec![rec("a", "1")])]).await.unwrap();
        let log = open_log(&Connection::open(&link).unwrap()).unwrap();
        let written = std::fs::metadata(dir.path().join("real/queue.sqlite3-wal")).unwrap();
        assert_eq!(log.metadata().unwrap().ino(), written.ino());
        assert!(
            !dir.path().join("queue.sqlite3-wal").exists(),
            "SQLite keeps the log beside the real file"
        );
    }

    #[tokio::test]
    async fn the_log_is_copied_off_the_writer_stays_bounded_and_is_the_file_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let limits = Limits {
            start: 64,
            tail: 8,
            passes: 4,
            max: 256,
        };
        let q = SqliteQueue::open_with(
            &path,
            100_000,
            Duration::from_secs(3600).into(),
            (limits, Compaction::DEFAULT),
            WalSync::for_file,
        )
        .unwrap();
        // A handle like the one the syncer flushes, opened at the same moment.
        let log = open_log(&Connection::open(&path).unwrap()).unwrap();
        // 600 commits of ~40 KB: some 1,500 frames of 16 KiB, six times the hard limit.
        let mut acked = 0;
        for call in 0..600 {
            let records = (0..10).map(|i| big(&format!("{call}-{i}"))).collect();
            q.enqueue(vec![event(&format!("k{call}"), records)])
                .await
                .unwrap();
            if call % 3 == 0 {
                let leased = q.lease(10, &HashSet::new()).await.unwrap();
                let ids: Vec<RecordId> = leased.iter().map(|r| r.id).collect();
                q.ack(&ids).await.unwrap();
                acked += ids.len();
            }
        }
        let by_checkpointer = q.checkpoints.checkpointer.load(Ordering::Relaxed);
        let by_writer = q.checkpoints.writer.load(Ordering::Relaxed);
        assert!(by_checkpointer > 0, "the checkpointer thread copied the log");
        assert!(by_writer > 0, "the writer copied tails");
        let frame = 16_384 + 24;
        let wal = std::fs::metadata(dir.path().join("queue.sqlite3-wal"))
            .unwrap()
            .len();
        assert!(
            wal <= 2 * u64::try_from(limits.max).unwrap() * frame,
            "the log restarts instead of growing: {wal} bytes ({by_checkpointer} checkpointer passes, {by_writer} by the writer)"
        );
        {
            use std::os::unix::fs::MetadataExt;
            let (held, named) = (
                log.metadata().unwrap(),
                std::fs::metadata(dir.path().join("queue.sqlite3-wal")).unwrap(),
            );
            assert_eq!(
                (held.dev(), held.ino()),
                (named.dev(), named.ino()),
                "the log synced is the file SQLite writes, through every restart of the log"
            );
        }
        let waiting = 6000 - acked;
        assert_eq!(q.depth(), waiting);
        drop(q);
        // The writer closes its connection when the queue is dropped; reopen once it has.
        let mut reopened = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let q = open(dir.path());
            if q.depth() == waiting {
                reopened = Some(q);
                break;
            }
        }
        let q = reopened.expect("every record not acked is stored");
        let all = q.lease(10_000, &HashSet::new()).await.unwrap();
        assert_eq!(all.len(), waiting);
        assert!(all.iter().all(|r| r.record.body.len() > 4000));
    }

    #[test]
    fn lingering_counts_the_records_waiting_not_the_calls() {
        let enqueue = |records: usize| {
            let (reply, _) = oneshot::channel();
            let records = (0..records).map(|i| rec("a", &i.to_string())).collect();
            Op::Enqueue(
                vec![event("k", records), event("l", Vec::new())],
                vec![None, None],
                reply,
            )
        };
        let ack = || Op::Ack(vec![1, 2, 3], oneshot::channel().0);
        // Two batch calls of 100 records and an ack: 201, against 3 operations.
        assert_eq!(records_in(&[enqueue(100), enqueue(100), ack()]), 201);
        // A unary call counts one, as does a call whose events all map to nothing.
        assert_eq!(records_in(&[enqueue(1), enqueue(0), ack()]), 3);
        assert!(records_in(&[enqueue(100), enqueue(100), enqueue(100)]) >= LINGER_UNTIL_RECORDS);
        assert!(records_in(&(0..255).map(|_| enqueue(1)).collect::<Vec<_>>()) < LINGER_UNTIL_RECORDS);
    }

    #[tokio::test]
    async fn records_survive_a_restart_with_their_context_and_leases_are_released() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = open(dir.path());
            q.enqueue(vec![
                event("e1", vec![rec("a", "e1")]),
                event("e2", vec![rec("a", "e2")]),
            ])
            .await
            .unwrap();
            let leased = q.lease(1, &HashSet::new()).await.unwrap();
            assert_eq!(leased.len(), 1);
            let attempt = Attempt {
                at_ms: 9,
                status: Some(503),
                detail: "busy".into(),
                kind: AttemptKind::Spent,
            };
            q.retry(leased, 0, attempt).await.unwrap();
            let leased = q.lease(10, &HashSet::new()).await.unwrap();
            assert_eq!(leased.len(), 2, "the retried record is due again");
            // The process "dies" holding both leases.
        }
        let q = open(dir.path());
        assert_eq!(q.depth(), 2);
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        assert_eq!(leased.len(), 2);
        let first = leased.iter().find(|r| &*r.record.event_id == "e1").unwrap();
        assert_eq!(first.attempts, 1);
        assert_eq!(first.history[0].status, Some(503));
        assert_eq!(&*first.record.rules_version, "v1");
        assert_eq!(
            first.record.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(first.record.source, Source::CustomerIo);
        assert_eq!(&first.record.body[..], br#"{"id":"e1"}"#);
        q.ack(&[first.id]).await.unwrap();
        assert_eq!(q.depth(), 1);
    }

    #[tokio::test]
    async fn the_oldest_record_is_the_first_queued_whether_waiting_or_leased() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        assert_eq!(q.oldest_accepted_ms().await.unwrap(), None);
        let at = |id: &str, ms: i64| NewRecord {
            accepted_ms: ms,
            ..rec("a", id)
        };
        q.enqueue(vec![event("e1", vec![at("e1", 100)])]).await.unwrap();
        q.enqueue(vec![event("e2", vec![at("e2", 200)])]).await.unwrap();
        let leased = q.lease(1, &HashSet::new()).await.unwrap();
        assert_eq!(
            q.oldest_accepted_ms().await.unwrap(),
            Some(100),
            "leased still counts"
        );
        q.ack(&[leased[0].id]).await.unwrap();
        assert_eq!(q.oldest_accepted_ms().await.unwrap(), Some(200));
    }

    #[tokio::test]
    async fn duplicates_are_refused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = open(dir.path());
            let d = q
                .enqueue(vec![
                    event("e1", vec![rec("a", "e1")]),
                    event("e1", vec![rec("a", "e1")]),
                ])
                .await
                .unwrap();
            assert_eq!(d, vec![false, true]);
        }
        let q = open(dir.path());
        assert_eq!(
            q.enqueue(vec![event("e1", vec![rec("a", "e1")])]).await.unwrap(),
            vec![true]
        );
        assert_eq!(q.depth(), 1);
    }

    #[tokio::test]
    async fn concurrent_sends_of_one_id_store_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = Arc::new(open(dir.path()));
        // Calls that reach the writer together share a transaction: the id one of them marks
        // is a duplicate for the others before anything commits.
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.enqueue(vec![event("same", vec![rec("a", "same")])]).await })
            })
            .collect();
        let mut fresh = 0;
        for c in calls {
            fresh += c.await.unwrap().unwrap().iter().filter(|dup| !**dup).count();
        }
        assert_eq!(fresh, 1);
        assert_eq!(q.depth(), 1);
        assert_eq!(q.dedup_ids(), Some(1));
    }

    /// Makes every `operation` (INSERT, DELETE) of a record whose event id is `poison` fail, as
    /// a full disk would; `row` is the trigger's name for that record (NEW, OLD).
    fn fail_on_poison(dir: &Path, operation: &str, row: &str) {
        Connection::open(dir.join("queue.sqlite3"))
            .unwrap()
            .execute_batch(&format!(
                "CREATE TRIGGER poison BEFORE {operation} ON records WHEN {row}.event_id = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'no room'); END;"
            ))
            .unwrap();
    }

    /// Makes every UPDATE of the record whose event id is `poison` fail.
    fn fail_on_poison_update(dir: &Path) {
        Connection::open(dir.join("queue.sqlite3"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison_update BEFORE UPDATE ON records WHEN OLD.event_id = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'no room'); END;",
            )
            .unwrap();
    }

    #[test]
    fn an_id_marked_earlier_in_the_same_transaction_is_a_duplicate() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let txn = conn.transaction().unwrap();
        let seen = Seen::new(Duration::from_secs(60).into());
        let mut marked = Marked::default();
        // Room in memory for one record of 18 bytes (body and input).
        let (mut depth, mut staged, mut room) = (0, Vec::new(), 18);
        let mut call = |key: &str| {
            let events = vec![event(key, vec![rec("a", key)])];
            let keys = vec![Some(key_hash(key))];
            enqueue(
                &txn,
                (events, keys),
                1,
                100,
                (&seen, &mut marked),
                &mut depth,
                (&mut staged, &mut room),
            )
            .unwrap()
            .unwrap()
        };
        let first = call("k");
        assert_eq!((first.duplicates, first.spare.len()), (vec![false], 0));
        assert_eq!(
            call("k").duplicates,
            vec![true],
            "marked by the first call, not yet committed"
        );
        let third = call("l");
        assert_eq!(third.duplicates, vec![false]);
        assert_eq!(marked.order, vec![key_hash("k"), key_hash("l")]);
        assert_eq!((depth, staged.len(), room), (2, 2, 0));
        // The second record is stored but not kept: it goes back to its caller to be freed.
        assert!(staged[0].record.is_some() && staged[1].record.is_none());
        assert_eq!(&*third.spare[0].event_id, "l");
    }

    #[tokio::test]
    async fn a_call_whose_records_fail_to_store_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        // A statement failing halfway through a call, as a full disk would make it.
        fail_on_poison(dir.path(), "INSERT", "NEW");
        let call = q
            .enqueue(vec![
                event("a", vec![rec("a", "a")]),
                event("p", vec![rec("a", "poison")]),
            ])
            .await;
        assert!(call.is_err(), "{call:?}");
        // The sender retries the call without its bad event: the first one was not stored, so
        // it is not a duplicate, and the queue holds exactly it.
        assert_eq!(
            q.enqueue(vec![event("a", vec![rec("a", "a")])]).await.unwrap(),
            vec![false]
        );
        assert_eq!(q.depth(), 1);
        assert_eq!(q.dedup_ids(), Some(1));
        assert_eq!(q.lease(10, &HashSet::new()).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_dead_letter_that_fails_halfway_leaves_every_record_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![
            event("a", vec![rec("a", "a")]),
            event("p", vec![rec("a", "poison")]),
        ])
        .await
        .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        // The first record moves to the dead letters; the second one's delete fails.
        fail_on_poison(dir.path(), "DELETE", "OLD");
        assert!(q.dead_letter(leased.clone(), "rejected".into()).await.is_err());
        let dead = q
            .dead_letters(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(dead.is_empty(), "half a dead letter was kept: {dead:?}");
        assert_eq!(q.depth(), 2);
        // They are no longer leased: they wait again, due after a pause, not until a restart.
        let before = now_ms();
        let due = q.next_due(&HashSet::new()).await.unwrap().unwrap();
        assert!(
            due > before && due <= before + SETTLE_RETRY_MS,
            "{due} against {before}"
        );
        // The records are still queued: delivery can retry them (each once: the retry moves
        // them to their new time, it does not add a second place in the queue).
        let attempt = Attempt {
            at_ms: 9,
            status: Some(400),
            detail: "rejected".into(),
            kind: AttemptKind::Held,
        };
        q.retry(leased, 0, attempt).await.unwrap();
        assert_eq!(q.lease(10, &HashSet::new()).await.unwrap().len(), 2);
        assert_eq!(q.next_due(&HashSet::new()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_failed_ack_is_retried_apart_and_a_failed_retry_waits_again() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![
            event("p", vec![rec("a", "poison")]),
            event("k", vec![rec("a", "kept")]),
        ])
        .await
        .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        let (poison, kept): (Vec<_>, Vec<_>) =
            leased.into_iter().partition(|r| &*r.record.event_id == "poison");
        fail_on_poison(dir.path(), "DELETE", "OLD");
        fail_on_poison_update(dir.path());
        // A delivered record whose ack fails is not delivered again: it stays leased, and its
        // delete is tried again apart, so the others' operations go on meanwhile.
        let ids: Vec<RecordId> = poison.iter().map(|r| r.id).collect();
        assert!(q.ack(&ids).await.is_err());
        assert_eq!(q.next_due(&HashSet::new()).await.unwrap(), None);
        assert_eq!(q.depth(), 2);
        // A retry that fails to commit leaves its record waiting again, within the pause.
        let attempt = Attempt {
            at_ms: 9,
            status: Some(503),
            detail: "unavailable".into(),
            kind: AttemptKind::Spent,
        };
        let before = now_ms();
        assert!(
            q.retry(poison, 0, attempt.clone()).await.is_err(),
            "the record is acked-pending, its update refused"
        );
        q.retry(kept, before + 60_000, attempt).await.unwrap();
        assert_eq!(q.next_due(&HashSet::new()).await.unwrap(), Some(before + 60_000));
        // Once the delete can be made, the pending ack goes through.
        Connection::open(dir.path().join("queue.sqlite3"))
            .unwrap()
            .execute_batch("DROP TRIGGER poison; DROP TRIGGER poison_update;")
            .unwrap();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = q.next_due(&HashSet::new()).await.unwrap();
            if q.depth() == 1 {
                break;
            }
        }
        assert_eq!(q.depth(), 1, "the delivered record was deleted");
    }

    /// Rows of the dedup log.
    fn dedup_log_rows(dir: &Path) -> i64 {
        Connection::open(dir.join("queue.sqlite3"))
            .unwrap()
            .query_row("SELECT count(*) FROM dedup_log", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn ids_past_the_window_leave_memory_and_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let q = SqliteQueue::open(&path, 100, Duration::from_millis(50)).unwrap();
        q.enqueue(vec![event("e1", vec![rec("a", "e1")])]).await.unwrap();
        q.enqueue(vec![event("e2", vec![rec("a", "e2")])]).await.unwrap();
        assert_eq!(q.dedup_ids(), Some(2));
        assert_eq!(dedup_log_rows(dir.path()), 2);
        // Past the window, and past the writer's once-a-second look at it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        q.enqueue(vec![event("e3", vec![rec("a", "e3")])]).await.unwrap();
        assert_eq!(q.dedup_ids(), Some(1));
        assert_eq!(
            dedup_log_rows(dir.path()),
            1,
            "the forgotten ids' rows are deleted"
        );
        assert_eq!(
            q.enqueue(vec![
                event("e1", vec![rec("a", "e1")]),
                event("e3", vec![rec("a", "e3")])
            ])
            .await
            .unwrap(),
            vec![false, true]
        );
    }

    #[tokio::test]
    async fn a_restart_remembers_at_most_the_bound_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let bounded = Dedup {
            window: Duration::from_secs(3600),
            max_ids: 16,
        };
        {
            let q = SqliteQueue::open(&path, 100, bounded).unwrap();
            let events = (0..40)
                .map(|n| event(&format!("k{n}"), vec![rec("a", "k")]))
                .collect();
            q.enqueue(events).await.unwrap();
        }
        let q = reopen(|| SqliteQueue::open(&path, 100, bounded)).await;
        // Generations of 7 ids: the oldest go until at most 16 are left.
        assert_eq!(q.dedup_ids(), Some(12));
        assert_eq!(
            q.enqueue(vec![
                event("k39", vec![rec("a", "k")]),
                event("k28", vec![rec("a", "k")]),
                event("k27", vec![rec("a", "k")])
            ])
            .await
            .unwrap(),
            vec![true, true, false]
        );
    }

    #[tokio::test]
    async fn the_bound_refuses_and_recovers_as_records_leave() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&dir.path().join("q.sqlite3"), 2, Duration::from_secs(60)).unwrap();
        q.enqueue(vec![event("1", vec![rec("a", "1"), rec("a", "1")])])
            .await
            .unwrap();
        assert!(matches!(
            q.enqueue(vec![event("2", vec![rec("a", "2")])]).await,
            Err(QueueError::Full { capacity: 2 })
        ));
        let leased = q.lease(1, &HashSet::new()).await.unwrap();
        q.ack(&[leased[0].id]).await.unwrap();
        assert_eq!(
            q.enqueue(vec![event("2", vec![rec("a", "2")])]).await.unwrap(),
            vec![false]
        );
    }

    #[tokio::test]
    async fn paused_integrations_are_skipped_and_next_due_sees_retries() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![event("1", vec![rec("a", "1"), rec("b", "1")])])
            .await
            .unwrap();
        let skip = HashSet::from(["a".to_string()]);
        let leased = q.lease(10, &skip).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(&*leased[0].record.integration, "b");
        let attempt = Attempt {
            at_ms: 0,
            status: None,
            detail: "x".into(),
            kind: AttemptKind::Spent,
        };
        q.retry(leased, now_ms() + 60_000, attempt).await.unwrap();
        let due = q.next_due(&skip).await.unwrap().unwrap();
        assert!(due > now_ms() + 50_000);
        assert!(q.next_due(&HashSet::new()).await.unwrap().unwrap() <= now_ms());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_queue_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        // A database made before (as the default umask leaves it) is restricted too.
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let q = SqliteQueue::open(&path, 10, Duration::from_secs(3600)).unwrap();
        q.enqueue(vec![event("1", vec![rec("a", "1")])]).await.unwrap();
        for name in ["queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[tokio::test]
    async fn a_replay_past_capacity_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&dir.path().join("queue.sqlite3"), 3, Duration::from_secs(3600)).unwrap();
        q.enqueue(
            (1..=3)
                .map(|i| event(&i.to_string(), vec![rec("a", &i.to_string())]))
                .collect(),
        )
        .await
        .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.dead_letter(leased, "gave up".into()).await.unwrap();
        q.enqueue(vec![
            event("4", vec![rec("a", "4")]),
            event("5", vec![rec("a", "5")]),
        ])
        .await
        .unwrap();
        let ids = q
            .dead_letter_ids(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(ids.len(), 3);
        assert!(matches!(
            q.replay(&ids).await,
            Err(QueueError::Full { capacity: 3 })
        ));
        assert_eq!(q.depth(), 2);
        assert_eq!(
            q.dead_letter_ids(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap(),
            ids
        );
        // Ids that are not dead letters take no room.
        assert_eq!(q.replay(&[ids[0], 777, 778, ids[0]]).await.unwrap(), ids[..1]);
        assert_eq!(q.depth(), 3);
    }

    #[tokio::test]
    async fn dead_letters_are_listed_filtered_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![
            event("1", vec![rec("a", "1")]),
            event("2", vec![rec("b", "2")]),
        ])
        .await
        .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        let (a, b): (Vec<_>, Vec<_>) = leased.into_iter().partition(|r| &*r.record.integration == "a");
        q.dead_letter(a, "Lytics refused the record (400): bad field".into())
            .await
            .unwrap();
        q.dead_letter(b, "gave up after 5 attempt(s)".into())
            .await
            .unwrap();
        assert_eq!(q.depth(), 0);
        let all = q
            .dead_letters(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 2);
        let refused = q
            .dead_letters(DeadLetterFilter {
                limit: 10,
                reason: Some("refused".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(refused.len(), 1);
        assert_eq!(&refused[0].queued.record.input[..], b"{\"in\":1}");
        let only_b = q
            .dead_letters(DeadLetterFilter {
                limit: 10,
                integration: Some("b".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(only_b.len(), 1);
        let count = |f: DeadLetterFilter| {
            let q = &q;
            async move {
                let f = DeadLetterFilter { limit: 10, ..f };
                let ids = q.dead_letter_ids(f.clone()).await.unwrap();
                let listed: Vec<i64> = q.dead_letters(f).await.unwrap().iter().map(|d| d.id).collect();
                assert_eq!(ids, listed, "the ids query selects what the listing does");
                ids.len()
            }
        };
        let now = now_ms();
        assert_eq!(count(DeadLetterFilter::default()).await, 2);
        let stream = |s: &str| DeadLetterFilter {
            stream: Some(s.into()),
            ..Default::default()
        };
        assert_eq!((count(stream("s")).await, count(stream("other")).await), (2, 0));
        let since = |t: i64| DeadLetterFilter {
            since_ms: Some(t),
            ..Default::default()
        };
        let until = |t: i64| DeadLetterFilter {
            until_ms: Some(t),
            ..Default::default()
        };
        assert_eq!(
            (count(since(now - 60_000)).await, count(since(now + 60_000)).await),
            (2, 0)
        );
        assert_eq!(
            (count(until(now + 60_000)).await, count(until(now - 60_000)).await),
            (2, 0)
        );
        assert_eq!(q.replay(&[refused[0].id, 9999]).await.unwrap(), [refused[0].id]);
        assert_eq!(q.depth(), 1);
        let again = q.lease(10, &HashSet::new()).await.unwrap();
        assert_eq!(again[0].attempts, 0);
        assert_eq!(
            q.dead_letters(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
            1
        );
    }

    #[tokio::test]
    async fn expedite_makes_an_integrations_retries_due_now() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![event("1", vec![rec("a", "1"), rec("b", "1")])])
            .await
            .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        let attempt = Attempt {
            at_ms: 0,
            status: Some(503),
            detail: "x".into(),
            kind: AttemptKind::Spent,
        };
        q.retry(leased, now_ms() + 3_600_000, attempt).await.unwrap();
        assert!(q.lease(10, &HashSet::new()).await.unwrap().is_empty());
        assert_eq!(q.expedite("a").await.unwrap(), 1);
        let due = q.lease(10, &HashSet::new()).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(&*due[0].record.integration, "a");
    }

    #[tokio::test]
    async fn events_with_relay_made_ids_are_never_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let anonymous = || EventRecords {
            dedup_key: None,
            records: vec![rec("a", "x")],
        };
        assert_eq!(
            q.enqueue(vec![anonymous(), anonymous()]).await.unwrap(),
            vec![false, false]
        );
        assert_eq!(q.depth(), 2);
        assert_eq!(q.lease(10, &HashSet::new()).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_ack_deletes_exactly_the_acked_records_in_and_out_of_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = open(dir.path());
            q.enqueue(one_record_each(7)).await.unwrap();
            let leased = q.lease(10, &HashSet::new()).await.unwrap();
            assert_eq!(leased.len(), 7);
            // e0 e1 e2 (a run), e4 (alone), e6 (alone), given out of order and once twice.
            let pick = |n: &str| leased.iter().find(|r| &*r.record.event_id == n).unwrap().id;
            let acked = [
                pick("e6"),
                pick("e1"),
                pick("e0"),
                pick("e4"),
                pick("e2"),
                pick("e1"),
            ];
            q.ack(&acked).await.unwrap();
            assert_eq!(q.depth(), 2);
        }
        let q = open(dir.path());
        assert_eq!(q.depth(), 2);
        let mut left: Vec<String> = q
            .lease(10, &HashSet::new())
            .await
            .unwrap()
            .iter()
            .map(|r| r.record.event_id.to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["e3", "e5"]);
    }

    #[tokio::test]
    async fn records_read_back_in_runs_keep_the_schedules_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = open(dir.path());
            q.enqueue(one_record_each(7)).await.unwrap();
            let mut leased = q.lease(10, &HashSet::new()).await.unwrap();
            let attempt = Attempt {
                at_ms: 9,
                status: Some(503),
                detail: "busy".into(),
                kind: AttemptKind::Spent,
            };
            // e5 leaves (a gap in the later run); e0 and e1 are due after e2, e3, e4 and e6.
            q.ack(&[leased[5].id]).await.unwrap();
            let later: Vec<_> = leased.drain(..2).collect();
            let acked = leased.remove(3);
            assert_eq!(&*acked.record.event_id, "e5");
            q.retry(leased, 1_000, attempt.clone()).await.unwrap();
            q.retry(later, 2_000, attempt).await.unwrap();
        }
        // Reopened, nothing is in memory: every record is read back.
        let q =
            reopen(|| SqliteQueue::open(&dir.path().join("queue.sqlite3"), 100, Duration::from_secs(3600)))
                .await;
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        let order: Vec<&str> = leased.iter().map(|r| &*r.record.event_id).collect();
        assert_eq!(order, ["e2", "e3", "e4", "e6", "e0", "e1"]);
        for r in &leased {
            assert_eq!(r.attempts, 1, "{}", r.record.event_id);
            assert_eq!(
                &r.record.body[..],
                format!("{{\"id\":\"{}\"}}", r.record.event_id).as_bytes()
            );
        }
    }

    #[tokio::test]
    async fn records_beyond_the_memory_bound_are_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        // 24 records of 1 MiB input: the first 15 or so stay in memory, the rest are read back.
        let events: Vec<_> = (0..24)
            .map(|i| {
                let id = format!("e{i}");
                let mut r = rec("a", &id);
                r.input = Bytes::from(vec![b'x'; 1024 * 1024]);
                event(&id, vec![r])
            })
            .collect();
        q.enqueue(events).await.unwrap();
        let leased = q.lease(100, &HashSet::new()).await.unwrap();
        assert_eq!(leased.len(), 24);
        for (i, r) in leased.iter().enumerate() {
            assert_eq!(&*r.record.event_id, format!("e{i}"), "in queue order");
            assert_eq!(&r.record.body[..], format!("{{\"id\":\"e{i}\"}}").as_bytes());
            assert_eq!(r.record.input.len(), 1024 * 1024);
            assert_eq!(r.record.traceparent.as_deref().map(str::len), Some(55));
        }
    }

    #[tokio::test]
    async fn an_expedite_lasts_until_restart_where_records_keep_their_scheduled_time() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = open(dir.path());
            q.enqueue(vec![event("1", vec![rec("a", "1")])]).await.unwrap();
            let leased = q.lease(10, &HashSet::new()).await.unwrap();
            let attempt = Attempt {
                at_ms: 0,
                status: Some(503),
                detail: "x".into(),
                kind: AttemptKind::Spent,
            };
            q.retry(leased, now_ms() + 3_600_000, attempt).await.unwrap();
            assert_eq!(q.expedite("a").await.unwrap(), 1);
            assert_eq!(q.expedite("a").await.unwrap(), 0, "already due");
        }
        let q = open(dir.path());
        assert!(q.lease(10, &HashSet::new()).await.unwrap().is_empty());
        assert!(q.next_due(&HashSet::new()).await.unwrap().unwrap() > now_ms() + 3_000_000);
        assert_eq!(q.expedite("a").await.unwrap(), 1);
        let again = q.lease(10, &HashSet::new()).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempts, 1);
    }

    #[tokio::test]
    async fn a_queue_written_by_the_previous_schema_opens_and_delivers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        {
            // The schema before leases moved to memory: a `leased` column and its index.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE records (id INTEGER PRIMARY KEY, integration TEXT NOT NULL,
                   stream TEXT NOT NULL, timestamp_field TEXT NOT NULL, rule TEXT NOT NULL,
                   rules_version TEXT NOT NULL, source TEXT NOT NULL, event_id TEXT NOT NULL,
                   event_type TEXT NOT NULL, body BLOB NOT NULL, input BLOB NOT NULL, traceparent TEXT,
                   accepted_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                   history TEXT NOT NULL DEFAULT '[]', due_ms INTEGER NOT NULL,
                   leased INTEGER NOT NULL DEFAULT 0);
                 CREATE INDEX records_due ON records (leased, due_ms, id);
                 INSERT INTO records (integration, stream, timestamp_field, rule, rules_version, source,
                   event_id, event_type, body, input, accepted_ms, attempts, due_ms, leased)
                 VALUES ('a', '', '_ts', 'r', 'v0', 'signal', 'old', 'track', X'7B7D', X'7B7D', 1, 2, 0, 1);
                 CREATE TABLE dedup (key TEXT PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE INDEX dedup_at ON dedup (at_ms);
                 INSERT INTO dedup (key, at_ms) VALUES ('expired', 1);",
            )
            .unwrap();
            // Ids the previous schema stored 50, 49 and 1 minute ago.
            for (key, minutes) in [("older", 50), ("old", 49), ("seen", 1)] {
                conn.execute(
                    "INSERT INTO dedup (key, at_ms) VALUES (?1, ?2)",
                    params![key, now_ms() - minutes * 60_000],
                )
                .unwrap();
            }
        }
        let q = open(dir.path());
        assert_eq!(q.depth(), 1);
        // Its ids within the window moved into the dedup log, in rows spanning at most an eighth
        // of the (one-hour) window, so none is remembered much longer than it would have been.
        assert_eq!(q.dedup_ids(), Some(3));
        assert_eq!(dedup_log_rows(dir.path()), 2);
        assert_eq!(
            q.enqueue(vec![
                event("seen", vec![rec("a", "seen")]),
                event("older", vec![rec("a", "older")]),
                event("expired", vec![rec("a", "expired")]),
            ])
            .await
            .unwrap(),
            vec![true, true, false]
        );
        let former: i64 = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('dedup', 'dedup_at')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(former, 0, "the former table and its index are gone");
        q.enqueue(vec![event("new", vec![rec("a", "new")])])
            .await
            .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        let ids: Vec<&str> = leased.iter().map(|r| &*r.record.event_id).collect();
        assert_eq!(
            ids,
            ["old", "expired", "new"],
            "the record leased by the old process is due again, first"
        );
        assert_eq!(leased[0].attempts, 2);
        q.ack(&leased.iter().map(|r| r.id).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(q.depth(), 0);
    }
}
