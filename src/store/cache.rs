//! [`ReaderCache`]: the packs one operation reads, each opened once and
//! shared by its threads (export's workers, copy, verify).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::object::ObjectStore;
use super::pack::PackReader;
use crate::error::Result;

/// Packs kept open at most; past it the longest open is dropped from the
/// cache (its users keep their handle).
const MAX_OPEN: usize = 64;

/// Open packs by the caller's key (the catalog's pack row id).
pub struct ReaderCache<'s, K> {
    store: &'s dyn ObjectStore,
    open: Mutex<Open<K>>,
}

struct Open<K> {
    readers: HashMap<K, Arc<PackReader>>,
    order: VecDeque<K>,
}

impl<'s, K: Copy + Eq + Hash> ReaderCache<'s, K> {
    /// An empty cache of packs of `store`.
    pub fn new(store: &'s dyn ObjectStore) -> ReaderCache<'s, K> {
        ReaderCache {
            store,
            open: Mutex::new(Open {
                readers: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// The reader of pack `name` (known to the caller as `key`), opened on
    /// first use.
    pub fn get(&self, key: K, name: &str) -> Result<Arc<PackReader>> {
        let mut open = self.open.lock().unwrap();
        if let Some(r) = open.readers.get(&key) {
            return Ok(r.clone());
        }
        let r = Arc::new(PackReader::open(self.store, name)?);
        if open.order.len() >= MAX_OPEN {
            if let Some(old) = open.order.pop_front() {
                open.readers.remove(&old);
            }
        }
        open.order.push_back(key);
        open.readers.insert(key, r.clone());
        Ok(r)
    }
}
