//! Launch bases: `DEPOT/bases/IMAGE.raw` is the read-only raw content of
//! an image, made once and shared by every overlay instance of it. It is
//! made under an exclusive flock on `bases/IMAGE.lock` (`base_flock`),
//! which gc also takes before it evicts a base no instance uses
//! (`evict_unused_bases`); it is recorded in the catalog (`bases` table)
//! only once the file is durable, and checked (`check_base`) before every
//! use. Bases are image content, so they live below maintenance: gc and
//! fsck reach them here, never through the launch layer.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::catalog;
use crate::error::{Error, IoContext, Result};
use crate::ids::random_hex;
use crate::image::export::ExportFormat;
use crate::progress::Progress;
use crate::repo::Repo;

/// Base file of an image.
pub(crate) fn base_path(root: &Path, image: &str) -> PathBuf {
    root.join("bases").join(format!("{image}.raw"))
}

pub(crate) fn base_lock_path(root: &Path, image: &str) -> PathBuf {
    root.join("bases").join(format!("{image}.lock"))
}

/// The lock of an image's launch base (`bases/IMAGE.lock`).
pub(crate) fn base_flock(repo: &Repo, image: &str, how: FlockArg) -> Result<Flock<File>> {
    repo.perms().flock(&base_lock_path(repo.root(), image), how)
}

/// What a cheap look at a launch base found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BaseCheck {
    /// No file.
    Missing,
    /// Recorded as complete for this content, of the recorded size, and
    /// the sampled blocks hold their chunks.
    Good,
    /// A file that must not be booted, and why.
    Bad(String),
}

/// Blocks of a base that the launch-time check reads: evenly spread over
/// the image's data blocks (first and last included) plus a few at random.
const BASE_SAMPLES: u64 = 12;
const BASE_RANDOM_SAMPLES: u64 = 4;

/// The cheap check of the base of `img` (callers hold the base's lock):
/// its catalog record (made only once the file was durable), its size, and
/// a few 4 KiB blocks hashed and compared with the image's chunk hashes. A
/// base whose data a power cut lost (full size, no blocks) fails it.
pub(crate) fn check_base(repo: &Repo, img: &catalog::ImageRow) -> Result<BaseCheck> {
    use std::os::unix::fs::FileExt;
    let p = base_path(repo.root(), img.id.as_str());
    let file = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BaseCheck::Missing),
        Err(e) => return Err(Error::io(&p, e)),
    };
    let Some(rec) = catalog::base_record(&repo.conn, img.id.as_str())? else {
        return Ok(BaseCheck::Bad(
            "is not recorded as complete (cut off by a crash, or made by an older vmdepot)".into(),
        ));
    };
    if rec.size != img.virtual_size || Some(&rec.digest) != img.content_digest.as_ref() {
        return Ok(BaseCheck::Bad(
            "is recorded with another size or digest than the image's".into(),
        ));
    }
    let len = file.metadata().at(&p)?.len();
    if len != rec.size {
        return Ok(BaseCheck::Bad(format!(
            "is {len} bytes, recorded as {} bytes",
            rec.size
        )));
    }
    let blocks = sample_blocks(&catalog::image_map(&repo.conn, &img.id)?);
    let mut ids: Vec<_> = blocks.iter().map(|&(_, c)| c).collect();
    ids.sort_unstable();
    ids.dedup();
    let locs = catalog::chunk_locs(&repo.conn, &ids)?;
    let mut buf = vec![0u8; crate::format::CHUNK_SIZE];
    for (block, cid) in blocks {
        let Some(loc) = locs.get(&cid) else {
            return Err(Error::StoreDamaged(format!(
                "image {} ({}): chunk {cid} is missing from the catalog",
                img.name, img.id
            )));
        };
        let off = block * crate::format::CHUNK;
        let want = (len - off).min(crate::format::CHUNK) as usize;
        buf.fill(0);
        file.read_exact_at(&mut buf[..want], off).at(&p)?;
        if crate::ids::ChunkHash::of(&buf) != loc.hash {
            return Ok(BaseCheck::Bad(format!(
                "does not hold the image's data at byte offset {off} (lost in a crash?)"
            )));
        }
    }
    Ok(BaseCheck::Good)
}

