//! Identifier newtypes: [`ImageId`] (`img-…`), [`ChunkHash`] (BLAKE3 of a
//! chunk's 4 KiB content) and [`ChunkId`] (the catalog's row id of a chunk).

use std::fmt;
use std::io::Read;

/// Stable id of an image: `img-` followed by 16 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(String);

impl ImageId {
    /// A fresh random id.
    pub(crate) fn generate() -> ImageId {
        ImageId(format!("img-{}", random_hex(8)))
    }

    /// Parses `img-` + 16 hex digits; anything else is `None` (a name).
    pub fn parse(s: &str) -> Option<ImageId> {
        let hex = s.strip_prefix("img-")?;
        (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ImageId(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's 64 bits as an integer: how the catalog marks what this
    /// image's running import owns (`pending_chunks.import`).
    pub(crate) fn key(&self) -> i64 {
        u64::from_str_radix(&self.0[4..], 16).unwrap_or(0) as i64
    }

    pub(crate) fn from_db(s: String) -> ImageId {
        ImageId(s)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// BLAKE3 hash of one chunk's (zero-padded, 4 KiB) content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex(&self.0))
    }
}

/// Catalog row id of a chunk (never reused: AUTOINCREMENT).
pub type ChunkId = i64;

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `n` random bytes from the kernel, as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        // Fall back to time and pid: unique enough for ids, never for keys.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let h = blake3::hash(format!("{t}-{}", std::process::id()).as_bytes());
        buf.copy_from_slice(&h.as_bytes()[..n]);
    }
    hex(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_id_round_trip() {
        let id = ImageId::generate();
        assert_eq!(ImageId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id.as_str().len(), 20);
        assert!(ImageId::parse("debian-12").is_none());
        assert!(ImageId::parse("img-xyz").is_none());
    }
}
