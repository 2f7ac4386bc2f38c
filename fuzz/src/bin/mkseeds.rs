//! Not a fuzz target: writes the seeds that vmdepot itself produces (image
//! maps and pack frames) into `SEEDS/{map,map_body,pack}/`, by importing a
//! small generated raw disk into a temporary depot and reading its catalog.
//! Run by seeds.sh: `mkseeds SEEDS`.
use std::fs;
use std::path::Path;

use vmdepot::internals::format::{self, BlockMap, MapBuilder};
use vmdepot::internals::store::{LocalDir, ObjectKind, ObjectStore};
use vmdepot::internals::Perms;
use vmdepot::{Depot, ImportOptions, NoProgress};

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .expect("usage: mkseeds SEEDS_DIR");
    let out = Path::new(&out);
    for d in ["map", "map_body", "pack"] {
        fs::create_dir_all(out.join(d)).unwrap();
    }
    let tmp = std::env::temp_dir().join(format!("vmdepot-mkseeds-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();

    // A raw disk: 64 KiB of patterned data, a 192 KiB hole, 8 KiB repeating
    // the first chunk (dedup: a map that refers back to an id), 4 KiB more.
    let mut disk: Vec<u8> = (0..64u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    disk.resize(256 << 10, 0);
    let first = disk[..4096].to_vec();
    disk.extend_from_slice(&first);
    disk.extend_from_slice(&first);
    disk.extend((0..4096u32).map(|i| (i % 251) as u8));
    let raw = tmp.join("disk.raw");
    fs::write(&raw, &disk).unwrap();

    let depot_dir = tmp.join("depot");
    let depot = Depot::open(&depot_dir).unwrap();
    let img = depot
        .import(&raw, &ImportOptions::new("seed"), &NoProgress)
        .unwrap();
    drop(depot);

    let conn = rusqlite::Connection::open_with_flags(
        depot_dir.join("catalog.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let blob: Vec<u8> = conn
        .query_row(
            "SELECT map FROM images WHERE id = ?1",
            [img.id.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    write_map(out, "import", &blob);

    let mut st = conn
        .prepare("SELECT p.name, f.offset, f.clen, f.nchunks FROM frames f JOIN packs p ON p.id = f.pack ORDER BY f.id LIMIT 4")
        .unwrap();
    let frames: Vec<(String, u64, u64, u64)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (i, (pack, offset, clen, nchunks)) in frames.iter().enumerate() {
        let store = LocalDir::new(&depot_dir, Perms::PRIVATE);
        let bytes = store.get(ObjectKind::Pack, pack).unwrap().unwrap();
        let mut seed = vec![(nchunks - 1) as u8];
        seed.extend((*offset as u32).to_le_bytes());
        seed.extend((*clen as u32).to_le_bytes());
        seed.extend(&bytes);
        fs::write(out.join("pack").join(format!("import-{i}.pack")), seed).unwrap();
    }
    // A pack of one header and nothing else, and one 1-chunk frame.
    let mut seed = vec![0u8];
    seed.extend(16u32.to_le_bytes());
    let frame = vmdepot::internals::store::compress_frame(&first, 3).unwrap();
    seed.extend((frame.len() as u32).to_le_bytes());
    seed.extend(format::PackHeader::new().to_bytes());
    fs::write(out.join("pack").join("header-only.pack"), &seed).unwrap();
    seed.extend(&frame);
    fs::write(out.join("pack").join("one-chunk.pack"), &seed).unwrap();

    // Maps of the encoder's edge cases.
    write_map(out, "empty", &format::encode_map(&BlockMap::default()));
    write_map(
        out,
        "zeros",
        &format::encode_map(&BlockMap::from_blocks(&[0; 9])),
    );
    let mut b = MapBuilder::default();
    b.push_zeros(1000);
    for id in [5, 6, 7, 3, 3, 100_000] {
        b.push(id);
    }
    b.push_zeros(7);
    b.push(2);
    write_map(out, "sparse", &format::encode_map(&b.finish()));

    fs::remove_dir_all(&tmp).unwrap();
}

fn write_map(out: &Path, name: &str, blob: &[u8]) {
    fs::write(out.join("map").join(format!("{name}.map")), blob).unwrap();
    let body = zstd::stream::decode_all(&blob[4..]).unwrap();
    fs::write(out.join("map_body").join(format!("{name}.body")), body).unwrap();
}
