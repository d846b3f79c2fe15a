//! The dedup index of the in-process queues: which events were accepted within the dedup window.
//!
//! Senders that set `messageId` (every Signal SDK) or Customer.io's `event_id` make every event
//! a dedup lookup and, when new, a dedup insert. Kept as a SQLite index, random ids put each
//! insert on its own page of an index that grows with the window: at 5 million keys (8 events/s
//! over the 7-day default window) every accepted event rewrote a 16 KB page to the log and read
//! one back, and batched ingest fell from ~90,000 to ~24,000 events/s. So the index lives in
//! memory, as the 128-bit SHA-256 prefix of each key (a false duplicate, the only way it could
//! lose an event, is a 2^-128 chance per pair of keys), and the embedded queue only appends, in
//! the transaction that accepts the events, one log row holding the hashes it added, from which
//! the index is rebuilt after a restart.
//!
//! Keys are kept in generations, each covering an eighth of the window or holding about an
//! eighth of `max_ids` (the nearest count that fills a hash table), whichever comes first: a
//! generation is forgotten whole once its newest key is older than the window, so a key is
//! remembered for at least the window and at most an eighth longer (plus the second between two
//! looks), and expiry costs nothing per key. Past `max_ids` the oldest generations are
//! forgotten first, shortening the window; [`Seen::expire`] reports it. Memory: a 16-byte hash in
//! a hash table, 19.4 bytes a key in a generation closed full, ~25 on average (2 million keys:
//! ~40-50 MB).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A dedup key's identity: the first 128 bits of its SHA-256.
pub(super) type KeyHash = u128;

/// The hash of a dedup key.
pub(super) fn key_hash(key: &str) -> KeyHash {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// The hashes of `events`' dedup keys (none for an event whose id the relay made up).
pub(super) fn key_hashes(events: &[super::EventRecords]) -> Vec<Option<KeyHash>> {
    events
        .iter()
        .map(|e| e.dedup_key.as_deref().map(key_hash))
        .collect()
}

/// Generations per window (and per `max_ids`).
const GENERATIONS: i64 = 8;

/// The dedup settings of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dedup {
    /// How long an accepted event's id is remembered.
    pub window: Duration,
    /// The most ids remembered; past it the oldest are forgotten first.
    pub max_ids: usize,
}

impl Dedup {
    /// The default bound on remembered ids (~40-50 MB of memory).
    pub const DEFAULT_MAX_IDS: usize = 2_000_000;
}

impl From<Duration> for Dedup {
    /// `window` with the default bound on remembered ids.
    fn from(window: Duration) -> Self {
        Dedup {
            window,
            max_ids: Self::DEFAULT_MAX_IDS,
        }
    }
}

/// The number of keys nearest to `n` (at least 7) that fills a hash table exactly: the table
/// holds 7/8 of a power of two before it doubles, so a generation closed at that size costs
/// ~19.4 bytes a key (16-byte hash, 1 control byte, 1/8 free), not up to twice that. Nearest
/// by ratio, so a bound makes between ~5.7 and ~11.3 generations, each a lookup.
fn full_table(n: usize) -> usize {
    // Full sizes are 7 * 2^k (7/8 of 8 * 2^k buckets).
    let mut below = 7usize;
    while below.saturating_mul(2) <= n {
        below *= 2;
    }
    let above = below.saturating_mul(2);
    // above / n < n / below
    if n >= 7 && (above as u128) * (below as u128) < (n as u128) * (n as u128) {
        above
    } else {
        below
    }
}

/// A process-wide secret: where a key lands in a table cannot be chosen by a sender who picks
/// ids (hashes are public: SHA-256 of the id), so nobody can make lookups walk long probe chains.
fn table_seed() -> (u64, u64) {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    *SEED.get_or_init(|| (rand::random::<u64>() | 1, rand::random::<u64>()))
}

/// Hashes a [`KeyHash`] for a table: both halves, mixed with [`table_seed`] (a folded 128-bit
/// multiply, as foldhash does).
pub(super) struct Keyed {
    seed: (u64, u64),
    state: u64,
}

