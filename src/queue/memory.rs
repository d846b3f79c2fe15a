//! The in-memory queue: fast and bounded, but not durable — a restart loses what it holds.
//!
//! Input: records to hold. Output: due records by lease. Due order is (due time, arrival), so
//! records of one integration and stream leave in the order they arrived unless retried.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Attempt, DeadLetter, NewRecord, Queue, QueueError, QueuedRecord, RecordId};
use crate::timefmt::now_ms;

/// Dead letters kept in memory; older ones are forgotten first.
const DEAD_LETTER_CAP: usize = 10_000;

#[derive(Default)]
struct State {
    next_id: RecordId,
    /// Keyed by (due time, id): the first entries are the next due.
    waiting: BTreeMap<(i64, RecordId), QueuedRecord>,
    leased: HashMap<RecordId, ()>,
    dead: VecDeque<DeadLetter>,
}

/// A bounded in-memory queue.
pub struct MemoryQueue {
    capacity: usize,
    state: Mutex<State>,
    depth: AtomicUsize,
    work: Notify,
}

impl MemoryQueue {
    /// A queue holding at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        MemoryQueue {
            capacity,
            state: Mutex::new(State::default()),
            depth: AtomicUsize::new(0),
            work: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, records: Vec<NewRecord>) -> Result<(), QueueError> {
        if records.is_empty() {
            return Ok(());
        }
        {
            let mut s = self.state();
            let depth = s.waiting.len() + s.leased.len();
            if depth + records.len() > self.capacity {
                return Err(QueueError::Full {
                    capacity: self.capacity,
                });
            }
            let now = now_ms();
            for record in records {
                s.next_id += 1;
                let id = s.next_id;
                s.waiting.insert(
                    (now, id),
                    QueuedRecord {
                        id,
                        record,
                        attempts: 0,
                        history: Vec::new(),
                    },
                );
            }
            self.depth
                .store(s.waiting.len() + s.leased.len(), Ordering::Relaxed);
        }
        self.work.notify_one();
        Ok(())
    }

    async fn lease(&self, max: usize, skip: &HashSet<String>) -> Result<Vec<QueuedRecord>, QueueError> {
        let now = now_ms();
        let mut s = self.state();
        let keys: Vec<(i64, RecordId)> = s
            .waiting
            .iter()
            .take_while(|((due, _), _)| *due <= now)
            .filter(|(_, r)| !skip.contains(&*r.record.integration))
            .take(max)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(r) = s.waiting.remove(&k) {
                s.leased.insert(r.id, ());
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn ack(&self, ids: &[RecordId]) -> Result<(), QueueError> {
        let mut s = self.state();
        for id in ids {
            s.leased.remove(id);
        }
        self.depth
            .store(s.waiting.len() + s.leased.len(), Ordering::Relaxed);
        Ok(())
    }

    async fn retry(
        &self,
        records: Vec<QueuedRecord>,
        due_ms: i64,
        attempt: Attempt,
        count_attempt: bool,
    ) -> Result<(), QueueError> {
        {
            let mut s = self.state();
            for mut r in records {
                s.leased.remove(&r.id);
                if count_attempt {
                    r.attempts += 1;
                }
                r.history.push(attempt.clone());
                s.waiting.insert((due_ms, r.id), r);
            }
        }
        self.work.notify_one();
        Ok(())
    }

    async fn dead_letter(&self, records: Vec<QueuedRecord>, reason: String) -> Result<(), QueueError> {
        let mut s = self.state();
        let now = now_ms();
        for r in records {
            s.leased.remove(&r.id);
            if s.dead.len() >= DEAD_LETTER_CAP {
                s.dead.pop_back();
            }
            s.dead.push_front(DeadLetter {
                queued: r,
                reason: reason.clone(),
                at_ms: now,
            });
        }
        self.depth
            .store(s.waiting.len() + s.leased.len(), Ordering::Relaxed);
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.state().dead.iter().take(limit).cloned().collect())
    }

    async fn next_due(&self, skip: &HashSet<String>) -> Result<Option<i64>, QueueError> {
        let s = self.state();
        Ok(s.waiting
            .iter()
            .find(|(_, r)| !skip.contains(&*r.record.integration))
            .map(|((due, _), _)| *due))
    }

    fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Source;
    use bytes::Bytes;
    use std::sync::Arc;

    fn rec(integration: &str) -> NewRecord {
        NewRecord {
            integration: Arc::from(integration),
            stream: Arc::from("s"),
            timestamp_field: Arc::from("_ts"),
            rule: Arc::from("r"),
            rules_version: Arc::from("v"),
            source: Source::Signal,
            event_id: Arc::from("e"),
            event_type: Arc::from("track"),
            body: Bytes::from_static(b"{}"),
            input: Bytes::from_static(b"{}"),
            traceparent: None,
            accepted_ms: 0,
        }
    }

    #[tokio::test]
    async fn refuses_records_beyond_capacity_and_recovers() {
        let q = MemoryQueue::new(2);
        q.enqueue(vec![rec("a"), rec("a")]).await.unwrap();
        assert!(matches!(
            q.enqueue(vec![rec("a")]).await,
            Err(QueueError::Full { .. })
        ));
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.ack(&[leased[0].id]).await.unwrap();
        q.enqueue(vec![rec("a")]).await.unwrap();
        assert_eq!(q.depth(), 2);
    }

    #[tokio::test]
    async fn leases_skip_paused_integrations_and_respect_due_time() {
        let q = MemoryQueue::new(10);
        q.enqueue(vec![rec("a"), rec("b")]).await.unwrap();
        let leased = q.lease(10, &HashSet::from(["a".to_string()])).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(&*leased[0].record.integration, "b");
        let attempt = Attempt {
            at_ms: 0,
            status: Some(503),
            detail: "x".into(),
        };
        q.retry(leased, now_ms() + 60_000, attempt, true).await.unwrap();
        assert!(
            q.lease(10, &HashSet::from(["a".to_string()]))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(q.depth(), 2);
    }

    #[tokio::test]
    async fn dead_letters_keep_the_reason_and_history() {
        let q = MemoryQueue::new(10);
        q.enqueue(vec![rec("a")]).await.unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.dead_letter(leased, "bad record".into()).await.unwrap();
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead[0].reason, "bad record");
        assert_eq!(q.depth(), 0);
    }
}
