//! Copying the embedded queue's write-ahead log into its database off the writer's thread.
//!
//! With SQLite's `wal_autocheckpoint`, the connection that commits also copies the whole log
//! into the database file once the log holds enough frames, syncing both files. The queue has
//! one writer, so every caller waited for that copy, and under load it was the writer's largest
//! single cost. Here the writer's commit hook only asks; a checkpointer thread with its own
//! connection copies the log while the writer goes on (`PASSIVE` checkpoints never block a
//! writer), pass after pass until a pass finds few new frames, and then leaves that short tail
//! to the writer. The writer's own `PASSIVE` checkpoint after its next commit copies the tail,
//! which leaves the whole log copied, so the next transaction writes the log from its start
//! again. Past a hard limit the writer copies the log itself after each commit, as
//! autocheckpoint did, whenever the checkpointer is not in the middle of a pass (two
//! checkpoints cannot run at once), so the log outgrows the limit only for as long as one pass
//! takes, and not at all if the checkpointer stops.
//!
//! Durability is unchanged: a checkpoint copies committed frames only, and SQLite syncs the log
//! before and the database after copying, whichever connection runs it.

use std::ffi::c_int;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, ErrorCode};

use super::QueueError;
use super::wal_sync::{Failure, fail};

/// When the log is copied, in log frames (one page each).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// The writer asks the checkpointer once the log holds this many frames...
    pub start: c_int,
    /// ...which copies until a pass finds fewer than this many new frames...
    pub tail: c_int,
    /// ...in at most this many passes; then the writer copies what is left.
    pub passes: u32,
    /// From this many frames on, the writer copies the log itself.
    pub max: c_int,
}

impl Limits {
    /// 16,384 frames of 16 KiB pages: a 256 MiB log, as the writer's autocheckpoint was.
    pub const DEFAULT: Limits = Limits {
        start: 16_384,
        tail: 1_024,
        passes: 8,
        max: 32_768,
    };
}

/// Checkpoints run so far, by who ran them.
#[derive(Debug, Default)]
pub(super) struct Counts {
    /// Passes of the checkpointer thread.
    pub checkpointer: AtomicU64,
    /// Checkpoints the writer ran after a commit (tails, and copies past the hard limit).
    pub writer: AtomicU64,
}

/// The checkpointer thread; it ends once the writer's connection, which holds the only way to
/// ask it, is closed.
pub(super) struct Checkpointer {
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens the checkpointer's own connection to the database at `path`, starts its thread, and
    /// hooks the writer's connection `writer` to it in place of autocheckpoint.
    pub fn start(
        path: &Path,
        writer: &mut Connection,
        limits: Limits,
        counts: Arc<Counts>,
        failure: Failure,
    ) -> Result<Checkpointer, QueueError> {
        let conn = Connection::open(path)
            .map_err(|e| QueueError::Store(format!("cannot open the checkpointer's connection: {e}")))?;
        // Reading opens the connection's log; until then a checkpoint on it does nothing.
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| QueueError::Store(format!("cannot read the queue's journal mode: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QueueError::Store(format!(
                "the queue's journal mode is `{mode}`, not `wal`"
            )));
        }
        let (ask, asked) = sync_channel(1);
        let tail = Arc::new(AtomicBool::new(false));
        let hook = Hook {
            ask,
            tail: tail.clone(),
            limits,
            counts: counts.clone(),
            failure: failure.clone(),
        };
        writer
            .wal_hook(Some(move |wal: &mut Wal, frames: c_int| {
                hook.after_commit(wal, frames);
                Ok(())
            }))
            .map_err(|e| QueueError::Store(format!("cannot hook the queue's log: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("queue-checkpoint".into())
            .spawn(move || copy_when_asked(&conn, &asked, &tail, limits, &counts, &failure))
            .map_err(|e| QueueError::Store(format!("cannot start the queue checkpointer: {e}")))?;
        Ok(Checkpointer { thread })
    }

    /// Waits for the thread to end; call after closing the writer's connection.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("the queue checkpointer stopped abnormally");
        }
    }
}

