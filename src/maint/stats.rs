//! Usage (who refers to which stored bytes) and stats.

use std::collections::{HashMap, HashSet};

use super::{ImageStats, Stats, Usage};
use crate::catalog::{self, ImageState};
use crate::error::Result;
use crate::format::{self, CHUNK};
use crate::ids::ImageId;
use crate::repo::Repo;
use crate::store::{ObjectKind, ObjectStore};

/// Per image: stored bytes no other image uses, and stored bytes shared.
/// A chunk's stored size is its frame's compressed size shared equally by
/// the frame's chunks; a partial image's are the chunks fetched for it.
/// Memory: 16 bytes per (image, distinct chunk).
pub(crate) fn usage(repo: &Repo) -> Result<Usage> {
    let conn = &repo.conn;
    // Distinct chunk ids of each image, sorted; maps decoded one at a time.
    let mut per: Vec<(ImageId, Vec<i64>)> = Vec::new();
    let mut damaged = HashMap::new();
    for r in catalog::list_images(conn)? {
        if let Some(d) = r.damage {
            damaged.insert(r.id, d);
            continue;
        }
        if r.state == Some(ImageState::Partial) {
            // what its lazy instances fetched (held under its pull's job)
            per.push((r.id, catalog::copy_chunk_ids(conn, &r.copied_from)?));
            continue;
        }
        if r.state != Some(ImageState::Available) {
            continue;
        }
        let map = match catalog::image_map(conn, &r.id) {
            Ok(m) => m,
            Err(e) => {
                damaged.insert(r.id, e.to_string());
                continue;
            }
        };
        let mut ids: Vec<i64> = map.data().map(|(_, c)| c).collect();
        ids.sort_unstable();
        ids.dedup();
        per.push((r.id, ids));
    }
    // Every image's ids together: a chunk is shared if it appears twice.
    let mut all: Vec<i64> = per.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    all.sort_unstable();
    let users = |c: i64| all.partition_point(|&x| x <= c) - all.partition_point(|&x| x < c);
    let frame_size = catalog::frame_bytes_per_chunk(conn)?;
    let mut per_image = HashMap::new();
    for (img, ids) in &per {
        let (mut unique, mut shared) = (0f64, 0f64);
        for (first, last) in format::id_runs(ids) {
            catalog::for_each_chunk_between(conn, first, last, |c, f| {
                let sz = frame_size.get(&f).copied().unwrap_or(0.0);
                if users(c) == 1 {
                    unique += sz;
                } else {
                    shared += sz;
                }
            })?;
        }
        per_image.insert(img.clone(), (unique.round() as u64, shared.round() as u64));
    }
    Ok(Usage { per_image, damaged })
}

/// Logical vs stored bytes, dedup and compression ratios, per image.
pub(crate) fn stats(repo: &Repo) -> Result<Stats> {
    let conn = &repo.conn;
    let usage = usage(repo)?;
    let rows: Vec<_> = catalog::list_images(conn)?
        .into_iter()
        .filter(|r| r.state == Some(ImageState::Available) && !usage.damaged.contains_key(&r.id))
        .collect();
    let mut damaged: Vec<String> = usage.damaged.values().cloned().collect();
    damaged.sort();
    let chunks = catalog::committed_chunk_count(conn)?;
    let stored = catalog::sealed_pack_bytes(conn)?;
    let catalog_bytes: u64 = ["catalog.db", "catalog.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(repo.root().join(f)).ok())
        .map(|m| m.len())
        .sum();
    let index_bytes = index_bytes(repo.store())?;
    let manifest_bytes: u64 = crate::repo::manifest::sizes(repo.root())?.values().sum();
    let overhead = catalog_bytes + index_bytes + manifest_bytes;
    let logical: u64 = rows.iter().map(|r| r.virtual_size).sum();
    let data: u64 = rows.iter().map(|r| r.data_bytes).sum();
    let uniq = chunks * CHUNK;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Stats {
        images: rows.len() as u64,
        logical_bytes: logical,
        data_bytes: data,
        unique_chunk_bytes: uniq,
        chunks,
        stored_bytes: stored,
        catalog_bytes,
        index_bytes,
        manifest_bytes,
        dedup_ratio: ratio(data, uniq),
        compression_ratio: ratio(uniq, stored),
        overall_ratio: ratio(logical, stored + overhead),
        damaged_images: damaged,
        per_image: rows
            .into_iter()
            .map(|r| {
                let (u, s) = usage.per_image.get(&r.id).copied().unwrap_or((0, 0));
                ImageStats {
                    id: r.id.to_string(),
                    name: r.name,
                    virtual_size: r.virtual_size,
                    data_bytes: r.data_bytes,
                    unique_stored_bytes: u,
                    shared_stored_bytes: s,
                }
            })
            .collect(),
    })
}

/// Bytes of the indexes of the packs in the store.
fn index_bytes(store: &dyn ObjectStore) -> Result<u64> {
    let packs: HashSet<String> = store
        .list(ObjectKind::Pack)?
        .into_iter()
        .map(|p| p.name)
        .collect();
    Ok(store
        .list(ObjectKind::PackIndex)?
        .iter()
        .filter(|ix| packs.contains(&ix.name))
        .map(|ix| ix.size)
        .sum())
}
