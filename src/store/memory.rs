//! [`MemoryStore`]: an [`ObjectStore`] in memory with a remote store's
//! semantics (built for tests only): sealed objects appear whole, a torn
//! writer leaves nothing, and deletion is a tombstone that
//! [`ObjectStore::purge`] honours after the grace it is given, on a clock the
//! test moves ([`MemoryStore::advance`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::object::{ObjectInfo, ObjectKind, ObjectReader, ObjectStore, ObjectWriter, RangeBytes};
use crate::error::{Error, Result};

/// One stored object.
struct Stored {
    bytes: Arc<Vec<u8>>,
    /// When it was sealed (the store's clock).
    written: Duration,
    /// When it was deleted (the store's clock), if it was.
    deleted: Option<Duration>,
}

#[derive(Default)]
struct State {
    objects: HashMap<(ObjectKind, String), Stored>,
    now: Duration,
}

/// What other hosts do at a given moment of a test (see
/// [`MemoryStore::after_first_list`], [`MemoryStore::fail_nth_put`]).
#[derive(Default)]
struct Hooks {
    after_list: Option<(ObjectKind, Box<dyn FnOnce() + Send>)>,
    /// Kind, the 1-based put of that kind to fail, puts of it so far.
    fail_put: Option<(ObjectKind, usize, usize)>,
}

/// Objects in memory, shared by clones of the store.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    hooks: Arc<Mutex<Hooks>>,
}

impl MemoryStore {
    /// Runs `f` once, right after the store next lists objects of `kind`
    /// (the listing is made before `f` runs): what other hosts did while
    /// the lister was stopped after its listing.
    pub fn after_first_list(&self, kind: ObjectKind, f: impl FnOnce() + Send + 'static) {
        self.hooks.lock().unwrap().after_list = Some((kind, Box::new(f)));
    }

    /// Fails the `nth` (1-based) [`ObjectStore::put`] of an object of
    /// `kind` from now on, as a connection reset would.
    pub fn fail_nth_put(&self, kind: ObjectKind, nth: usize) {
        self.hooks.lock().unwrap().fail_put = Some((kind, nth, 0));
    }

    /// Whether this put is the one [`MemoryStore::fail_nth_put`] fails.
    fn put_fails(&self, kind: ObjectKind) -> bool {
        let mut h = self.hooks.lock().unwrap();
        match &mut h.fail_put {
            Some((k, nth, seen)) if *k == kind => {
                *seen += 1;
                *seen == *nth
            }
            _ => false,
        }
    }

    /// Runs the hook waiting for a listing of `kind`, if any (the state
    /// lock is not held: the hook uses the store).
    fn listed(&self, kind: ObjectKind) {
        let hook = {
            let mut h = self.hooks.lock().unwrap();
            match h.after_list.take() {
                Some((k, f)) if k == kind => Some(f),
                other => {
                    h.after_list = other;
                    None
                }
            }
        };
        if let Some(f) = hook {
            f();
        }
    }

    /// Moves the store's clock on.
    pub fn advance(&self, by: Duration) {
        self.state.lock().unwrap().now += by;
    }

    /// Whether the bytes of an object are still held (deleted or not).
    pub fn holds(&self, kind: ObjectKind, name: &str) -> bool {
        let st = self.state.lock().unwrap();
        st.objects.contains_key(&(kind, name.to_owned()))
    }

    fn exists_error(kind: ObjectKind, name: &str) -> Error {
        let e = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
        Error::io(label(kind, name), e)
    }

    /// Stores a sealed object, refusing a name in use.
    fn store(&self, kind: ObjectKind, name: &str, bytes: Vec<u8>) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let key = (kind, name.to_owned());
        if st.objects.get(&key).is_some_and(|o| o.deleted.is_none()) {
            return Err(Self::exists_error(kind, name));
        }
        let written = st.now;
        st.objects.insert(
            key,
            Stored {
                bytes: Arc::new(bytes),
                written,
                deleted: None,
            },
        );
        Ok(())
    }

    /// A live (not deleted) object's bytes.
    fn live(&self, kind: ObjectKind, name: &str) -> Option<Arc<Vec<u8>>> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(kind, name.to_owned()))
            .filter(|o| o.deleted.is_none())
            .map(|o| o.bytes.clone())
    }
}

fn label(kind: ObjectKind, name: &str) -> String {
    format!("memory:{kind:?}/{name}")
}

