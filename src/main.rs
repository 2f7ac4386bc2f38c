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

mod cli;
use vmdepot::lifecycle::CaptureOptions;
use vmdepot::{
    Depot, DepotOptions, ExportFormat, ImageType, ImageUpdate, ImportOptions, Intent, Progress,
    SourceFormat,
};

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
    /// Act as this account (a Unix user name: [a-z_][a-z0-9_-]*$?, at most 32) [default: $VMDEPOT_ACCOUNT, else the Unix user]
    #[arg(long, global = true, value_name = "NAME")]
    account: Option<String>,
    /// Create the depot shared by this Unix group (dirs 2770, files 0660) instead of private (0700/0600); only when the depot is created
    #[arg(long, global = true, value_name = "GROUP")]
    group: Option<String>,
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
    Instance(cli::instance::InstanceCmd),
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
        /// Also read every launch base back in full and compare its digest
        #[arg(long)]
        bases: bool,
        #[arg(long)]
        json: bool,
        /// Rebuild a missing, empty or damaged catalog from the packs, their
        /// indexes and the image manifests (run it alone); on a sound
        /// catalog, write the manifests and pack indexes it lacks
        #[arg(long)]
        repair: bool,
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
        /// Marketplace images: the vendor
        #[arg(long, default_value = "")]
        vendor: String,
        /// Marketplace images: the application
        #[arg(long, default_value = "")]
        application: String,
        /// Marketplace images: the application's version
        #[arg(long = "app-version", default_value = "")]
        app_version: String,
        /// A tag KEY=VALUE (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Create a custom image from an instance's disk
    Create {
        #[arg(long = "from-instance", value_name = "INSTANCE")]
        from_instance: String,
        #[arg(long)]
        name: String,
        /// Capture a running instance: pause it while its disk is read
        #[arg(long)]
        live: bool,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
    },
    /// List images (deprecated ones only with --all)
    List {
        /// public, marketplace, custom or shared
        #[arg(long = "type")]
        kind: Option<String>,
        /// Only images with this tag KEY=VALUE (repeatable: all must match)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Include deprecated images
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Change an image's name, description, protection, tags or deprecation
    Update {
        image: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Refuse deletion until --unprotect
        #[arg(long, conflicts_with = "unprotect")]
        protect: bool,
        #[arg(long)]
        unprotect: bool,
        /// Set a tag KEY=VALUE (KEY= removes it; repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Hide from default listings (still launchable)
        #[arg(long, conflicts_with = "undeprecate")]
        deprecate: bool,
        #[arg(long)]
        undeprecate: bool,
        #[arg(long)]
        json: bool,
    },
    /// Share a custom image with another account (it may only launch it)
    Share {
        image: String,
        #[arg(long = "with", value_name = "ACCOUNT")]
        with: String,
    },
    /// Stop sharing an image with an account
    Unshare {
        image: String,
        #[arg(long = "with", value_name = "ACCOUNT")]
        with: String,
    },
    /// The accounts an image is shared with
    Shares {
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Copy an image into another depot (only the chunks it lacks travel)
    Copy {
        image: String,
        #[arg(long = "to-depot", value_name = "DIR")]
        to_depot: PathBuf,
        /// Name in the target [default: the same]
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Lineage: parent images, source instance, copies, children
    History {
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Show one image (id or name)
    Show {
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Write an image to a file, a block device (in place), or `-` (raw, stdout)
    Export {
        image: String,
        out: PathBuf,
        /// raw (sparse) or qcow2
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// Delete an image (its data is freed by `gc`)
    Delete {
        image: String,
        /// Even if it is shared or instances use it
        #[arg(long)]
        force: bool,
    },
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
    // Plain one-line records (no colour codes) unless stderr is a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if is_broken_pipe(&e) {
                std::process::exit(0);
            }
            eprintln!("vmdepot: {}", esc(&format!("{e:#}")));
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

/// `KEY=VALUE` arguments.
fn parse_tags(tags: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let v = parse_tags_allow_empty(tags)?;
    if let Some((k, _)) = v.iter().find(|(_, v)| v.is_empty()) {
        anyhow::bail!("--tag {k}= has no value: use --tag KEY=VALUE");
    }
    Ok(v)
}

/// `KEY=VALUE` arguments; `KEY=` (empty value) allowed.
fn parse_tags_allow_empty(tags: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    tags.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => anyhow::bail!("bad --tag {t:?}: use KEY=VALUE"),
        })
        .collect()
}

/// One `key value` line per field (the plain form of `show`), values
/// escaped ([`esc`]; lists and maps as JSON, which escapes on its own).
fn print_fields<T: serde::Serialize>(out: &mut impl Write, v: &T) -> anyhow::Result<()> {
    let v = serde_json::to_value(v)?;
    for (k, v) in v.as_object().into_iter().flatten() {
        let v = match v {
            serde_json::Value::String(s) => esc(s).into_owned(),
            serde_json::Value::Null => "-".into(),
            other => escape(&other.to_string(), false).into_owned(),
        };
        writeln!(out, "{k:<20} {v}")?;
    }
    Ok(())
}

/// A catalog string (name, description, tag, vendor field, account, error
/// message) made safe for a terminal, as `ls -b` does: control characters
/// as escapes (`\n`, `\t`, `\r`, `\x1b`, `\u{85}`), Unicode line
/// separators and bidirectional controls as `\u{…}`, and `\` as `\\`; so
/// a description cannot forge output lines or drive the terminal. Every
/// catalog string the CLI prints outside JSON goes through it.
pub(crate) fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s, true)
}

/// [`esc`]; `backslash: false` leaves `\` alone (for JSON text, whose own
/// escapes use it).
fn escape(s: &str, backslash: bool) -> std::borrow::Cow<'_, str> {
    let special = |c: char| {
        (backslash && c == '\\')
            || c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(special) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !special(c) => o.push(c),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x80 => o.push_str(&format!("\\x{:02x}", c as u32)),
            c => o.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(o)
}

/// What a command does with the depot: read-only commands work on a full
/// filesystem without writing; delete and gc release the space reserve.
fn intent(cmd: &Cmd) -> Intent {
    match cmd {
        Cmd::Image(
            ImageCmd::List { .. }
            | ImageCmd::Show { .. }
            | ImageCmd::Export { .. }
            | ImageCmd::Verify { .. }
            | ImageCmd::History { .. }
            | ImageCmd::Shares { .. },
        )
        | Cmd::Fsck { repair: false, .. }
        | Cmd::Stats { .. }
        | Cmd::Gc { dry_run: true, .. } => Intent::Read,
        Cmd::Image(ImageCmd::Delete { .. }) | Cmd::Gc { .. } => Intent::Free,
        _ => Intent::Write,
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let dir = cli.depot.clone().unwrap_or_else(Depot::default_dir);
    if let Cmd::Fsck {
        json, repair: true, ..
    } = cli.cmd
    {
        let opts = DepotOptions {
            account: cli.account.clone(),
            group: cli.group.clone(),
            intent: Intent::Write,
        };
        let r = Depot::repair(&dir, &opts)?;
        let mut out = std::io::stdout().lock();
        if json {
            print_json(&r)?;
        } else {
            if r.rebuilt {
                writeln!(out, "catalog rebuilt ({})", esc(&r.reason))?;
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
        }
        drop(out);
        // Then the usual check of what there is now.
        let depot = Depot::open_with(&dir, &opts)?;
        let f = depot.fsck()?;
        if !json {
            println!(
                "{}: {} images, {} packs, {} chunks, {} problems",
                if f.is_clean() { "clean" } else { "DAMAGED" },
                f.images,
                f.packs,
                f.chunks,
                f.problems.len()
            );
        }
        return Ok(if f.is_clean() && r.problems.is_empty() {
            0
        } else {
            5
        });
    }
    let depot = Depot::open_with(
        &dir,
        &DepotOptions {
            account: cli.account.clone(),
            group: cli.group.clone(),
            intent: intent(&cli.cmd),
        },
    )?;
    let progress = CliProgress::new(cli.quiet);
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Instance(cmd) => {
            drop(out);
            return cli::instance::run(&depot, cmd, &progress);
        }
        Cmd::Image(ImageCmd::Import {
            file,
            name,
            format,
            kind,
            description,
            reread,
            vendor,
            application,
            app_version,
            tags,
            json,
        }) => {
            let mut opts = ImportOptions::new(name);
            opts.kind = ImageType::parse(&kind)?;
            opts.description = description;
            opts.format = SourceFormat::parse(&format)?;
            opts.reread = reread;
            if opts.kind != ImageType::Marketplace
                && !(vendor.is_empty() && application.is_empty() && app_version.is_empty())
            {
                anyhow::bail!(
                    "--vendor, --application and --app-version are for --type marketplace"
                );
            }
            if opts.kind == ImageType::Marketplace && (vendor.is_empty() || application.is_empty())
            {
                anyhow::bail!(
                    "a marketplace image needs --vendor and --application (and --app-version)"
                );
            }
            opts.vendor = vendor;
            opts.application = application;
            opts.app_version = app_version;
            opts.tags = parse_tags(&tags)?;
            let info = depot.import(&file, &opts, &progress)?;
            if json {
                print_json(&info)?;
            } else {
                writeln!(out, "{}", info.id)?;
            }
        }
        Cmd::Image(ImageCmd::Create {
            from_instance,
            name,
            live,
            description,
            json,
        }) => {
            let mut opts = CaptureOptions::new(name);
            opts.live = live;
            opts.description = description;
            let info = depot.capture(&from_instance, &opts, &progress)?;
            if json {
                print_json(&info)?;
            } else {
                writeln!(out, "{}", info.id)?;
            }
        }
        Cmd::Image(ImageCmd::Update {
            image,
            name,
            description,
            protect,
            unprotect,
            tags,
            deprecate,
            undeprecate,
            json,
        }) => {
            let u = ImageUpdate {
                name,
                description,
                protected: (protect || unprotect).then_some(protect),
                deprecated: (deprecate || undeprecate).then_some(deprecate),
                tags: parse_tags_allow_empty(&tags)?,
            };
            let info = depot.update_image(&image, &u)?;
            if json {
                print_json(&info)?;
            } else {
                print_fields(&mut out, &info)?;
            }
        }
        Cmd::Image(ImageCmd::Share { image, with }) => {
            let i = depot.share_image(&image, &with)?;
            writeln!(
                out,
                "{} ({}) is shared with {}",
                esc(&i.name),
                i.id,
                esc(&i.shared_with.join(", "))
            )?;
        }
        Cmd::Image(ImageCmd::Unshare { image, with }) => {
            let i = depot.unshare_image(&image, &with)?;
            writeln!(
                out,
                "{} ({}) is no longer shared with {}",
                esc(&i.name),
                i.id,
                esc(&with)
            )?;
        }
        Cmd::Image(ImageCmd::Shares { image, json }) => {
            let v = depot.image_shares(&image)?;
            if json {
                print_json(&v)?;
            } else {
                for a in v {
                    writeln!(out, "{}", esc(&a))?;
                }
            }
        }
        Cmd::Image(ImageCmd::Copy {
            image,
            to_depot,
            name,
            json,
        }) => {
            let r = depot.copy_image(&image, &to_depot, name.as_deref(), &progress)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(
                    out,
                    "{}  {} in {}: {} of {} chunks sent ({}), {} already there",
                    r.image.id,
                    esc(&r.image.name),
                    esc(&to_depot.display().to_string()),
                    r.chunks_sent,
                    r.chunks,
                    human(r.bytes_sent),
                    r.chunks_present
                )?;
            }
        }
        Cmd::Image(ImageCmd::History { image, json }) => {
            let h = depot.image_history(&image)?;
            if json {
                print_json(&h)?;
            } else {
                for e in h {
                    writeln!(
                        out,
                        "{:<16} {:<20}  {:<30}{}{}",
                        e.relation,
                        esc(&e.id),
                        esc(&e.name),
                        if e.depot.is_empty() {
                            String::new()
                        } else {
                            format!("  in {}", esc(&e.depot))
                        },
                        if e.exists { "" } else { "  (deleted)" }
                    )?;
                }
            }
        }
        Cmd::Image(ImageCmd::List {
            kind,
            tags,
            all,
            json,
        }) => {
            if let Some(k) = &kind {
                if !["public", "marketplace", "custom", "shared"].contains(&k.as_str()) {
                    anyhow::bail!(
                        "unknown --type {k:?}: use public, marketplace, custom or shared"
                    );
                }
            }
            let want = parse_tags(&tags)?;
            let list: Vec<_> = depot
                .list_images()?
                .into_iter()
                .filter(|i| all || !i.deprecated)
                .filter(|i| kind.as_ref().is_none_or(|k| &i.kind == k))
                .filter(|i| want.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
                .collect();
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
                        esc(&i.name),
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
            let format = ExportFormat::parse(&format)?;
            if path.as_os_str() == "-" {
                if format != ExportFormat::Raw {
                    anyhow::bail!(vmdepot::Error::Invalid(
                        "`-` streams the raw image to stdout: qcow2 needs a file (give a path)"
                            .into()
                    ));
                }
                let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut out);
                depot.export_to(&image, &mut w, &progress)?;
            } else {
                depot.export(&image, &path, format, &progress)?;
            }
        }
        Cmd::Image(ImageCmd::Delete { image, force }) => {
            let i = depot.delete_image(&image, force)?;
            writeln!(
                out,
                "deleted {} ({}); run `vmdepot gc` to free its data",
                esc(&i.name),
                i.id
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
        Cmd::Fsck { bases, json, .. } => {
            let r = if bases {
                depot.fsck_bases(&progress)?
            } else {
                depot.fsck()?
            };
            if json {
                print_json(&r)?;
            } else {
                for p in &r.problems {
                    writeln!(out, "problem: {}", esc(p))?;
                }
                for g in &r.garbage {
                    writeln!(out, "garbage (gc removes it): {}", esc(g))?;
                }
                for w in &r.warnings {
                    writeln!(out, "warning: {}", esc(w))?;
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
                writeln!(
                    out,
                    "index bytes      {} ({})",
                    s.index_bytes,
                    human(s.index_bytes)
                )?;
                writeln!(
                    out,
                    "manifest bytes   {} ({})",
                    s.manifest_bytes,
                    human(s.manifest_bytes)
                )?;
                writeln!(out, "dedup ratio      {:.2}", s.dedup_ratio)?;
                writeln!(out, "compression      {:.2}", s.compression_ratio)?;
                writeln!(out, "logical/stored   {:.2}", s.overall_ratio)?;
                for i in &s.per_image {
                    writeln!(
                        out,
                        "  {:<20} {:<24} unique {:>10}  shared {:>10}",
                        i.id,
                        esc(&i.name),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esc_shows_control_characters_as_escapes() {
        assert_eq!(esc("plain name-1.2 é"), "plain name-1.2 é");
        assert!(matches!(esc("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            esc("x\nowner              alice\x1b[31m"),
            "x\\nowner              alice\\x1b[31m"
        );
        assert_eq!(esc("a\tb\rc\\d\x7f\0"), "a\\tb\\rc\\\\d\\x7f\\x00");
        assert_eq!(
            esc("\u{9b}2J \u{202e}abc \u{2028}"),
            "\\u{9b}2J \\u{202e}abc \\u{2028}"
        );
        // JSON text keeps its own backslash escapes
        assert_eq!(escape(r#"{"k":"a\u001b"}"#, false), r#"{"k":"a\u001b"}"#);
        assert_eq!(escape("[\"\u{9b}\"]", false), "[\"\\u{9b}\"]");
    }
}
