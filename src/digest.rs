//! Parallel BLAKE3 of a whole image: the image's content digest.
//!
//! BLAKE3 is a binary tree over 1 KiB chunks. [`split_sparse`] cuts `[0, len)` into
//! pieces that are subtrees of that tree (each a multiple of 4 KiB, except
//! possibly the last), so that workers can hash pieces independently, in any
//! order, and [`Pieces::root`] merges their chaining values into exactly
//! `blake3::hash(content)`. Import and export use the pieces as their unit of
//! parallel work.

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt};
use blake3::hazmat::{ChainingValue, Mode};
use std::collections::HashMap;
use std::sync::Mutex;

/// Leaves of the digest work: subtrees of at most 1 MiB. Import and export
/// hand out runs of [`LEAVES_PER_UNIT`] leaves to their workers.
pub const LEAF_BYTES: u64 = 1 << 20;
/// Leaves per unit of work (16 MiB): keeps each worker's reads and frames local.
pub const LEAVES_PER_UNIT: usize = 16;

/// One piece of the content: a subtree of the BLAKE3 tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    /// Known to be all zero (its value comes from [`ZeroCvs`]).
    pub zero: bool,
}

/// Zero pieces are cut to at most this size, so that computing the value of
/// a large zero region the first time is shared among workers.
pub const MAX_ZERO_PIECE: u64 = 64 << 30;

/// The tree of pieces covering an image.
#[derive(Debug)]
pub struct Pieces {
    /// Leaves in content order.
    pub leaves: Vec<Piece>,
    total: u64,
}

/// [`split_sparse`] of an input that is data throughout (the tests).
#[cfg(test)]
pub fn split(len: u64, max_piece: u64) -> Pieces {
    split_sparse(len, max_piece, |_, _| true)
}

/// Splits `[0, len)` into subtree pieces of at most `max_piece` bytes
/// (`max_piece` ≥ 4 KiB; an empty or single-chunk input is one piece),
/// except that a subtree for which `has_data(offset, len)` is false
/// becomes one zero piece (of at most [`MAX_ZERO_PIECE`]) however large:
/// the number of pieces follows the data, not the size.
pub fn split_sparse(len: u64, max_piece: u64, has_data: impl Fn(u64, u64) -> bool) -> Pieces {
    fn rec(
        off: u64,
        len: u64,
        max: u64,
        has_data: &dyn Fn(u64, u64) -> bool,
        out: &mut Vec<Piece>,
    ) {
        let data = has_data(off, len);
        if (!data && len <= MAX_ZERO_PIECE) || len <= max || len <= blake3::CHUNK_LEN as u64 {
            out.push(Piece {
                offset: off,
                len,
                zero: !data,
            });
        } else {
            let left = left_subtree_len(len);
            rec(off, left, max, has_data, out);
            rec(off + left, len - left, max, has_data, out);
        }
    }
    let mut leaves = Vec::new();
    rec(0, len, max_piece.max(4096), &has_data, &mut leaves);
    Pieces { leaves, total: len }
}

/// Starts hashing a piece: a hasher positioned at the piece's offset.
pub fn piece_hasher(p: &Piece) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    if p.offset > 0 {
        h.set_input_offset(p.offset);
    }
    h
}

