//! [`S3Store`]: the [`ObjectStore`] of a remote depot, on S3-compatible
//! object storage (Garage, Ceph RGW, MinIO, AWS S3) through the
//! `object_store` crate; [`S3Location`] says where. Its readers and
//! writers (ranged GETs, multipart uploads) are in `transfer`, the naming
//! rules in `location`, credentials in `credentials`, and how a failed
//! request becomes one line in `fail`.
//!
//! The store owns a small tokio runtime; every method blocks on it, so the
//! rest of vmdepot stays synchronous (readers are used from several
//! threads at once). Requests are retried with backoff on throttling, 5xx
//! and dropped connections (`retry_config`); an endpoint that refuses or
//! does not answer fails within seconds.
//!
//! **Names are unique by construction** (packs have random names, manifest
//! names carry the image id and version): `create` and `put` check with a
//! HEAD that the name is free, a guard against mistakes rather than races.
//! (Garage 2.5 ignores `If-None-Match: *` on PUT, so a conditional create
//! would not be one there.)
//!
//! **Deferred deletion** ([`ObjectStore::delete`]): retiring an object
//! writes an empty tombstone at `trash/<its key>`, whose LastModified is
//! the retirement time, and leaves the bytes. While the tombstone exists
//! the object is not listed, stat'ed or got, but [`ObjectStore::open`]
//! still reads it; [`ObjectStore::revive`] deletes the tombstone and
//! [`ObjectStore::purge_retired`] deletes the object, then its tombstone
//! (if the tombstone is still as old as the caller's listing showed).

mod credentials;
mod fail;
mod listing;
mod location;
mod transfer;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStoreExt, PutPayload, RetryConfig,
};

use self::fail::{Failure, Target};
use self::location::{Keys, DEFAULT_REGION};
use self::transfer::{S3Reader, S3Writer};
use crate::error::{Error, Result};
use crate::store::{ObjectInfo, ObjectKind, ObjectReader, ObjectStore, ObjectWriter};

pub use self::credentials::S3Credentials;
pub use self::location::S3Location;

/// The largest object [`ObjectStore::get`] reads whole (a manifest of a
/// ~300 GiB image); meta objects are far smaller.
const MAX_GET: u64 = 1 << 30;
/// The largest meta object [`ObjectStore::get`] reads.
const MAX_META: u64 = 1 << 20;
/// Deletes [`ObjectStore::purge_retired`] runs at once.
const PURGE_PARALLEL: usize = 16;

/// How long a request may take before it fails: a batch job (push, pull,
/// gc) waits out a remote's hiccups; a guest waiting for a disk read
/// (a lazy disk server) must get its I/O error soon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// 6 retries, backoff from 100 ms to 10 s, none started after 150 s;
    /// 120 s per attempt.
    Batch,
    /// 1 retry after 200 ms, none started after 5 s; 10 s per attempt: a
    /// refused connection fails in well under a second, a silent endpoint
    /// in about 25 s.
    Interactive,
}

/// The retry policy of every request.
fn retry_config(p: Patience) -> RetryConfig {
    match p {
        Patience::Batch => RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: 6,
            retry_timeout: Duration::from_secs(150),
        },
        Patience::Interactive => RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
        },
    }
}

/// A remote depot's objects in an S3 bucket (see the module doc).
pub struct S3Store {
    inner: Arc<Inner>,
}

/// What the store, its readers and its writers share.
struct Inner {
    rt: tokio::runtime::Runtime,
    s3: AmazonS3,
    keys: Keys,
    remote: String,
    bucket: String,
    /// The endpoint, for messages.
    endpoint: String,
    /// Parts being uploaded, store-wide: bounds the memory of uploads.
    parts: Arc<tokio::sync::Semaphore>,
}

