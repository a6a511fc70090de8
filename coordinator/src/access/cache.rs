//! A small bounded map whose entries expire: what the access checks remember
//! of TokenReview and SubjectAccessReview answers.
//!
//! Time is `tokio::time::Instant`, so tests move it with `tokio::time::pause`
//! and `advance` instead of sleeping.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A map of at most `capacity` entries, each valid until its own deadline.
pub struct TtlCache<K, V> {
    capacity: usize,
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        TtlCache {
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The value under `key` if it has not expired.
    pub fn get(&self, key: &K) -> Option<V> {
        let mut entries = self.entries.lock().unwrap();
        match entries.get(key) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `value` under `key` for `ttl`. When full, expired entries
    /// go first, then the one closest to expiring.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= self.capacity
                && let Some(first) = entries
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&first);
            }
        }
        entries.insert(key, (value, now + ttl));
    }

    /// How many entries are held (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_entry_is_served_until_its_deadline_and_not_after() {
        let c = TtlCache::new(4);
        c.insert("a", 1, Duration::from_secs(10));
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(c.get(&"a"), Some(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(c.get(&"a"), None);
        assert!(c.is_empty(), "an expired entry is dropped when read");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_drops_expired_entries_then_the_soonest_to_expire() {
        let c = TtlCache::new(2);
        c.insert("short", 1, Duration::from_secs(1));
        c.insert("long", 2, Duration::from_secs(60));
        c.insert("new", 3, Duration::from_secs(30));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"short"), None);
        assert_eq!(c.get(&"long"), Some(2));
        tokio::time::advance(Duration::from_secs(31)).await;
        c.insert("newer", 4, Duration::from_secs(5));
        assert_eq!((c.get(&"long"), c.get(&"newer")), (Some(2), Some(4)));
        assert_eq!(c.len(), 2, "the expired entry made room");
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_is_not_remembered() {
        let c = TtlCache::new(2);
        c.insert("a", 1, Duration::ZERO);
        assert_eq!(c.get(&"a"), None);
    }
}