/// Feeds `n` zero bytes into a hasher.
pub fn update_zeros(h: &mut blake3::Hasher, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// What a finished piece contributes: its chaining value, or the root hash
/// when the piece is the whole input.
#[derive(Clone, Copy)]
pub enum PieceHash {
    Cv(ChainingValue),
    Root(blake3::Hash),
}

impl Pieces {
    /// Finishes a piece's hasher into what [`Pieces::root`] needs.
    pub fn finish(&self, h: &blake3::Hasher) -> PieceHash {
        if self.leaves.len() == 1 {
            PieceHash::Root(h.finalize())
        } else {
            PieceHash::Cv(h.finalize_non_root())
        }
    }

    /// Merges the leaves' results (in leaf order) into the content digest.
    pub fn root(&self, results: &[PieceHash]) -> blake3::Hash {
        assert_eq!(results.len(), self.leaves.len());
        if let [PieceHash::Root(h)] = results {
            return *h;
        }
        let cvs: Vec<ChainingValue> = results
            .iter()
            .map(|r| match r {
                PieceHash::Cv(cv) => *cv,
                PieceHash::Root(_) => unreachable!("root result among several pieces"),
            })
            .collect();
        let mut idx = 0;
        // Rebuild the same recursion as `split`, consuming leaves in order.
        fn rec(
            len: u64,
            max_leaf: &[Piece],
            idx: &mut usize,
            cvs: &[ChainingValue],
        ) -> ChainingValue {
            let leaf = max_leaf[*idx];
            if leaf.len == len {
                *idx += 1;
                return cvs[*idx - 1];
            }
            let left = left_subtree_len(len);
            let l = rec(left, max_leaf, idx, cvs);
            let r = rec(len - left, max_leaf, idx, cvs);
            merge_subtrees_non_root(&l, &r, Mode::Hash)
        }
        let left = left_subtree_len(self.total);
        let l = rec(left, &self.leaves, &mut idx, &cvs);
        let r = rec(self.total - left, &self.leaves, &mut idx, &cvs);
        merge_subtrees_root(&l, &r, Mode::Hash)
    }
}

/// Chaining values of all-zero leaves. They depend only on the leaf's
/// offset and length, never on the image, so a depot keeps them (catalog
/// table `zero_cvs`) and most zero leaves cost a lookup instead of hashing
/// a MiB of zeros.
pub struct ZeroCvs {
    known: HashMap<(u64, u64), ChainingValue>,
    added: Mutex<Vec<(u64, u64, ChainingValue)>>,
}

impl ZeroCvs {
    pub fn new(known: HashMap<(u64, u64), ChainingValue>) -> ZeroCvs {
        ZeroCvs {
            known,
            added: Mutex::new(Vec::new()),
        }
    }

    /// The result of an all-zero leaf.
    pub fn leaf(&self, pieces: &Pieces, p: &Piece) -> PieceHash {
        if pieces.leaves.len() == 1 {
            let mut h = piece_hasher(p);
            update_zeros(&mut h, p.len);
            return PieceHash::Root(h.finalize());
        }
        if let Some(cv) = self.known.get(&(p.offset, p.len)) {
            return PieceHash::Cv(*cv);
        }
        let mut h = piece_hasher(p);
        update_zeros(&mut h, p.len);
        let cv = h.finalize_non_root();
        self.added.lock().unwrap().push((p.offset, p.len, cv));
        PieceHash::Cv(cv)
    }

    /// The values computed since [`ZeroCvs::new`], to be kept.
    pub fn into_added(self) -> Vec<(u64, u64, ChainingValue)> {
        self.added.into_inner().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_by_pieces(data: &[u8], max_piece: u64) -> blake3::Hash {
        let pieces = split(data.len() as u64, max_piece);
        let results: Vec<PieceHash> = pieces
            .leaves
            .iter()
            .rev() // any order of work gives the same answer
            .map(|p| {
                let mut h = piece_hasher(p);
                let s = &data[p.offset as usize..(p.offset + p.len) as usize];
                // zero runs go through update_zeros
                if s.iter().all(|&b| b == 0) {
                    update_zeros(&mut h, p.len);
                } else {
                    h.update(s);
                }
                pieces.finish(&h)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        pieces.root(&results)
    }

    #[test]
    fn pieces_give_the_plain_blake3() {
        let mut data = vec![0u8; 3 * 1024 * 1024 + 4096 * 3 + 17];
        for (i, b) in data.iter_mut().enumerate().skip(70_000).take(900_000) {
            *b = (i * 31 % 251) as u8;
        }
        for len in [
            0usize,
            1,
            1024,
            1025,
            4096,
            8192,
            100_000,
            1 << 20,
            data.len(),
        ] {
            for max in [4096u64, 65536, 1 << 20, 1 << 30] {
                assert_eq!(
                    digest_by_pieces(&data[..len], max),
                    blake3::hash(&data[..len]),
                    "len {len} max {max}"
                );
            }
        }
    }

    #[test]
    fn cached_zero_leaves_give_the_plain_blake3() {
        let mut data = vec![0u8; 5 * 1024 * 1024 + 4096];
        data[3 * 1024 * 1024 + 5] = 1;
        let pieces = split(data.len() as u64, LEAF_BYTES);
        let zc = ZeroCvs::new(HashMap::new());
        let run = |zc: &ZeroCvs| {
            let r: Vec<PieceHash> = pieces
                .leaves
                .iter()
                .map(|p| {
                    let s = &data[p.offset as usize..(p.offset + p.len) as usize];
                    if s.iter().all(|&b| b == 0) {
                        zc.leaf(&pieces, p)
                    } else {
                        let mut h = piece_hasher(p);
                        h.update(s);
                        pieces.finish(&h)
                    }
                })
                .collect();
            pieces.root(&r)
        };
        assert_eq!(run(&zc), blake3::hash(&data));
        let added = zc.into_added();
        assert_eq!(added.len(), pieces.leaves.len() - 1);
        let zc2 = ZeroCvs::new(added.iter().map(|&(o, l, cv)| ((o, l), cv)).collect());
        assert_eq!(run(&zc2), blake3::hash(&data));
        assert!(zc2.into_added().is_empty(), "second run hashes no zeros");
        // a single-leaf input of zeros
        let small = vec![0u8; 8192];
        let p1 = split(8192, LEAF_BYTES);
        let r = ZeroCvs::new(HashMap::new()).leaf(&p1, &p1.leaves[0]);
        assert_eq!(p1.root(&[r]), blake3::hash(&small));
    }

    #[test]
    fn pieces_are_block_aligned_and_cover_everything() {
        let p = split((2u64 << 30) + 12345, 64 << 20);
        let mut off = 0;
        for l in &p.leaves {
            assert_eq!(l.offset, off);
            assert_eq!(l.offset % 4096, 0);
            assert!(l.len <= 64 << 20);
            off += l.len;
        }
        assert_eq!(off, (2u64 << 30) + 12345);
    }
}