impl S3Store {
    /// Opens the remote named `remote` (its name is in every error) at
    /// `loc`, with the credentials of the environment or of the shared
    /// credentials file. Sends nothing: see [`S3Store::probe`].
    pub fn open(loc: &S3Location, remote: &str) -> Result<S3Store> {
        S3Store::open_patient(loc, remote, Patience::Batch)
    }

    /// [`S3Store::open`] with the [`Patience`] of its requests.
    pub fn open_patient(loc: &S3Location, remote: &str, patience: Patience) -> Result<S3Store> {
        loc.validate(remote)?;
        S3Store::open_with_patience(loc, remote, &S3Credentials::load(remote)?, patience)
    }

    /// [`S3Store::open`] with the credentials given (a library user's own,
    /// or a test's: the environment is the process's, shared by threads).
    /// The endpoint and region not in `loc` still come from the
    /// environment (see [`S3Location`]).
    pub fn open_with(loc: &S3Location, remote: &str, creds: &S3Credentials) -> Result<S3Store> {
        S3Store::open_with_patience(loc, remote, creds, Patience::Batch)
    }

    /// [`S3Store::open_with`] with the [`Patience`] of its requests.
    pub fn open_with_patience(
        loc: &S3Location,
        remote: &str,
        creds: &S3Credentials,
        patience: Patience,
    ) -> Result<S3Store> {
        let loc = loc.resolved();
        loc.validate(remote)?;
        let region = loc.region.as_deref().unwrap_or(DEFAULT_REGION);
        let s3 = build_client(&loc, creds, patience)
            .map_err(|e| client_error(remote, &e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmdepot-s3")
            .enable_all()
            .build()
            .map_err(|e| client_error(remote, &e.to_string()))?;
        let endpoint =
            (loc.endpoint.clone()).unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let inner = Inner {
            rt,
            s3,
            keys: Keys::new(&loc.prefix),
            remote: remote.to_owned(),
            bucket: loc.bucket,
            endpoint,
            parts: Arc::new(tokio::sync::Semaphore::new(transfer::PARTS_IN_FLIGHT)),
        };
        Ok(S3Store {
            inner: Arc::new(inner),
        })
    }

    /// Checks that the remote answers and that the credentials may list
    /// its prefix (one listing of at most one key): what `remote add`
    /// runs.
    pub fn probe(&self) -> Result<()> {
        let i = &self.inner;
        let root = i.keys.root(false);
        let opts = PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        let prefix = Some(root.as_str()).filter(|r| !r.is_empty());
        match i.block_on(i.s3.list_paginated(prefix, opts)) {
            // it answered, with a key the client cannot parse
            Err(e) if listing::unparsable_key(&e).is_some() => Ok(()),
            r => r.map(drop).map_err(|e| i.fail("listing", &root, &e)),
        }
    }

    /// Up to `max` keys of the prefix's whole tree (no delimiter) that
    /// are no object or tombstone this store makes (of meta objects, the
    /// names in `metas` only): what `remote add` refuses, so that a remote
    /// never shares its prefix with other data (the bucket's root holding
    /// another remote's prefix included).
    pub fn foreign_keys(&self, max: usize, metas: &[&str]) -> Result<Vec<String>> {
        let i = &self.inner;
        let root = i.keys.root(false);
        let opts = PaginatedListOptions {
            max_keys: Some(max),
            ..Default::default()
        };
        let prefix = Some(root.as_str()).filter(|r| !r.is_empty());
        let page = i
            .block_on(i.s3.list_paginated(prefix, opts))
            .map_err(|e| i.fail("listing", &root, &e))?;
        let keys = page.result.objects.into_iter();
        Ok(keys
            .map(|o| o.location.to_string())
            .filter(|k| !i.keys.owns(k, metas))
            .collect())
    }
}

fn client_error(remote: &str, why: &str) -> Error {
    Error::Remote {
        remote: remote.to_owned(),
        message: format!(
            "setting up the S3 client: {}; check the remote's endpoint and region",
            crate::error::one_line(why)
        ),
    }
}

/// The `object_store` client of a resolved location: path-style
/// requests for a custom endpoint (virtual-hosted style for AWS itself),
/// plain HTTP only when the endpoint says `http://`; a connect timeout of
/// 2 s (an endpoint that refuses fails in about a second, one that drops
/// packets after 7 attempts of 2 s and their backoff) and 120 s for a
/// whole request (10 s when [`Patience::Interactive`]).
fn build_client(
    loc: &S3Location,
    creds: &S3Credentials,
    patience: Patience,
) -> object_store::Result<AmazonS3> {
    let endpoint = loc.endpoint.as_deref();
    let attempt = match patience {
        Patience::Batch => Duration::from_secs(120),
        Patience::Interactive => Duration::from_secs(10),
    };
    let options = ClientOptions::new()
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(attempt);
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&loc.bucket)
        .with_region(loc.region.as_deref().unwrap_or(DEFAULT_REGION))
        .with_access_key_id(&creds.key_id)
        .with_secret_access_key(&creds.secret)
        .with_virtual_hosted_style_request(endpoint.is_none())
        .with_retry(retry_config(patience))
        .with_client_options(options);
    if let Some(token) = &creds.token {
        b = b.with_token(token);
    }
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    b.build()
}

/// An object's state on the remote: its metadata if its bytes are there,
/// and whether it is retired (a tombstone exists).
struct State {
    object: Option<ObjectMeta>,
    retired: bool,
}

impl State {
    /// The metadata of a live object.
    fn live(self) -> Option<ObjectMeta> {
        self.object.filter(|_| !self.retired)
    }
}

impl Inner {
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn target(&self) -> Target<'_> {
        Target {
            remote: &self.remote,
            endpoint: &self.endpoint,
            bucket: &self.bucket,
        }
    }

