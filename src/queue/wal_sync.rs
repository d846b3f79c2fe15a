//! Making the embedded queue's commits durable off the writer's thread.
//!
//! SQLite's `synchronous=FULL` fsyncs the write-ahead log inside every commit, so the queue's
//! single writer sat idle for each fsync while operations waited for it. The writer now
//! commits with `synchronous=NORMAL` (the commit writes the log but does not sync it) and hands
//! the group's answers here; this thread syncs the log file (`fdatasync`) and only then answers,
//! while the writer already runs the next group. One sync covers every commit written before
//! it began, so the groups that arrive during a sync share the next one.
//!
//! Why that is as durable as `FULL`: every answer waits for a sync that began after its commit
//! had written its frames, and the log file is never replaced while the queue is open (SQLite
//! deletes it only when the last connection closes), so the synced file holds the commit. What
//! `NORMAL` leaves out besides the commit sync, SQLite still does: it syncs the log header when
//! the log restarts and the log before and the database after each checkpoint. The directory
//! entry of a new log file is synced once at open. Answers keep their order, so a lease (which
//! writes nothing) is answered only after the commits of the records it hands out are synced.
//! After a failed sync nothing more is acknowledged: the kernel may have dropped the unsynced
//! pages, so every later answer reports the failure until the relay restarts.

use std::fs::File;
use std::io;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use super::QueueError;

/// An answer to send once its transaction's fate is known (`None`: committed and durable).
pub(super) type Pending = Box<dyn FnOnce(Option<&QueueError>) + Send>;

/// Groups handed over and not yet synced before the writer waits for the syncer.
const GROUPS_IN_FLIGHT: usize = 64;

/// A committed group's answers, and whether its transaction wrote anything.
struct Group {
    answers: Vec<Pending>,
    wrote: bool,
}

/// The handle the writer hands committed groups to; dropping it ends the syncer thread.
pub(super) struct WalSync {
    groups: SyncSender<Group>,
    thread: JoinHandle<()>,
    failure: Failure,
}

/// Why the log could not be synced, once it could not; shared with the writer (which then
/// refuses every operation), the checkpointer (which sets it when a checkpoint's I/O fails) and
/// whoever reports health.
pub(super) type Failure = Arc<OnceLock<String>>;

impl WalSync {
    /// Starts the syncer thread, which makes commits durable with `sync` (the log's fdatasync).
    pub fn start(sync: impl FnMut() -> io::Result<()> + Send + 'static) -> Result<WalSync, QueueError> {
        let (groups, committed) = sync_channel(GROUPS_IN_FLIGHT);
        let failure = Failure::default();
        let failed = failure.clone();
        let thread = std::thread::Builder::new()
            .name("queue-sync".into())
            .spawn(move || sync_and_answer(&committed, sync, &failed))
            .map_err(|e| QueueError::Store(format!("cannot start the queue's log syncer: {e}")))?;
        Ok(WalSync {
            groups,
            thread,
            failure,
        })
    }

    /// Set once a sync has failed, with the error every later answer carries.
    pub fn failure(&self) -> Failure {
        self.failure.clone()
    }

    /// Why nothing more is acknowledged, once that is so.
    pub fn failed(&self) -> Option<&String> {
        self.failure.get()
    }

    /// Starts a syncer for the log file `wal`.
    pub fn for_file(wal: File) -> Result<WalSync, QueueError> {
        Self::start(move || wal.sync_data())
    }

    /// Answers a committed group once the log is synced; `wrote` says whether its transaction
    /// wrote anything (a group that did not needs no sync of its own, only its turn).
    pub fn committed(&self, answers: Vec<Pending>, wrote: bool) {
        if let Err(lost) = self.groups.send(Group { answers, wrote }) {
            // The syncer is gone (it never stops while this handle lives, so only a panic).
            let e = QueueError::Store("the queue's log syncer stopped".into());
            for answer in lost.0.answers {
                answer(Some(&e));
            }
        }
    }

    /// Answers every group handed over, then stops the thread.
    pub fn finish(self) {
        let WalSync { groups, thread, .. } = self;
        drop(groups);
        if thread.join().is_err() {
            tracing::error!("the queue's log syncer stopped abnormally");
        }
    }
}

