//! The in-memory queue: fast and bounded, but not durable — a restart loses what it holds.
//!
//! Input: records to hold. Output: due records by lease. Due order is (due time, arrival), so
//! records of one integration and stream leave in the order they arrived unless retried.
//! Waiting records are kept per integration, so a lease or the next-due question costs the
//! same however many records a paused (skipped) integration holds.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::dedup::{Dedup, HashSetOf, Seen, key_hashes};
use super::{
    Attempt, AttemptKind, DeadLetter, DeadLetterFilter, EventRecords, Queue, QueueError, QueuedRecord,
    RecordId, Replay,
};
use crate::timefmt::now_ms;

/// Dead letters kept in memory; older ones are forgotten first.
const DEAD_LETTER_CAP: usize = 10_000;

struct State {
    next_id: RecordId,
    next_dead: i64,
    /// Per integration (those configured, so a map left empty is kept for the next records),
    /// keyed by (due time, id): the first entries are the next due.
    waiting: HashMap<Arc<str>, BTreeMap<(i64, RecordId), QueuedRecord>>,
    /// Records in `waiting`.
    waiting_len: usize,
    /// Leased record ids, with when each record was accepted (for the queue-age metric).
    leased: HashMap<RecordId, i64>,
    dead: VecDeque<DeadLetter>,
    /// Dedup keys accepted within the window.
    seen: Seen,
}

impl State {
    fn depth(&self) -> usize {
        self.waiting_len + self.leased.len()
    }

    fn wait(&mut self, due_ms: i64, record: QueuedRecord) {
        let replaced = self
            .waiting
            .entry(record.record.integration.clone())
            .or_default()
            .insert((due_ms, record.id), record);
        if replaced.is_none() {
            self.waiting_len += 1;
        }
    }

    /// Takes up to `max` records due at `now`, not of a `skip` integration, earliest first.
    fn take(&mut self, max: usize, skip: &HashSet<String>, now: i64) -> Vec<QueuedRecord> {
        let mut active: Vec<_> = self
            .waiting
            .iter_mut()
            .filter(|(i, w)| !w.is_empty() && !skip.contains(&***i))
            .map(|(_, w)| w)
            .collect();
        let mut taken = Vec::new();
        while taken.len() < max {
            let best = active
                .iter()
                .enumerate()
                .filter_map(|(n, w)| w.first_key_value().map(|(k, _)| (n, *k)))
                .filter(|(_, (due, _))| *due <= now)
                .min_by_key(|(_, k)| *k);
            let Some((n, _)) = best else { break };
            if let Some((_, r)) = active[n].pop_first() {
                taken.push(r);
            }
        }
        self.waiting_len -= taken.len();
        taken
    }
}

/// A bounded in-memory queue.
pub struct MemoryQueue {
    capacity: usize,
    state: Mutex<State>,
    depth: AtomicUsize,
    work: Notify,
}