impl ObjectStore for MemoryStore {
    fn create(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if self.live(kind, name).is_some() {
            return Err(Self::exists_error(kind, name));
        }
        Ok(Box::new(MemoryWriter {
            store: self.clone(),
            kind,
            name: name.to_owned(),
            bytes: Vec::new(),
        }))
    }

    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        if self.put_fails(kind) {
            return Err(Error::Invalid("injected: connection reset".into()));
        }
        self.store(kind, name, bytes.to_vec())
    }

    /// Deleted objects stay readable until purged: a remote store's grace.
    fn open(&self, kind: ObjectKind, name: &str) -> Result<Arc<dyn ObjectReader>> {
        let st = self.state.lock().unwrap();
        match st.objects.get(&(kind, name.to_owned())) {
            Some(o) => Ok(Arc::new(MemoryReader {
                bytes: o.bytes.clone(),
                label: label(kind, name),
            })),
            None => {
                let e = std::io::Error::from(std::io::ErrorKind::NotFound);
                Err(Error::io(label(kind, name), e))
            }
        }
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.live(kind, name).map(|b| b.to_vec()))
    }

    fn info(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectInfo>> {
        let st = self.state.lock().unwrap();
        Ok((st.objects.get(&(kind, name.to_owned())))
            .filter(|o| o.deleted.is_none())
            .map(|o| ObjectInfo {
                name: name.to_owned(),
                size: o.bytes.len() as u64,
                modified: Some(SystemTime::UNIX_EPOCH + o.written),
            }))
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let listed = {
            let st = self.state.lock().unwrap();
            st.objects
                .iter()
                .filter(|((k, _), o)| *k == kind && o.deleted.is_none())
                .map(|((_, name), o)| ObjectInfo {
                    name: name.clone(),
                    size: o.bytes.len() as u64,
                    modified: Some(SystemTime::UNIX_EPOCH + o.written),
                })
                .collect()
        };
        self.listed(kind);
        Ok(listed)
    }

    fn retired(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let st = self.state.lock().unwrap();
        Ok(st
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .filter_map(|((_, name), o)| {
                Some(ObjectInfo {
                    name: name.clone(),
                    size: o.bytes.len() as u64,
                    modified: Some(SystemTime::UNIX_EPOCH + o.deleted?),
                })
            })
            .collect())
    }

    fn revive(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        match st.objects.get_mut(&(kind, name.to_owned())) {
            Some(o) => {
                o.deleted = None;
                Ok(())
            }
            None => {
                let e = std::io::Error::from(std::io::ErrorKind::NotFound);
                Err(Error::io(label(kind, name), e))
            }
        }
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let now = st.now;
        let key = (kind, name.to_owned());
        if kind == ObjectKind::Meta {
            st.objects.remove(&key);
        } else if let Some(o) = st.objects.get_mut(&key) {
            o.deleted.get_or_insert(now);
        }
        Ok(())
    }

    fn purge_retired(
        &self,
        kind: ObjectKind,
        names: &[String],
        retired_by: SystemTime,
    ) -> Result<Vec<String>> {
        let mut st = self.state.lock().unwrap();
        let mut purged = Vec::new();
        for name in names {
            let key = (kind, name.clone());
            let due = (st.objects.get(&key))
                .and_then(|o| o.deleted)
                .is_some_and(|at| SystemTime::UNIX_EPOCH + at <= retired_by);
            if due {
                st.objects.remove(&key);
                purged.push(name.clone());
            }
        }
        Ok(purged)
    }

    fn label(&self, kind: ObjectKind, name: &str) -> String {
        label(kind, name)
    }

    /// The test's clock.
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.state.lock().unwrap().now
    }
}

/// An upload in progress: nothing is visible until it is sealed.
struct MemoryWriter {
    store: MemoryStore,
    kind: ObjectKind,
    name: String,
    bytes: Vec<u8>,
}

impl ObjectWriter for MemoryWriter {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn seal(self: Box<Self>) -> Result<u64> {
        let n = self.bytes.len() as u64;
        self.store.store(self.kind, &self.name, self.bytes)?;
        Ok(n)
    }
}

/// A sealed object's bytes, held while the reader lives.
struct MemoryReader {
    bytes: Arc<Vec<u8>>,
    label: String,
}

impl ObjectReader for MemoryReader {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<RangeBytes> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len());
        match end {
            Some(end) => Ok(Box::new(self.bytes[offset as usize..end as usize].to_vec())),
            None => Err(Error::StoreDamaged(format!(
                "{}: bytes at offset {offset} (+{len}) lie past its end ({} bytes): the object is torn or truncated; `vmdepot fsck` checks the store",
                self.label,
                self.len()
            ))),
        }
    }

    fn label(&self) -> &str {
        &self.label
    }
}
