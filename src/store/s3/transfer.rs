//! The bytes of a remote object: [`S3Writer`], an object written by
//! appending (one PUT when it stays under a part, else a multipart upload
//! of [`PART_BYTES`] parts, a few in flight), and [`S3Reader`], ranged GETs
//! of a sealed object.
//!
//! Memory is bounded whatever the object's size: a writer buffers at most
//! one part, and at most [`PARTS_IN_FLIGHT`] parts are being uploaded in
//! the whole store (a store-wide semaphore), so uploads hold
//! `(PARTS_IN_FLIGHT + open writers) × PART_BYTES` at most.

use std::sync::Arc;
use std::time::Duration;

use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use tokio::task::JoinSet;

use super::{not_found, path, Inner};
use crate::error::{Error, Result};
use crate::store::{ObjectReader, ObjectWriter, RangeBytes};

/// The size of a multipart upload's parts (the last one is smaller).
pub(super) const PART_BYTES: usize = 8 << 20;
/// Parts uploaded at once, in the whole store.
pub(super) const PARTS_IN_FLIGHT: usize = 4;
/// The longest range one read fetches.
const MAX_RANGE: u64 = 1 << 30;
/// How long dropping an unsealed writer waits for the upload's abort.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// A multipart upload under way.
struct Upload {
    upload: Box<dyn MultipartUpload>,
    /// The parts being sent.
    tasks: JoinSet<object_store::Result<()>>,
}

/// An object being written (see the module doc). Dropped unsealed, it
/// aborts its multipart upload (best effort: an upload left behind is
/// never visible, and a bucket lifecycle rule can expire it).
pub(super) struct S3Writer {
    inner: Arc<Inner>,
    key: String,
    /// The tombstone of the retired object this one replaces: removed
    /// once this one is sealed.
    tomb: Option<String>,
    /// Bytes not yet sent: less than a part.
    buf: Vec<u8>,
    len: u64,
    upload: Option<Upload>,
}

impl S3Writer {
    pub(super) fn new(inner: Arc<Inner>, key: String, tomb: Option<String>) -> S3Writer {
        S3Writer {
            inner,
            key,
            tomb,
            buf: Vec::new(),
            len: 0,
            upload: None,
        }
    }

    fn fail(&self, what: &str, e: &object_store::Error) -> Error {
        self.inner.fail(what, &self.key, e)
    }

    /// Sends the buffer as the next part, starting the upload with the
    /// first; waits while the store has its parts in flight.
    async fn send_part(&mut self) -> Result<()> {
        let bytes = PutPayload::from(std::mem::take(&mut self.buf));
        if self.upload.is_none() {
            let upload = self.inner.s3.put_multipart(&path(&self.key)).await;
            let upload = upload.map_err(|e| self.fail("starting the upload of", &e))?;
            self.upload = Some(Upload {
                upload,
                tasks: JoinSet::new(),
            });
        }
        let permit = Arc::clone(&self.inner.parts)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let up = self.upload.as_mut().expect("started above");
        let part = up.upload.put_part(bytes);
        up.tasks.spawn(async move {
            let sent = part.await;
            drop(permit);
            sent
        });
        self.reap(false).await
    }

    /// Collects the parts sent (`all`: waits for every one); the first
    /// failure is the error.
    async fn reap(&mut self, all: bool) -> Result<()> {
        let Some(up) = self.upload.as_mut() else {
            return Ok(());
        };
        loop {
            let done = match all {
                true => up.tasks.join_next().await,
                false => up.tasks.try_join_next(),
            };
            let Some(done) = done else {
                return Ok(());
            };
            if let Err(e) = done
                .map_err(object_store::Error::from)
                .and_then(|sent| sent)
            {
                return Err(self.fail("uploading a part of", &e));
            }
        }
    }

    /// Completes the object: one PUT if no part was sent, else the last
    /// part and the upload's completion.
    async fn finish(&mut self) -> Result<()> {
        if self.upload.is_none() {
            let bytes = PutPayload::from(std::mem::take(&mut self.buf));
            return self.inner.put(&self.key, bytes).await;
        }
        if !self.buf.is_empty() {
            self.send_part().await?;
        }
        self.reap(true).await?;
        let mut up = self.upload.take().expect("checked above");
        match up.upload.complete().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = up.upload.abort().await;
                Err(self.fail("completing the upload of", &e))
            }
        }
    }
}

impl ObjectWriter for S3Writer {
    fn append(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = (PART_BYTES - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.len += n as u64;
            if self.buf.len() == PART_BYTES {
                let inner = Arc::clone(&self.inner);
                inner.block_on(self.send_part())?;
            }
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn seal(mut self: Box<Self>) -> Result<u64> {
        let inner = Arc::clone(&self.inner);
        inner.block_on(self.finish())?;
        if let Some(tomb) = self.tomb.take() {
            inner.block_on(inner.delete(&tomb))?;
        }
        Ok(self.len)
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        let Some(mut up) = self.upload.take() else {
            return;
        };
        let abort = async move {
            up.tasks.shutdown().await;
            let _ = up.upload.abort().await;
        };
        self.inner
            .block_on(async { tokio::time::timeout(ABORT_WAIT, abort).await.ok() });
    }
}

/// A sealed object read by ranged GETs; it keeps reading an object retired
/// after it was opened (until a purge deletes the bytes).
pub(super) struct S3Reader {
    inner: Arc<Inner>,
    key: String,
    len: u64,
    label: String,
}

impl S3Reader {
    pub(super) fn new(inner: Arc<Inner>, key: String, len: u64) -> S3Reader {
        let label = inner.label(&key);
        S3Reader {
            inner,
            key,
            len,
            label,
        }
    }

    fn damaged(&self, offset: u64, len: u64, why: &str) -> Error {
        Error::StoreDamaged(format!(
            "{}: bytes at offset {offset} (+{len}): {why}: the object is torn, truncated or was replaced; `vmdepot image verify` of the remote's images checks them",
            self.label
        ))
    }
}

impl ObjectReader for S3Reader {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<RangeBytes> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        let Some(end) = end else {
            let why = format!("they lie past its end ({} bytes)", self.len);
            return Err(self.damaged(offset, len, &why));
        };
        if len > MAX_RANGE {
            return Err(self.damaged(offset, len, "more than one read may fetch"));
        }
        if len == 0 {
            return Ok(Box::new(Vec::new()));
        }
        let i = &self.inner;
        let got = match i.block_on(i.s3.get_range(&path(&self.key), offset..end)) {
            Ok(b) => b,
            Err(e) if super::missing(&e) => {
                return Err(not_found(self.label.clone(), "the object was purged"))
            }
            Err(e) => return Err(i.fail("reading", &self.key, &e)),
        };
        if got.len() as u64 != len {
            let why = format!("the remote sent {} bytes", got.len());
            return Err(self.damaged(offset, len, &why));
        }
        Ok(Box::new(got))
    }

    fn label(&self) -> &str {
        &self.label
    }
}