    /// The one-line error of a failed request on `key`.
    fn fail(&self, what: &str, key: &str, e: &object_store::Error) -> Error {
        Failure::of(e).into_error(&self.target(), what, &self.url(key))
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// How messages name an object: its URL and the remote.
    fn label(&self, key: &str) -> String {
        format!("{} (remote {})", self.url(key), self.remote)
    }

    /// The key of an object (`trash`: of its tombstone); a refused name
    /// is an error naming the remote.
    fn key(&self, kind: ObjectKind, name: &str, trash: bool) -> Result<String> {
        self.keys.key(kind, name, trash).map_err(|why| Error::Remote {
            remote: self.remote.clone(),
            message: format!("refused an object name: {why}; the name comes from a damaged or hostile manifest or index, or from a bug"),
        })
    }

    /// An object's metadata (`None`: there is none).
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.head_of(key, key).await
    }

    /// The metadata of the object at `key`, which errors call `named` (a
    /// tombstone's failure names the object it is the tombstone of).
    async fn head_of(&self, key: &str, named: &str) -> Result<Option<ObjectMeta>> {
        match self.s3.head(&path(key)).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(self.fail("checking", named, &e)),
        }
    }

    /// The object and its tombstone, asked at once.
    async fn state(&self, kind: ObjectKind, name: &str) -> Result<State> {
        let key = self.key(kind, name, false)?;
        let tomb = self.key(kind, name, true)?;
        let (object, tomb) = futures_util::try_join!(self.head(&key), self.head_of(&tomb, &key))?;
        Ok(State {
            object,
            retired: tomb.is_some(),
        })
    }

    /// Refuses a name in use (a live object); `Ok(true)`: the name is a
    /// retired object's, whose tombstone the new object's writer removes.
    fn check_free(&self, kind: ObjectKind, name: &str) -> Result<bool> {
        let st = self.block_on(self.state(kind, name))?;
        match (&st.object, st.retired) {
            (Some(_), false) => {
                let key = self.key(kind, name, false)?;
                let e = std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the object exists: remote objects are written once",
                );
                Err(Error::io(self.label(&key), e))
            }
            (_, retired) => Ok(retired),
        }
    }

    async fn put(&self, key: &str, bytes: PutPayload) -> Result<()> {
        self.s3
            .put(&path(key), bytes)
            .await
            .map(drop)
            .map_err(|e| self.fail("writing", key, &e))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.s3.delete(&path(key)).await {
            Err(e) if !missing(&e) => Err(self.fail("deleting", key, &e)),
            _ => Ok(()),
        }
    }

    /// Every object (`trash`: tombstone) of a kind, with its size and
    /// time; keys that are not exactly what [`Keys::key`] makes are left
    /// out.
    async fn list_kind(&self, kind: ObjectKind, trash: bool) -> Result<Vec<ObjectInfo>> {
        let (prefix, flat) = self.keys.listing(kind, trash);
        let listed = self.list_prefix(&prefix, flat).await?;
        let info = |m: ObjectMeta| {
            Some(ObjectInfo {
                name: self.keys.parse(kind, m.location.as_ref(), trash)?,
                size: m.size,
                modified: Some(SystemTime::from(m.last_modified)),
            })
        };
        Ok(listed.into_iter().filter_map(info).collect())
    }

    /// A kind's objects (retired ones too) and its tombstones by name.
    fn scan(&self, kind: ObjectKind) -> Result<(Vec<ObjectInfo>, HashMap<String, ObjectInfo>)> {
        let (objects, tombs) = self.block_on(async {
            futures_util::try_join!(self.list_kind(kind, false), self.list_kind(kind, true))
        })?;
        let tombs = tombs.into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok((objects, tombs))
    }

    /// A live object's bytes, read whole (`None`: there is none, or it
    /// is retired: its tombstone `tomb` exists); refused past `limit`.
    async fn get(&self, key: &str, tomb: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let p = path(key);
        let (got, tomb) = futures_util::join!(self.s3.get(&p), self.head_of(tomb, key));
        let got = match got {
            Err(e) if missing(&e) => return Ok(None),
            r => r.map_err(|e| self.fail("reading", key, &e))?,
        };
        if tomb?.is_some() {
            return Ok(None);
        }
        if got.meta.size > limit {
            return Err(Error::Remote {
                remote: self.remote.clone(),
                message: format!(
                    "reading {}: {} bytes, more than the {limit} such an object may have: it is damaged or hostile; delete it from the bucket",
                    self.url(key),
                    got.meta.size
                ),
            });
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.fail("reading", key, &e))?;
        Ok(Some(bytes.into()))
    }

    /// Deletes a retired object then its tombstone, if its tombstone
    /// still exists and was written at or before `retired_by`; returns
    /// `name` if it did.
    async fn purge_one(
        &self,
        kind: ObjectKind,
        name: &str,
        retired_by: SystemTime,
    ) -> Result<Option<String>> {
        let (key, tomb) = (self.key(kind, name, false)?, self.key(kind, name, true)?);
        let due = (self.head_of(&tomb, &key).await?)
            .is_some_and(|t| SystemTime::from(t.last_modified) <= retired_by);
        if !due {
            return Ok(None);
        }
        self.delete(&key).await?;
        self.delete(&tomb).await?;
        Ok(Some(name.to_owned()))
    }
}

