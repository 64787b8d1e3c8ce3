//! Facts about rows that never change once true, remembered so that hot paths need not
//! ask the database again: a zone exists (zones are never deleted), an item is in a
//! zone (items never change zones, and ids are never reused).
//!
//! Must hold only what the database said, and only facts of that kind: anything that
//! can become false (a key's validity, an item's quantity) does not belong here. A
//! remembered fact may outlive its row (a deleted item); each user must say why that
//! cannot change an answer.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;

/// Entries held at most; the map is emptied when full (each fact then costs one query
/// again). About 40 bytes each.
pub(super) const FACTS_MAX: usize = 100_000;

pub(super) struct Facts<K, V>(RwLock<HashMap<K, V>>);

impl<K, V> Default for Facts<K, V> {
    fn default() -> Self {
        Facts(RwLock::new(HashMap::new()))
    }
}

impl<K: Eq + Hash, V: Copy> Facts<K, V> {
    pub(super) fn get(&self, key: &K) -> Option<V> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.get(key).copied()
    }

    pub(super) fn insert(&self, key: K, value: V) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= FACTS_MAX {
            map.clear();
        }
        map.insert(key, value);
    }

    pub(super) fn remove(&self, key: &K) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        map.remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.read().map(|m| m.len()).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_hold_at_most_their_bound() {
        let facts = Facts::default();
        for id in 0..=FACTS_MAX as i32 {
            facts.insert(id, 7);
        }
        assert!(facts.len() <= FACTS_MAX, "{} held", facts.len());
        let newest = FACTS_MAX as i32;
        assert_eq!(facts.get(&newest), Some(7), "the newest is kept");
        facts.remove(&newest);
        assert_eq!(facts.get(&newest), None);
    }
}
