//! `vmdepot gc`, `fsck` and `stats`: [`MaintCmd`], and the printing of
//! the reports of the depot's maintenance and checks, `image verify`'s
//! ([`print_verify`]) among them. `fsck --repair` ([`repair`]) runs before
//! the depot is opened, since it may have to rebuild its catalog.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;
use vmdepot::{
    Depot, DepotOptions, FsckReport, GcReport, Intent, Progress, RepairReport, Stats, VerifyReport,
};

use super::output::{esc, human, print_json, Table};
use super::remote::print_remote_gc;

/// The exit code of a check that found damage.
const DAMAGED: i32 = 5;

/// The maintenance commands (top-level subcommands of `vmdepot`).
#[derive(Subcommand)]
pub enum MaintCmd {
    /// Remove chunks and packs that no image uses, and leftovers of killed imports
    ///
    /// With --remote: retire a remote's dead packs and purge what was retired longer than the
    /// grace period (VMDEPOT_REMOTE_GRACE_SECS, default 24 h), safe against pushes of other
    /// hosts (docs/FORMAT.md, "Remote gc")
    #[command(after_long_help = "Examples:
  vmdepot gc --dry-run
  vmdepot gc
  vmdepot gc --remote eu --json")]
    Gc {
        /// Only report what would be removed (a remote: no lock taken either)
        #[arg(long)]
        dry_run: bool,
        /// Collect this remote's garbage instead of this depot's
        #[arg(long, value_name = "REMOTE")]
        remote: Option<String>,
        /// With --remote: remove the gc lock of a gc that died (however young)
        #[arg(long, requires = "remote")]
        break_lock: bool,
        /// Print the report as a JSON object instead of one line
        #[arg(long)]
        json: bool,
    },
    /// Check the catalog and the store for damage (exit code 5 if there is any)
    #[command(after_long_help = "Examples:
  vmdepot fsck
  vmdepot fsck --bases --json
  vmdepot fsck --repair")]
    Fsck {
        /// Also read every launch base back in full and compare its digest
        #[arg(long)]
        bases: bool,
        /// Print the report as a JSON object instead of lines
        #[arg(long)]
        json: bool,
        /// Rebuild a lost or damaged catalog from packs, indexes and manifests
        ///
        /// Rebuilds a missing, empty or damaged catalog from the packs, their indexes and the
        /// image manifests (run it alone); on a sound catalog, writes the manifests and pack
        /// indexes it lacks.
        #[arg(long)]
        repair: bool,
    },
    /// Logical vs stored bytes, dedup and compression ratios
    #[command(after_long_help = "Examples:
  vmdepot stats
  vmdepot stats --json")]
    Stats {
        /// Print the statistics as a JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
}

impl MaintCmd {
    /// What the command does with the depot: checks and `gc --dry-run`
    /// only read; gc releases the space reserve.
    pub fn intent(&self) -> Intent {
        match self {
            MaintCmd::Gc {
                remote: Some(_), ..
            } => Intent::Write,
            MaintCmd::Fsck { repair: false, .. }
            | MaintCmd::Stats { .. }
            | MaintCmd::Gc { dry_run: true, .. } => Intent::Read,
            MaintCmd::Gc { .. } => Intent::Free,
            MaintCmd::Fsck { repair: true, .. } => Intent::Write,
        }
    }
}

/// Runs `gc`, `fsck` (not `--repair`: see [`repair`]) or `stats`; the exit
/// code is 5 if fsck finds damage.
pub fn run(depot: &Depot, cmd: MaintCmd, progress: &dyn Progress) -> anyhow::Result<i32> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        MaintCmd::Gc {
            dry_run,
            remote: Some(remote),
            break_lock,
            json,
        } => {
            let r = depot
                .remote(&remote)?
                .gc(dry_run, break_lock, vmdepot::remote_grace())?;
            print_remote_gc(out, &r, json)?;
        }
        MaintCmd::Gc { dry_run, json, .. } => {
            let r = depot.gc(dry_run)?;
            if json {
                print_json(out, &r)?;
            } else {
                print_gc(out, &r)?;
            }
        }
        MaintCmd::Fsck { bases, json, .. } => {
            let r = if bases {
                depot.fsck_bases(progress)?
            } else {
                depot.fsck()?
            };
            if json {
                print_json(out, &r)?;
            } else {
                print_fsck(out, &r)?;
            }
            if !r.is_clean() {
                return Ok(DAMAGED);
            }
        }
        MaintCmd::Stats { json } => {
            let s = depot.stats()?;
            if json {
                print_json(out, &s)?;
            } else {
                print_stats(out, &s)?;
            }
        }
    }
    Ok(0)
}

/// `fsck --repair` on the depot at `dir`, then the usual check of what
/// there is now; the exit code is 5 unless both are clean.
pub fn repair(dir: &Path, opts: &DepotOptions, json: bool) -> anyhow::Result<i32> {
    let r = Depot::repair(dir, opts)?;
    {
        let out = &mut std::io::stdout().lock();
        if json {
            print_json(out, &r)?;
        } else {
            print_repair(out, &r)?;
        }
    }
    let depot = Depot::open_with(dir, opts)?;
    let f = depot.fsck()?;
    if !json {
        print_fsck_summary(&mut std::io::stdout().lock(), &f)?;
    }
    Ok(if f.is_clean() && r.problems.is_empty() {
        0
    } else {
        DAMAGED
    })
}