/// The writer connection's commit hook.
struct Hook {
    ask: SyncSender<()>,
    /// Set by the checkpointer when only a short tail is left for the writer to copy.
    tail: Arc<AtomicBool>,
    limits: Limits,
    counts: Arc<Counts>,
    failure: Failure,
}

impl Hook {
    /// Runs on the writer's thread after each commit, `frames` being the log's length. Never
    /// fails the commit: it has happened, and a checkpoint that fails is tried again later.
    fn after_commit(&self, wal: &mut Wal, frames: c_int) {
        if frames < self.limits.start {
            // The log restarted since the checkpointer last left a tail: nothing is left of it.
            if self.tail.load(Ordering::Relaxed) {
                self.tail.store(false, Ordering::Relaxed);
            }
            return;
        }
        if self.tail.swap(false, Ordering::AcqRel) || frames >= self.limits.max {
            match wal.checkpoint_v2(CheckpointMode::PASSIVE) {
                Ok(_) => {
                    self.counts.writer.fetch_add(1, Ordering::Relaxed);
                }
                // The checkpointer is copying; a later commit asks it again (or, past the hard
                // limit, tries again itself).
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => {}
                Err(e) => failed_checkpoint(&self.failure, &e, "the queue writer"),
            }
        } else {
            // Full means the checkpointer has been asked already.
            let _ = self.ask.try_send(());
        }
    }
}

/// The checkpointer thread: on each request, copy the log in passes until a pass finds only a
/// short tail of new frames, then leave that tail to the writer.
fn copy_when_asked(
    conn: &Connection,
    asked: &Receiver<()>,
    tail: &AtomicBool,
    limits: Limits,
    counts: &Counts,
    failure: &Failure,
) {
    while asked.recv().is_ok() {
        let mut copied_to: c_int = 0;
        for _ in 0..limits.passes {
            match conn.wal_checkpoint_v2(Some("main"), CheckpointMode::PASSIVE) {
                Ok((frames, _)) if frames < 0 => {
                    tracing::warn!("the queue checkpointer found no log to copy; the writer copies it");
                    break;
                }
                Ok((frames, _)) => {
                    counts.checkpointer.fetch_add(1, Ordering::Relaxed);
                    // Fewer frames than the last pass saw means the log was restarted meanwhile.
                    let converged = frames < copied_to.saturating_add(limits.tail);
                    copied_to = frames;
                    if converged {
                        break;
                    }
                }
                // The writer is copying past the hard limit.
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => break,
                Err(e) => {
                    failed_checkpoint(failure, &e, "the queue checkpointer");
                    break;
                }
            }
        }
        // Asks made while copying are answered by this run.
        while asked.try_recv().is_ok() {}
        tail.store(true, Ordering::Release);
    }
}

/// A checkpoint that failed on I/O may have been where SQLite met (and consumed) an error
/// writing the log or the database, so it counts as a failed sync; other errors are logged and
/// the checkpoint is tried again later.
pub(super) fn failed_checkpoint(failure: &Failure, e: &rusqlite::Error, who: &str) {
    if e.sqlite_error_code() == Some(ErrorCode::SystemIoFailure) {
        fail(failure, format!("{who} could not checkpoint the log ({e})"));
    } else {
        tracing::warn!(error = %e, "{who} could not checkpoint the log; it is tried again later");
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::ffi;

    use super::*;

    fn error(extended_code: c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(extended_code), None)
    }

    #[test]
    fn a_checkpoint_that_fails_on_io_counts_as_a_failed_sync() {
        let failure = Failure::default();
        failed_checkpoint(&failure, &error(ffi::SQLITE_BUSY), "test");
        failed_checkpoint(&failure, &error(ffi::SQLITE_NOMEM), "test");
        assert!(failure.get().is_none(), "not an I/O error: tried again later");
        failed_checkpoint(&failure, &error(ffi::SQLITE_IOERR_FSYNC), "test");
        let why = failure.get().expect("an I/O error is a fault");
        assert!(
            why.contains("could not checkpoint") && why.contains("restart the relay"),
            "{why}"
        );
    }
}