/// The data blocks of `map` the launch-time check reads, in order:
/// [`BASE_SAMPLES`] evenly spread (first and last included) and
/// [`BASE_RANDOM_SAMPLES`] at random, as (block, chunk).
fn sample_blocks(map: &crate::format::BlockMap) -> Vec<(u64, crate::ids::ChunkId)> {
    let n = map.data_blocks();
    if n == 0 {
        return Vec::new();
    }
    let mut picks: Vec<u64> = (0..BASE_SAMPLES.min(n))
        .map(|k| k * (n - 1) / (BASE_SAMPLES - 1).max(1))
        .collect();
    for _ in 0..BASE_RANDOM_SAMPLES {
        picks.push(u64::from_str_radix(&random_hex(8), 16).unwrap_or(0) % n);
    }
    picks.sort_unstable();
    picks.dedup();
    let mut blocks = Vec::with_capacity(picks.len());
    let mut it = picks.iter().peekable();
    for (i, (block, cid)) in map.data().enumerate() {
        while it.peek() == Some(&&(i as u64)) {
            it.next();
            blocks.push((block, cid));
        }
        if it.peek().is_none() {
            break;
        }
    }
    blocks.dedup();
    blocks
}

/// What is wrong with the base file of image `id`, if anything (fsck,
/// verify): with its image (`img`, if available) the launch's check,
/// otherwise its record and size; with `full`, also the digest of every
/// byte. A base that vanishes meanwhile (gc) is fine.
pub(crate) fn base_problem(
    repo: &Repo,
    id: &str,
    img: Option<&catalog::ImageRow>,
    full: bool,
    progress: &dyn Progress,
) -> Result<Option<String>> {
    let p = base_path(repo.root(), id);
    let what = match img {
        Some(i) => format!("launch base {} of image {} ({id})", p.display(), i.name),
        None => format!("launch base {} of deleted image {id}", p.display()),
    };
    let fix = "the next launch rebuilds it, or refuses while an instance runs from it";
    let rec = catalog::base_record(&repo.conn, id)?;
    let cheap = match img {
        Some(i) => check_base(repo, i)?,
        None => match (&rec, fs::metadata(&p)) {
            (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => BaseCheck::Missing,
            (_, Err(e)) => return Err(Error::io(&p, e)),
            (None, _) => BaseCheck::Bad("is not recorded as complete".into()),
            (Some(r), Ok(m)) if m.len() != r.size => BaseCheck::Bad(format!(
                "is {} bytes, recorded as {} bytes",
                m.len(),
                r.size
            )),
            _ => BaseCheck::Good,
        },
    };
    match cheap {
        BaseCheck::Missing => return Ok(None),
        BaseCheck::Bad(why) => return Ok(Some(format!("{what} {why}: {fix}"))),
        BaseCheck::Good if !full => return Ok(None),
        BaseCheck::Good => {}
    }
    let Some(rec) = rec else { return Ok(None) };
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p, e)),
    };
    let digest = crate::image::export::file_digest(repo, &f, &p, rec.size, progress)?;
    if digest != rec.digest {
        return Ok(Some(format!(
            "{what}: content digest is {digest}, recorded {}: {fix}",
            rec.digest
        )));
    }
    Ok(None)
}

/// A running instance whose QEMU has the base of `image` open, if any.
fn base_in_use(repo: &Repo, image: &str) -> Result<Option<String>> {
    let running = catalog::instances::running_of(&repo.conn, image, catalog::DiskMode::Overlay)?;
    Ok(running
        .into_iter()
        .find(|(id, _, pid)| pid.is_some_and(|pid| crate::proc::pid_alive(pid, id)))
        .map(|(id, name, _)| format!("{name} ({id})")))
}

/// The raw base of an image (callers hold the base's lock), made if it is
/// missing. One that does not check out ([`check_base`]) is never used: it
/// is rebuilt, unless a running instance has it open (then refused: stop
/// that instance first). Overlays of stopped instances were made over the
/// image's content, which is exactly what the rebuilt base holds (its
/// digest is checked). A base without a record whose full digest matches
/// (made by an older vmdepot) is recorded and used.
///
/// Durability: the base is written to a temporary, fsynced, renamed into
/// place and the directory fsynced (export); only then is it recorded.
pub(crate) fn ensure_base(
    repo: &Repo,
    img: &catalog::ImageRow,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let p = base_path(repo.root(), img.id.as_str());
    let label = format!("{} ({})", img.name, img.id);
    match check_base(repo, img)? {
        BaseCheck::Good => return Ok(p),
        BaseCheck::Missing => {}
        BaseCheck::Bad(why) => {
            let unrecorded = catalog::base_record(&repo.conn, img.id.as_str())?.is_none();
            if unrecorded && adopt_base(repo, img, &p, progress)? {
                return Ok(p);
            }
            if let Some(user) = base_in_use(repo, img.id.as_str())? {
                return Err(Error::StoreDamaged(format!(
                    "launch base {} of image {label} {why}; instance {user} runs from it: \
                     stop it, then launch again to rebuild the base",
                    p.display()
                )));
            }
            tracing::warn!(
                "launch base {} of image {label} {why}: rebuilding it",
                p.display()
            );
            catalog::forget_base(&repo.conn, img.id.as_str())?;
        }
    }
    let mode = repo.perms().file() & 0o444;
    crate::image::export::export_with_mode(repo, img, &p, ExportFormat::Raw, mode, progress)?;
    record_base(repo, img)?;
    Ok(p)
}