/// `image verify`: as JSON, or one line.
pub fn print_verify(out: &mut impl Write, r: &VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out, r);
    }
    writeln!(
        out,
        "ok: {} image(s), {} chunks re-hashed, {} checked",
        r.images,
        r.chunks,
        human(r.bytes)
    )?;
    Ok(())
}

fn print_gc(out: &mut impl Write, r: &GcReport) -> anyhow::Result<()> {
    writeln!(
        out,
        "{}{} chunks, {} frames, {} packs, {} abandoned imports, {} unused launch bases; repacked {} packs; {} freed ({} dead in packs still in use)",
        if r.dry_run { "would remove " } else { "removed " },
        r.chunks_removed,
        r.frames_removed,
        r.packs_removed,
        r.abandoned_imports,
        r.bases_evicted,
        r.packs_repacked,
        human(r.bytes_freed + r.base_bytes_freed),
        human(r.bytes_in_partly_live_packs)
    )?;
    Ok(())
}

fn print_fsck(out: &mut impl Write, r: &FsckReport) -> anyhow::Result<()> {
    for p in &r.problems {
        writeln!(out, "problem: {}", esc(p))?;
    }
    for g in &r.garbage {
        writeln!(out, "garbage (gc removes it): {}", esc(g))?;
    }
    for w in &r.warnings {
        writeln!(out, "warning: {}", esc(w))?;
    }
    print_fsck_summary(out, r)
}

/// `clean: …` or `DAMAGED: …`, with the counts.
fn print_fsck_summary(out: &mut impl Write, r: &FsckReport) -> anyhow::Result<()> {
    writeln!(
        out,
        "{}: {} images, {} packs, {} chunks, {} problems",
        if r.is_clean() { "clean" } else { "DAMAGED" },
        r.images,
        r.packs,
        r.chunks,
        r.problems.len()
    )?;
    Ok(())
}

fn print_repair(out: &mut impl Write, r: &RepairReport) -> anyhow::Result<()> {
    if r.rebuilt {
        print_rebuilt(out, r)?;
    } else {
        writeln!(out, "catalog sound: kept")?;
    }
    writeln!(
        out,
        "{} manifests and {} pack indexes written",
        r.manifests_written, r.indexes_written
    )?;
    for p in &r.mended {
        writeln!(out, "mended: {}", esc(p))?;
    }
    for p in &r.problems {
        writeln!(out, "problem: {}", esc(p))?;
    }
    Ok(())
}

/// What a rebuilt catalog was made of.
fn print_rebuilt(out: &mut impl Write, r: &RepairReport) -> anyhow::Result<()> {
    let reason = r.reason.as_deref().unwrap_or("");
    writeln!(out, "catalog rebuilt ({})", esc(reason))?;
    for p in &r.set_aside {
        writeln!(out, "damaged catalog kept as {}", esc(p))?;
    }
    writeln!(
        out,
        "{} packs ({} re-read), {} frames, {} chunks",
        r.packs, r.packs_reindexed, r.frames, r.chunks
    )?;
    for i in &r.images {
        writeln!(out, "image restored: {}", esc(i))?;
    }
    for i in &r.instances {
        writeln!(
            out,
            "instance restored (stopped; name, CPUs, memory and forwards reset): {}",
            esc(i)
        )?;
    }
    Ok(())
}

fn print_stats(out: &mut impl Write, s: &Stats) -> anyhow::Result<()> {
    writeln!(out, "{:<16} {}", "images", s.images)?;
    let sizes = [
        ("logical bytes", s.logical_bytes, s.logical_bytes),
        ("data bytes", s.data_bytes, s.data_bytes),
        ("unique chunks", s.chunks, s.unique_chunk_bytes),
        ("stored bytes", s.stored_bytes, s.stored_bytes),
        ("catalog bytes", s.catalog_bytes, s.catalog_bytes),
        ("index bytes", s.index_bytes, s.index_bytes),
        ("manifest bytes", s.manifest_bytes, s.manifest_bytes),
    ];
    for (label, n, bytes) in sizes {
        writeln!(out, "{label:<16} {n} ({})", human(bytes))?;
    }
    let ratios = [
        ("dedup ratio", s.dedup_ratio),
        ("compression", s.compression_ratio),
        ("logical/stored", s.overall_ratio),
    ];
    for (label, r) in ratios {
        writeln!(out, "{label:<16} {r:.2}")?;
    }
    if s.per_image.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    let mut t = Table::new(&["ID", "NAME", ">UNIQUE", ">SHARED"]);
    for i in &s.per_image {
        t.row(vec![
            i.id.clone(),
            esc(&i.name).into_owned(),
            human(i.unique_stored_bytes),
            human(i.shared_stored_bytes),
        ]);
    }
    t.print(out)
}
