//! The `vmdepot` command: a thin shell over the library.
//!
//! Errors are printed as one line (`vmdepot: …` with `{:#}`) and the exit
//! code comes from [`vmdepot::Error::exit_code`] (2 for usage errors, as
//! clap does). A closed stdout (`| head`) is not an error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod cli_instance;
use vmdepot::{Depot, ExportFormat, ImageType, ImportOptions, Progress, SourceFormat};

#[derive(Parser)]
#[command(
    name = "vmdepot",
    version,
    about = "Local machine-image depot for a hypervisor host"
)]
struct Cli {
    /// Depot directory [default: $VMDEPOT_DIR, /var/lib/vmdepot as root, else $XDG_DATA_HOME/vmdepot]
    #[arg(long, global = true, value_name = "DIR")]
    depot: Option<PathBuf>,
    /// Act as this account [default: $VMDEPOT_ACCOUNT, else the Unix user]
    #[arg(long, global = true, value_name = "NAME")]
    account: Option<String>,
    /// No progress output
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage images
    #[command(subcommand)]
    Image(ImageCmd),
    /// Run and manage instances (QEMU virtual machines) of images
    #[command(subcommand)]
    Instance(cli_instance::InstanceCmd),
    /// Remove chunks and packs that no image uses, and leftovers of killed imports
    Gc {
        /// Only report what would be removed
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check the catalog and the store for damage
    Fsck {
        #[arg(long)]
        json: bool,
    },
    /// Logical vs stored bytes, dedup and compression ratios
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import a disk image file (format detected from the content)
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// auto, raw, qcow2, vmdk, vhdx or vhd
        #[arg(long, default_value = "auto")]
        format: String,
        /// public, marketplace or custom
        #[arg(long = "type", default_value = "custom")]
        kind: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Read the file even if it is unchanged since an earlier import
        #[arg(long)]
        reread: bool,
        #[arg(long)]
        json: bool,
    },
    /// List images
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one image (id or name)
    Show {
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Write an image to a file
    Export {
        image: String,
        out: PathBuf,
        /// raw (sparse) or qcow2
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// Delete an image (its data is freed by `gc`)
    Delete { image: String },
    /// Re-read and re-hash stored data: one image (with its digest), or all chunks
    Verify {
        image: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMDEPOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if is_broken_pipe(&e) {
                std::process::exit(0);
            }
            eprintln!("vmdepot: {e:#}");
            let code = e
                .downcast_ref::<vmdepot::Error>()
                .map(|e| e.exit_code())
                .unwrap_or(1);
            std::process::exit(code);
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// One `key value` line per field (the plain form of `show`).
fn print_fields<T: serde::Serialize>(out: &mut impl Write, v: &T) -> anyhow::Result<()> {
    let v = serde_json::to_value(v)?;
    for (k, v) in v.as_object().into_iter().flatten() {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        };
        writeln!(out, "{k:<20} {v}")?;
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let dir = cli.depot.clone().unwrap_or_else(Depot::default_dir);
    let mut depot = Depot::open(&dir)?;
    if let Some(a) = &cli.account {
        depot = depot.with_account(a.clone());
    }
    let progress = CliProgress::new(cli.quiet);
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Instance(cmd) => {
            drop(out);
            return cli_instance::run(&depot, cmd, &progress);
        }
        Cmd::Image(ImageCmd::Import {
            file,
            name,
            format,
            kind,
            description,
            reread,
            json,
        }) => {
            let opts = ImportOptions {
                name,
                kind: ImageType::parse(&kind)?,
                description,
                format: SourceFormat::parse(&format)?,
                reread,
            };
            let info = depot.import(&file, &opts, &progress)?;
            if json {
                print_json(&info)?;
            } else {
                writeln!(out, "{}", info.id)?;
            }
        }
        Cmd::Image(ImageCmd::List { json }) => {
            let list = depot.list_images()?;
            if json {
                print_json(&list)?;
            } else {
                writeln!(
                    out,
                    "{:<20}  {:<24}  {:<11}  {:<9}  {:>10}  {:>10}  CREATED",
                    "ID", "NAME", "TYPE", "STATE", "SIZE", "STORED"
                )?;
                for i in list {
                    writeln!(
                        out,
                        "{:<20}  {:<24}  {:<11}  {:<9}  {:>10}  {:>10}  {}",
                        i.id,
                        i.name,
                        i.kind,
                        i.state,
                        human(i.virtual_size),
                        human(i.unique_stored_bytes + i.shared_stored_bytes),
                        i.created_at
                    )?;
                }
            }
        }
        Cmd::Image(ImageCmd::Show { image, json }) => {
            let i = depot.image(&image)?;
            if json {
                print_json(&i)?;
            } else {
                print_fields(&mut out, &i)?;
            }
        }
        Cmd::Image(ImageCmd::Export {
            image,
            out: path,
            format,
        }) => {
            depot.export(&image, &path, ExportFormat::parse(&format)?, &progress)?;
        }
        Cmd::Image(ImageCmd::Delete { image }) => {
            let i = depot.delete_image(&image)?;
            writeln!(
                out,
                "deleted {} ({}); run `vmdepot gc` to free its data",
                i.name, i.id
            )?;
        }
        Cmd::Image(ImageCmd::Verify { image, json }) => {
            let r = depot.verify(image.as_deref(), &progress)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(
                    out,
                    "ok: {} image(s), {} chunks re-hashed ({})",
                    r.images,
                    r.chunks,
                    human(r.chunks * 4096)
                )?;
            }
        }
        Cmd::Gc { dry_run, json } => {
            let r = depot.gc(dry_run)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(
                    out,
                    "{}{} chunks, {} frames, {} packs, {} abandoned imports, {} unused launch bases; repacked {} packs; {} freed ({} dead in packs still in use)",
                    if dry_run { "would remove " } else { "removed " },
                    r.chunks_removed,
                    r.frames_removed,
                    r.packs_removed,
                    r.abandoned_imports,
                    r.bases_evicted,
                    r.packs_repacked,
                    human(r.bytes_freed + r.base_bytes_freed),
                    human(r.bytes_in_partly_live_packs)
                )?;
            }
        }
        Cmd::Fsck { json } => {
            let r = depot.fsck()?;
            if json {
                print_json(&r)?;
            } else {
                for p in &r.problems {
                    writeln!(out, "problem: {p}")?;
                }
                for g in &r.garbage {
                    writeln!(out, "garbage (gc removes it): {g}")?;
                }
                writeln!(
                    out,
                    "{}: {} images, {} packs, {} chunks, {} problems",
                    if r.is_clean() { "clean" } else { "DAMAGED" },
                    r.images,
                    r.packs,
                    r.chunks,
                    r.problems.len()
                )?;
            }
            if !r.is_clean() {
                return Ok(5);
            }
        }
        Cmd::Stats { json } => {
            let s = depot.stats()?;
            if json {
                print_json(&s)?;
            } else {
                writeln!(out, "images           {}", s.images)?;
                writeln!(
                    out,
                    "logical bytes    {} ({})",
                    s.logical_bytes,
                    human(s.logical_bytes)
                )?;
                writeln!(
                    out,
                    "data bytes       {} ({})",
                    s.data_bytes,
                    human(s.data_bytes)
                )?;
                writeln!(
                    out,
                    "unique chunks    {} ({})",
                    s.chunks,
                    human(s.unique_chunk_bytes)
                )?;
                writeln!(
                    out,
                    "stored bytes     {} ({})",
                    s.stored_bytes,
                    human(s.stored_bytes)
                )?;
                writeln!(
                    out,
                    "catalog bytes    {} ({})",
                    s.catalog_bytes,
                    human(s.catalog_bytes)
                )?;
                writeln!(out, "dedup ratio      {:.2}", s.dedup_ratio)?;
                writeln!(out, "compression      {:.2}", s.compression_ratio)?;
                writeln!(out, "logical/stored   {:.2}", s.overall_ratio)?;
                for i in &s.per_image {
                    writeln!(
                        out,
                        "  {:<20} {:<24} unique {:>10}  shared {:>10}",
                        i.id,
                        i.name,
                        human(i.unique_stored_bytes),
                        human(i.shared_stored_bytes)
                    )?;
                }
            }
        }
    }
    Ok(0)
}

fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// indicatif on a terminal; a plain line every 5 s otherwise (journald);
/// nothing with --quiet.
struct CliProgress {
    mode: Mode,
}

enum Mode {
    Quiet,
    Bar(Mutex<Option<indicatif::ProgressBar>>),
    Plain(Mutex<PlainState>),
}

struct PlainState {
    what: String,
    total: u64,
    done: u64,
    last: Instant,
}

impl CliProgress {
    fn new(quiet: bool) -> CliProgress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar(Mutex::new(None))
        } else {
            Mode::Plain(Mutex::new(PlainState {
                what: String::new(),
                total: 0,
                done: 0,
                last: Instant::now(),
            }))
        };
        CliProgress { mode }
    }
}