impl MemoryQueue {
    /// A queue holding at most `capacity` records and remembering event ids as `dedup` says.
    pub fn new(capacity: usize, dedup: impl Into<Dedup>) -> Self {
        MemoryQueue {
            capacity,
            state: Mutex::new(State {
                next_id: 0,
                next_dead: 0,
                waiting: HashMap::new(),
                waiting_len: 0,
                leased: HashMap::new(),
                dead: VecDeque::new(),
                seen: Seen::new(dedup.into()),
            }),
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
    async fn enqueue(&self, events: Vec<EventRecords>) -> Result<Vec<bool>, QueueError> {
        let mut duplicates = Vec::with_capacity(events.len());
        // Hashed before the lock is taken.
        let keys = key_hashes(&events);
        {
            let mut s = self.state();
            let now = now_ms();
            // Forget keys older than the window, and the oldest beyond the bound.
            s.seen.expire(now);
            let mut fresh = 0;
            let mut in_call = HashSetOf::default();
            for (e, key) in events.iter().zip(&keys) {
                let dup = key.is_some_and(|k| s.seen.contains(k) || !in_call.insert(k));
                if !dup {
                    fresh += e.records.len();
                }
                duplicates.push(dup);
            }
            let depth = s.depth();
            if fresh > 0 && depth + fresh > self.capacity {
                return Err(QueueError::Full {
                    capacity: self.capacity,
                });
            }
            for ((e, dup), key) in events.into_iter().zip(&duplicates).zip(keys) {
                if *dup || e.records.is_empty() {
                    continue;
                }
                if let Some(key) = key {
                    s.seen.insert(key, now, 0);
                }
                for record in e.records {
                    s.next_id += 1;
                    let id = s.next_id;
                    s.wait(
                        now,
                        QueuedRecord {
                            id,
                            record,
                            attempts: 0,
                            history: Vec::new(),
                        },
                    );
                }
            }
            self.depth.store(s.depth(), Ordering::Relaxed);
        }
        self.work.notify_one();
        Ok(duplicates)
    }

    async fn lease(&self, max: usize, skip: &HashSet<String>) -> Result<Vec<QueuedRecord>, QueueError> {
        let now = now_ms();
        let mut s = self.state();
        let out = s.take(max, skip, now);
        for r in &out {
            s.leased.insert(r.id, r.record.accepted_ms);
        }
        Ok(out)
    }

    async fn ack(&self, ids: &[RecordId]) -> Result<(), QueueError> {
        let mut s = self.state();
        for id in ids {
            s.leased.remove(id);
        }
        self.depth.store(s.depth(), Ordering::Relaxed);
        Ok(())
    }

    async fn retry(
        &self,
        records: Vec<QueuedRecord>,
        due_ms: i64,
        attempt: Attempt,
    ) -> Result<(), QueueError> {
        let count_attempt = attempt.kind == AttemptKind::Spent;
        {
            let mut s = self.state();
            for mut r in records {
                s.leased.remove(&r.id);
                if count_attempt {
                    r.attempts += 1;
                }
                r.history.push(attempt.clone());
                s.wait(due_ms, r);
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
            s.next_dead += 1;
            let id = s.next_dead;
            s.dead.push_front(DeadLetter {
                id,
                queued: r,
                reason: reason.clone(),
                at_ms: now,
            });
        }
        self.depth.store(s.depth(), Ordering::Relaxed);
        Ok(())
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self
            .state()
            .dead
            .iter()
            .filter(|d| filter.matches(d))
            .take(filter.limit)
            .cloned()
            .collect())
    }

    async fn replay_records(&self, replays: &[Replay]) -> Result<Vec<i64>, QueueError> {
        let n = {
            let mut s = self.state();
            let by_id: HashMap<i64, &Replay> = replays.iter().map(|r| (r.id, r)).collect();
            let wanted: HashSet<i64> = by_id.keys().copied().collect();
            let among = s.dead.iter().filter(|d| wanted.contains(&d.id)).count();
            if s.depth() + among > self.capacity {
                return Err(QueueError::Full {
                    capacity: self.capacity,
                });
            }
            let now = now_ms();
            let (replay, keep): (Vec<DeadLetter>, Vec<DeadLetter>) =
                s.dead.drain(..).partition(|d| wanted.contains(&d.id));
            s.dead = keep.into();
            for d in &replay {
                s.next_id += 1;
                let id = s.next_id;
                s.wait(
                    now,
                    QueuedRecord {
                        id,
                        record: by_id
                            .get(&d.id)
                            .map_or_else(|| d.queued.record.clone(), |r| r.record(&d.queued.record)),
                        attempts: 0,
                        history: Vec::new(),
                    },
                );
            }
            self.depth.store(s.depth(), Ordering::Relaxed);
            replay.iter().map(|d| d.id).collect()
        };
        self.work.notify_one();
        Ok(n)
    }

    fn durable(&self) -> bool {
        false
    }

    async fn expedite(&self, integration: &str) -> Result<usize, QueueError> {
        let n = {
            let mut s = self.state();
            let now = now_ms();
            match s.waiting.get_mut(integration) {
                Some(w) => {
                    let later = w.split_off(&(now.saturating_add(1), RecordId::MIN));
                    let n = later.len();
                    w.extend(later.into_iter().map(|((_, id), r)| ((now, id), r)));
                    n
                }
                None => 0,
            }
        };
        if n > 0 {
            self.work.notify_one();
        }
        Ok(n)
    }

    async fn next_due(&self, skip: &HashSet<String>) -> Result<Option<i64>, QueueError> {
        let s = self.state();
        Ok(s.waiting
            .iter()
            .filter(|(i, _)| !skip.contains(&***i))
            .filter_map(|(_, w)| w.first_key_value().map(|((due, _), _)| *due))
            .min())
    }

    fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn dedup_ids(&self) -> Option<usize> {
        Some(self.state().seen.len())
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }

    async fn oldest_accepted_ms(&self) -> Result<Option<i64>, QueueError> {
        // A scan: this backend is bounded and in memory, and only a metrics scrape asks.
        let s = self.state();
        let waiting = s
            .waiting
            .values()
            .flatten()
            .map(|(_, r)| (r.id, r.record.accepted_ms));
        let leased = s.leased.iter().map(|(id, at)| (*id, *at));
        Ok(waiting.chain(leased).min_by_key(|(id, _)| *id).map(|(_, at)| at))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::NewRecord;

    fn event(key: &str, records: Vec<NewRecord>) -> EventRecords {
        EventRecords {
            dedup_key: Some(Arc::from(key)),
            records,
        }
    }

    fn q(capacity: usize) -> MemoryQueue {
        MemoryQueue::new(capacity, Duration::from_secs(60))
    }

    fn rec(integration: &str) -> NewRecord {
        NewRecord::sample(integration)
    }

    #[tokio::test]
    async fn refuses_records_beyond_capacity_and_recovers() {
        let q = q(2);
        q.enqueue(vec![event("1", vec![rec("a"), rec("a")])])
            .await
            .unwrap();
        assert!(matches!(
            q.enqueue(vec![event("2", vec![rec("a")])]).await,
            Err(QueueError::Full { .. })
        ));
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.ack(&[leased[0].id]).await.unwrap();
        q.enqueue(vec![event("2", vec![rec("a")])]).await.unwrap();
        assert_eq!(q.depth(), 2);
    }

    #[tokio::test]
    async fn a_replay_past_capacity_is_refused_whole() {
        let q = q(3);
        q.enqueue(vec![event("1", vec![rec("a"), rec("a"), rec("a")])])
            .await
            .unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.dead_letter(leased, "gave up".into()).await.unwrap();
        q.enqueue(vec![event("2", vec![rec("a"), rec("a")])])
            .await
            .unwrap();
        let all = DeadLetterFilter {
            limit: 10,
            ..Default::default()
        };
        let ids = q.dead_letter_ids(all.clone()).await.unwrap();
        assert!(matches!(
            q.replay(&ids).await,
            Err(QueueError::Full { capacity: 3 })
        ));
        assert_eq!(q.depth(), 2);
        assert_eq!(q.dead_letter_ids(all).await.unwrap(), ids);
        // Ids that are not dead letters take no room.
        assert_eq!(q.replay(&[ids[0], 777, 778, ids[0]]).await.unwrap(), ids[..1]);
        assert_eq!(q.depth(), 3);
    }

    #[tokio::test]
    async fn leases_skip_paused_integrations_and_respect_due_time() {
        let q = q(10);
        q.enqueue(vec![event("1", vec![rec("a"), rec("b")])])
            .await
            .unwrap();
        let leased = q.lease(10, &HashSet::from(["a".to_string()])).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(&*leased[0].record.integration, "b");
        let attempt = Attempt {
            at_ms: 0,
            status: Some(503),
            detail: "x".into(),
            kind: AttemptKind::Spent,
        };
        q.retry(leased, now_ms() + 60_000, attempt).await.unwrap();
        assert!(
            q.lease(10, &HashSet::from(["a".to_string()]))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(q.depth(), 2);
    }

    #[tokio::test]
    async fn leases_interleave_integrations_by_due_time_and_expedite_brings_retries_forward() {
        let q = q(10);
        for (key, integration) in [("1", "a"), ("2", "b"), ("3", "a"), ("4", "b")] {
            q.enqueue(vec![event(key, vec![rec(integration)])]).await.unwrap();
        }
        let leased = q.lease(3, &HashSet::new()).await.unwrap();
        let order: Vec<(&str, RecordId)> = leased.iter().map(|r| (&*r.record.integration, r.id)).collect();
        assert_eq!(order, vec![("a", 1), ("b", 2), ("a", 3)]);
        let attempt = Attempt {
            at_ms: 0,
            status: Some(401),
            detail: "x".into(),
            kind: AttemptKind::Held,
        };
        q.retry(leased, now_ms() + 60_000, attempt).await.unwrap();
        let rest = q.lease(10, &HashSet::new()).await.unwrap();
        assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            q.next_due(&HashSet::new()).await.unwrap().map(|d| d > now_ms()),
            Some(true)
        );
        assert_eq!(q.expedite("a").await.unwrap(), 2);
        let skip_b = HashSet::from(["b".to_string()]);
        assert!(q.next_due(&skip_b).await.unwrap().is_some_and(|d| d <= now_ms()));
        let again = q.lease(10, &skip_b).await.unwrap();
        assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(q.depth(), 4, "leased records count until acked");
    }

    #[tokio::test]
    async fn dead_letters_keep_the_reason_and_history() {
        let q = q(10);
        q.enqueue(vec![event("1", vec![rec("a")])]).await.unwrap();
        let leased = q.lease(10, &HashSet::new()).await.unwrap();
        q.dead_letter(leased, "bad record".into()).await.unwrap();
        let dead = q
            .dead_letters(DeadLetterFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(dead[0].reason, "bad record");
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test]
    async fn the_oldest_record_is_the_first_queued_whether_waiting_or_leased() {
        let q = q(10);
        assert_eq!(q.oldest_accepted_ms().await.unwrap(), None);
        let at = |ms: i64| NewRecord {
            accepted_ms: ms,
            ..rec("a")
        };
        q.enqueue(vec![event("1", vec![at(100)])]).await.unwrap();
        q.enqueue(vec![event("2", vec![at(200)])]).await.unwrap();
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
    async fn duplicates_within_the_window_are_not_stored_twice() {
        let q = q(10);
        let dups = q
            .enqueue(vec![
                event("e1", vec![rec("a"), rec("b")]),
                event("e1", vec![rec("a")]),
                event("e2", vec![rec("a")]),
            ])
            .await
            .unwrap();
        assert_eq!(dups, vec![false, true, false]);
        assert_eq!(
            q.enqueue(vec![event("e1", vec![rec("a")])]).await.unwrap(),
            vec![true]
        );
        assert_eq!(q.depth(), 3);
        let short = MemoryQueue::new(10, Duration::ZERO);
        short.enqueue(vec![event("e1", vec![rec("a")])]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            short.enqueue(vec![event("e1", vec![rec("a")])]).await.unwrap(),
            vec![false]
        );
    }

    #[tokio::test]
    async fn events_with_relay_made_ids_are_never_duplicates() {
        let q = q(10);
        let anonymous = || EventRecords {
            dedup_key: None,
            records: vec![rec("a")],
        };
        assert_eq!(
            q.enqueue(vec![anonymous(), anonymous()]).await.unwrap(),
            vec![false, false]
        );
        assert_eq!(q.depth(), 2);
    }
}