/// An `object_store` path of a key made by [`Keys`] (safe characters
/// only, so nothing is escaped).
fn path(key: &str) -> Path {
    Path::from_iter(key.split('/').filter(|s| !s.is_empty()))
}

/// Whether an error is a missing object (a missing bucket is not).
fn missing(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && !Failure::of(e).no_bucket()
}

/// [`Error::Io`] of kind `NotFound` for an object (what
/// [`super::is_not_found`] recognises).
fn not_found(label: String, why: &str) -> Error {
    Error::io(
        label,
        std::io::Error::new(std::io::ErrorKind::NotFound, why.to_owned()),
    )
}

impl ObjectStore for S3Store {
    fn create(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let i = &self.inner;
        let replaces = i.check_free(kind, name)?;
        let tomb = replaces.then(|| i.key(kind, name, true)).transpose()?;
        let key = i.key(kind, name, false)?;
        Ok(Box::new(S3Writer::new(self.inner.clone(), key, tomb)))
    }

    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        let i = &self.inner;
        let replaces = i.check_free(kind, name)?;
        let key = i.key(kind, name, false)?;
        i.block_on(i.put(&key, PutPayload::from(bytes.to_vec())))?;
        if replaces {
            i.block_on(i.delete(&i.key(kind, name, true)?))?;
        }
        Ok(())
    }

    fn open(&self, kind: ObjectKind, name: &str) -> Result<Arc<dyn ObjectReader>> {
        let i = &self.inner;
        let key = i.key(kind, name, false)?;
        match i.block_on(i.head(&key))? {
            Some(meta) => Ok(Arc::new(S3Reader::new(self.inner.clone(), key, meta.size))),
            None => Err(not_found(i.label(&key), "no such object on the remote")),
        }
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>> {
        let i = &self.inner;
        let limit = if kind == ObjectKind::Meta {
            MAX_META
        } else {
            MAX_GET
        };
        let (key, tomb) = (i.key(kind, name, false)?, i.key(kind, name, true)?);
        i.block_on(i.get(&key, &tomb, limit))
    }

    fn info(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectInfo>> {
        let i = &self.inner;
        let st = i.block_on(i.state(kind, name))?;
        Ok(st.live().map(|m| ObjectInfo {
            name: name.to_owned(),
            size: m.size,
            modified: Some(SystemTime::from(m.last_modified)),
        }))
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let (objects, tombs) = self.inner.scan(kind)?;
        Ok(objects
            .into_iter()
            .filter(|o| !tombs.contains_key(&o.name))
            .collect())
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let i = &self.inner;
        if kind == ObjectKind::Meta {
            // no grace: gone at once, with any tombstone an older version
            // of vmdepot wrote for it
            let (key, tomb) = (i.key(kind, name, false)?, i.key(kind, name, true)?);
            i.block_on(i.delete(&key))?;
            return i.block_on(i.delete(&tomb));
        }
        let st = i.block_on(i.state(kind, name))?;
        if st.live().is_none() {
            return Ok(());
        }
        i.block_on(i.put(&i.key(kind, name, true)?, PutPayload::new()))
    }

    fn retired(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let (objects, tombs) = self.inner.scan(kind)?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let t = tombs.get(&o.name)?;
                Some(ObjectInfo {
                    modified: t.modified,
                    ..o
                })
            })
            .collect())
    }

    fn revive(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let i = &self.inner;
        let key = i.key(kind, name, false)?;
        if i.block_on(i.head(&key))?.is_none() {
            return Err(not_found(
                i.label(&key),
                "cannot revive: its bytes are gone (purged)",
            ));
        }
        i.block_on(i.delete(&i.key(kind, name, true)?))
    }

    fn purge_retired(
        &self,
        kind: ObjectKind,
        names: &[String],
        retired_by: SystemTime,
    ) -> Result<Vec<String>> {
        let i = &self.inner;
        i.block_on(
            futures_util::stream::iter(names)
                .map(|n| i.purge_one(kind, n, retired_by))
                .buffer_unordered(PURGE_PARALLEL)
                .try_filter_map(|n| std::future::ready(Ok(n)))
                .try_collect(),
        )
    }

    fn label(&self, kind: ObjectKind, name: &str) -> String {
        let i = &self.inner;
        match i.keys.key(kind, name, false) {
            Ok(key) => i.label(&key),
            Err(_) => format!("{kind:?} {:?} (remote {})", name, i.remote),
        }
    }
}
