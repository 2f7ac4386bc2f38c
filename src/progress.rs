//! Progress reporting. The library never prints: long operations call a
//! [`Progress`] that the caller provides. The CLI implements it with
//! indicatif on a terminal and plain periodic lines otherwise.

/// Receives progress of one long operation. Implementations must be cheap:
/// `advance` is called from worker threads for every few MiB of work.
pub trait Progress: Sync {
    /// A phase starts; `total` is in bytes (0 when unknown).
    fn begin(&self, what: &str, total: u64);
    /// `n` more bytes of the current phase are done.
    fn advance(&self, n: u64);
    /// The current phase is over.
    fn end(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}