/// The syncer thread: take every group committed so far, sync once, answer them in order.
fn sync_and_answer(committed: &Receiver<Group>, mut sync: impl FnMut() -> io::Result<()>, failure: &Failure) {
    while let Ok(first) = committed.recv() {
        let mut groups = vec![first];
        groups.extend(committed.try_iter());
        if failure.get().is_none()
            && groups.iter().any(|g| g.wrote)
            && let Err(e) = sync()
        {
            fail(failure, format!("cannot sync the queue's log ({e})"));
        }
        let failed = failure.get().map(|why| QueueError::Store(why.clone()));
        for answer in groups.into_iter().flat_map(|g| g.answers) {
            answer(failed.as_ref());
        }
    }
}

/// Records that the log may have lost what was written to it (a failed sync, here or in a
/// checkpoint): from now on nothing is acknowledged until the relay restarts.
pub(super) fn fail(failure: &Failure, what: String) {
    let message = format!("{what}; restart the relay");
    if failure.set(message.clone()).is_ok() {
        tracing::error!(error = %message, "the queue's log may have lost writes; nothing more is acknowledged until the relay restarts");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    type Log = Arc<Mutex<Vec<(&'static str, bool, usize)>>>;

    /// An answer that logs its name, whether it was told of an error, and `seen` when answered.
    fn answer(name: &'static str, log: &Log, seen: &Arc<AtomicUsize>) -> Pending {
        let (log, seen) = (log.clone(), seen.clone());
        Box::new(move |e: Option<&QueueError>| {
            log.lock()
                .unwrap()
                .push((name, e.is_some(), seen.load(Ordering::SeqCst)));
        })
    }

    /// A syncer whose syncs count in `syncs`, the first `failing` of them failing.
    fn counting(syncs: &Arc<AtomicUsize>, failing: usize) -> WalSync {
        let syncs = syncs.clone();
        WalSync::start(move || {
            if syncs.fetch_add(1, Ordering::SeqCst) < failing {
                Err(io::Error::other("EIO"))
            } else {
                Ok(())
            }
        })
        .unwrap()
    }

    #[test]
    fn a_group_is_answered_in_order_after_a_sync_that_began_after_its_commit() {
        // `handed`: groups handed over so far; `synced_from`: `handed` when the last sync began.
        let handed = Arc::new(AtomicUsize::new(0));
        let synced_from = Arc::new(AtomicUsize::new(0));
        let log = Log::default();
        let (h, s) = (handed.clone(), synced_from.clone());
        let wal = WalSync::start(move || {
            s.store(h.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        let groups: [(&'static str, bool); 5] = [
            ("a", true),
            ("b", true),
            ("lease", false),
            ("c", true),
            ("d", true),
        ];
        for (name, wrote) in groups {
            handed.fetch_add(1, Ordering::SeqCst);
            wal.committed(vec![answer(name, &log, &synced_from)], wrote);
        }
        wal.finish();
        let log = log.lock().unwrap();
        let names: Vec<&str> = log.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(names, ["a", "b", "lease", "c", "d"]);
        for (number, ((name, wrote), (_, failed, synced))) in groups.iter().zip(log.iter()).enumerate() {
            assert!(!failed);
            if *wrote {
                assert!(
                    *synced > number,
                    "`{name}` was answered before a sync that covers it"
                );
            }
        }
    }

    #[test]
    fn nothing_is_synced_for_groups_that_wrote_nothing() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let log = Log::default();
        let wal = counting(&syncs, 0);
        wal.committed(vec![answer("next_due", &log, &syncs)], false);
        wal.committed(vec![answer("oldest", &log, &syncs)], false);
        wal.finish();
        assert_eq!(syncs.load(Ordering::SeqCst), 0);
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[test]
    fn after_a_failed_sync_nothing_more_is_acknowledged() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let log = Log::default();
        // The first sync fails, any later one would succeed.
        let wal = counting(&syncs, 1);
        let failure = wal.failure();
        assert!(failure.get().is_none());
        wal.committed(vec![answer("first", &log, &syncs)], true);
        while log.lock().unwrap().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        wal.committed(vec![answer("second", &log, &syncs)], true);
        wal.committed(vec![answer("lease", &log, &syncs)], false);
        wal.finish();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|(_, failed, _)| *failed), "{log:?}");
        assert_eq!(
            syncs.load(Ordering::SeqCst),
            1,
            "no sync is tried after a failure"
        );
        assert!(
            failure
                .get()
                .is_some_and(|m| m.contains("EIO") && m.contains("restart"))
        );
    }
}