impl Progress for CliProgress {
    fn begin(&self, what: &str, total: u64) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Bar(b) => {
                let bar = if total > 0 {
                    indicatif::ProgressBar::new(total).with_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .unwrap()
                        .progress_chars("=> "),
                    )
                } else {
                    indicatif::ProgressBar::new_spinner()
                };
                bar.set_message(what.to_owned());
                bar.enable_steady_tick(Duration::from_millis(200));
                *b.lock().unwrap() = Some(bar);
            }
            Mode::Plain(s) => {
                let mut s = s.lock().unwrap();
                s.what = what.to_owned();
                s.total = total;
                s.done = 0;
                s.last = Instant::now();
            }
        }
    }

    fn advance(&self, n: u64) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Bar(b) => {
                if let Some(bar) = b.lock().unwrap().as_ref() {
                    bar.inc(n);
                }
            }
            Mode::Plain(s) => {
                let mut s = s.lock().unwrap();
                s.done += n;
                if s.last.elapsed() >= Duration::from_secs(5) {
                    s.last = Instant::now();
                    let pct = if s.total > 0 {
                        s.done as f64 * 100.0 / s.total as f64
                    } else {
                        0.0
                    };
                    eprintln!(
                        "vmdepot: {}: {:.0}% ({} of {})",
                        s.what,
                        pct,
                        human(s.done),
                        human(s.total)
                    );
                }
            }
        }
    }

    fn end(&self) {
        if let Mode::Bar(b) = &self.mode {
            if let Some(bar) = b.lock().unwrap().take() {
                bar.finish_and_clear();
            }
        }
    }
}