fn record_base(repo: &Repo, img: &catalog::ImageRow) -> Result<()> {
    let digest = img.content_digest.clone().ok_or_else(|| {
        Error::StoreDamaged(format!(
            "image {} ({}) has no content digest",
            img.name, img.id
        ))
    })?;
    catalog::record_base(
        &repo.conn,
        img.id.as_str(),
        &catalog::BaseRecord {
            size: img.virtual_size,
            digest,
        },
    )
}

/// After a catalog rebuild: every base file of an available image that has
/// no record is read back in full and recorded if it matches (under the
/// base's lock); returns the images whose bases were recorded.
pub(crate) fn adopt_unrecorded_bases(repo: &Repo) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for img in catalog::list_images(&repo.conn)? {
        if img.state != Some(catalog::ImageState::Available) || img.damage.is_some() {
            continue;
        }
        let p = base_path(repo.root(), img.id.as_str());
        if !p.exists() || catalog::base_record(&repo.conn, img.id.as_str())?.is_some() {
            continue;
        }
        let _lock = base_flock(repo, img.id.as_str(), FlockArg::LockExclusive)?;
        if adopt_base(repo, &img, &p, &crate::progress::NoProgress)? {
            out.push(format!("{} ({})", img.name, img.id));
        }
    }
    Ok(out)
}

/// A base file with no record: recorded if every byte matches the image
/// (fsynced first), else left to be rebuilt.
fn adopt_base(
    repo: &Repo,
    img: &catalog::ImageRow,
    p: &Path,
    progress: &dyn Progress,
) -> Result<bool> {
    let f = File::open(p).at(p)?;
    let len = f.metadata().at(p)?.len();
    if len != img.virtual_size {
        return Ok(false);
    }
    let digest = crate::image::export::file_digest(repo, &f, p, len, progress)?;
    if Some(&digest) != img.content_digest.as_ref() {
        return Ok(false);
    }
    f.sync_all().at(p)?;
    crate::store::sync_dir(p.parent().unwrap_or(Path::new(".")))?;
    record_base(repo, img)?;
    Ok(true)
}

/// Evicts bases that no instance uses (gc). Returns (files, bytes).
pub(crate) fn evict_unused_bases(repo: &Repo, dry_run: bool) -> Result<(u64, u64)> {
    let dir = repo.root().join("bases");
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok((0, 0));
    };
    let (mut n, mut bytes) = (0, 0);
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("raw") {
            continue;
        }
        let Some(img) = p.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        // A launch holds this lock from before it enters its rows until its
        // base exists; with it held here, the rows read below are complete.
        let Ok(_l) = base_flock(repo, &img, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if catalog::images_with_overlays(&repo.conn)?.contains(&img) {
            continue;
        }
        let size = std::os::unix::fs::MetadataExt::blocks(&e.metadata().at(&p)?) * 512;
        if !dry_run {
            // The lock file stays: a launch may be waiting on it. Without
            // its file the record says nothing; it goes too.
            fs::remove_file(&p).at(&p)?;
            catalog::forget_base(&repo.conn, &img)?;
        }
        n += 1;
        bytes += size;
    }
    if !dry_run {
        // Records whose file is gone (a crash between removing a base and
        // forgetting it), each checked under its lock.
        for img in catalog::recorded_bases(&repo.conn)? {
            if !img.starts_with("img-") || img.contains('/') {
                continue;
            }
            let Ok(_l) = base_flock(repo, &img, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            if !base_path(repo.root(), &img).exists() {
                catalog::forget_base(&repo.conn, &img)?;
            }
        }
    }
    Ok((n, bytes))
}