impl Hasher for Keyed {
    fn finish(&self) -> u64 {
        self.state
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let product = u128::from(self.state ^ v ^ self.seed.1) * u128::from(self.seed.0);
        // Truncations intended: the two halves of the product, folded.
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
    fn write_u128(&mut self, v: u128) {
        // Truncations intended: the two halves of the key.
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

/// Builds [`Keyed`] hashers with the process's seed.
#[derive(Clone, Copy)]
pub(super) struct KeyedState((u64, u64));

impl Default for KeyedState {
    fn default() -> Self {
        KeyedState(table_seed())
    }
}

impl BuildHasher for KeyedState {
    type Hasher = Keyed;
    fn build_hasher(&self) -> Keyed {
        Keyed {
            seed: self.0,
            state: 0,
        }
    }
}

/// A set of key hashes.
pub(super) type HashSetOf = HashSet<KeyHash, KeyedState>;

/// Keys accepted within one stretch of time.
struct Generation {
    /// When its first key was accepted (unix ms).
    start_ms: i64,
    /// When its newest key was accepted.
    newest_ms: i64,
    /// The lowest and highest log rows holding its keys (0: none). A row may hold keys of two
    /// generations.
    first_row: i64,
    last_row: i64,
    keys: HashSetOf,
}

/// What [`Seen::expire`] forgot.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Expired {
    /// Log rows up to this one hold only forgotten keys (0: no row to delete).
    pub last_row: i64,
    /// Keys forgotten before the window ran out (the `max_ids` bound), and the age of the
    /// newest of them: the window the bound left.
    pub early: Option<(usize, Duration)>,
}

/// The ids accepted within the window, as hashes, oldest generation first.
pub(super) struct Seen {
    window_ms: i64,
    span_ms: i64,
    max_ids: usize,
    generation_keys: usize,
    generations: VecDeque<Generation>,
    len: usize,
}

impl Seen {
    /// An empty index with `dedup`'s window and bound.
    pub(super) fn new(dedup: Dedup) -> Self {
        let window_ms = i64::try_from(dedup.window.as_millis()).unwrap_or(i64::MAX);
        let max_ids = dedup.max_ids.max(1);
        Seen {
            window_ms,
            span_ms: (window_ms / GENERATIONS).max(1),
            max_ids,
            generation_keys: full_table(max_ids / GENERATIONS as usize),
            generations: VecDeque::new(),
            len: 0,
        }
    }

    /// Whether `key` was accepted within the window.
    pub(super) fn contains(&self, key: KeyHash) -> bool {
        self.generations.iter().rev().any(|g| g.keys.contains(&key))
    }

    /// Remembers `key`, accepted at `at_ms` and kept in log row `row` (0: no log).
    pub(super) fn insert(&mut self, key: KeyHash, at_ms: i64, row: i64) {
        let fresh = match self.generations.back() {
            Some(g) => {
                at_ms >= g.start_ms.saturating_add(self.span_ms) || g.keys.len() >= self.generation_keys
            }
            None => true,
        };
        if fresh {
            self.generations.push_back(Generation {
                start_ms: at_ms,
                newest_ms: at_ms,
                first_row: row,
                last_row: row,
                keys: HashSetOf::default(),
            });
        }
        if let Some(g) = self.generations.back_mut() {
            if g.keys.insert(key) {
                self.len += 1;
            }
            g.newest_ms = g.newest_ms.max(at_ms);
            g.last_row = g.last_row.max(row);
        }
    }

    /// Forgets the generations whose keys are all older than the window at `now_ms`, then the
    /// oldest while more than `max_ids` are remembered.
    pub(super) fn expire(&mut self, now_ms: i64) -> Expired {
        let mut out = Expired::default();
        while let Some(g) = self.generations.front() {
            let old = now_ms.saturating_sub(g.newest_ms) > self.window_ms;
            let over = self.len > self.max_ids && self.generations.len() > 1;
            if !old && !over {
                break;
            }
            let Some(g) = self.generations.pop_front() else {
                break;
            };
            self.len -= g.keys.len();
            // The row a forgotten generation shares with the next one stays.
            out.last_row = match self.generations.front() {
                Some(next) if next.first_row > 0 && next.first_row <= g.last_row => next.first_row - 1,
                _ => out.last_row.max(g.last_row),
            };
            if !old {
                let age =
                    Duration::from_millis(u64::try_from(now_ms.saturating_sub(g.newest_ms)).unwrap_or(0));
                let (n, _) = out.early.unwrap_or_default();
                out.early = Some((n + g.keys.len(), age));
            }
        }
        out
    }

    /// The most keys remembered.
    pub(super) fn max_ids(&self) -> usize {
        self.max_ids
    }

    /// Keys remembered.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(window_ms: u64, max_ids: usize) -> Seen {
        Seen::new(Dedup {
            window: Duration::from_millis(window_ms),
            max_ids,
        })
    }

    #[test]
    fn hashes_are_stable_and_tell_keys_apart() {
        assert_eq!(key_hash("signal:a"), key_hash("signal:a"));
        assert_ne!(key_hash("signal:a"), key_hash("customerio:a"));
        // The first 16 bytes of SHA-256("abc"), big-endian.
        assert_eq!(key_hash("abc"), 0xba78_16bf_8f01_cfea_4141_40de_5dae_2223);
    }

    #[test]
    fn a_key_is_remembered_for_the_window_and_forgotten_after() {
        let mut s = seen(8_000, 100);
        s.insert(1, 0, 1);
        s.insert(2, 500, 2);
        s.insert(3, 1_000, 3); // a new generation: the first spans 1,000 ms
        assert!(s.contains(1) && s.contains(2) && s.contains(3));
        assert!(!s.contains(4));
        // Key 2 (the newest of the first generation) is exactly a window old: kept.
        assert_eq!(s.expire(8_500), Expired::default());
        assert!(s.contains(1));
        // A millisecond later the first generation goes, with its log rows; key 3 stays.
        assert_eq!(
            s.expire(8_501),
            Expired {
                last_row: 2,
                early: None
            }
        );
        assert!(!s.contains(1) && !s.contains(2) && s.contains(3));
        assert_eq!(s.len(), 1);
        assert_eq!(s.expire(9_001).last_row, 3);
        assert_eq!(s.len(), 0);
        assert!(!s.contains(3));
    }

    #[test]
    fn generations_close_where_their_table_is_full() {
        assert_eq!(full_table(0), 7);
        assert_eq!(full_table(9), 7);
        assert_eq!(full_table(10), 14);
        assert_eq!(full_table(14), 14);
        assert_eq!(full_table(250_000), 229_376);
        assert_eq!(full_table(450_000), 458_752);
        let mut table = HashSetOf::default();
        table.extend(0..229_376u128);
        assert_eq!(table.capacity(), 229_376, "2^18 buckets, 7/8 of them used");
        // Whatever the bound, a lookup checks between 6 and 12 generations.
        for max_ids in [1_000usize, 2_000_000, 2_600_000, 3_600_000, 50_000_000] {
            let generations = max_ids.div_ceil(full_table(max_ids / 8));
            assert!((6..=12).contains(&generations), "{max_ids}: {generations}");
        }
    }

    #[test]
    fn past_max_ids_the_oldest_generations_go_first_and_it_is_reported() {
        // 16 keys at most: generations of 7 keys.
        let mut s = seen(3_600_000, 16);
        for k in 0..20u128 {
            s.insert(k, 1_000, i64::try_from(k).unwrap() + 1);
        }
        assert_eq!(s.len(), 20);
        let expired = s.expire(61_000);
        assert_eq!(s.len(), 13);
        assert_eq!(expired.last_row, 7);
        assert_eq!(expired.early, Some((7, Duration::from_secs(60))));
        assert!(!s.contains(0) && !s.contains(6) && s.contains(7) && s.contains(19));
    }

    #[test]
    fn a_log_row_shared_with_a_generation_still_remembered_stays() {
        // Keys 0..10 in log row 1 (one transaction), split 7 + 3 between two generations.
        let mut s = seen(3_600_000, 16);
        for k in 0..10u128 {
            s.insert(k, 1_000, 1);
        }
        s.insert(10, 1_000, 2);
        s.insert(11, 1_000, 3);
        for k in 12..20u128 {
            s.insert(k, 1_000, 4);
        }
        // 20 keys: the first generation (row 1) goes, but row 1 also holds keys 7..9.
        assert_eq!(s.expire(2_000).last_row, 0);
        assert!(s.contains(7) && !s.contains(6));
        // Past the window everything goes, every row with it.
        assert_eq!(s.expire(3_602_000).last_row, 4);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn an_insert_seen_twice_counts_once_and_clocks_going_back_do_not_split() {
        let mut s = seen(8_000, 100);
        s.insert(7, 5_000, 1);
        s.insert(7, 5_001, 2);
        s.insert(8, 4_000, 3); // the clock went back: same generation
        assert_eq!(s.len(), 2);
        assert_eq!(s.generations.len(), 1);
        assert_eq!(s.expire(13_002).last_row, 3);
        assert_eq!(s.len(), 0);
    }
}
