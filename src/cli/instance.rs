//! `vmdepot instance …`: [`InstanceCmd`], the instance subcommands, and
//! their handlers (flags into [`LaunchOptions`], one [`Depot`] call,
//! printing). The work is the library's (`vmdepot::launch::instance`);
//! foreground runs and the console are in [`super::terminal`], the reading
//! of key and user-data files in [`super::input`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use vmdepot::depot::access::Op;
use vmdepot::launch::instance::STOP_TIMEOUT;
use vmdepot::launch::seed::{MAX_SSH_KEY, MAX_USER_DATA};
use vmdepot::{Accel, Depot, DiskMode, Forward, ImageInfo, InstanceInfo, LaunchOptions, Progress};

use super::input::read_file;
use super::output::{esc, print_json, show};
use super::remote::remote_image;
use super::terminal::{console, run_foreground};

/// The subcommands of `vmdepot instance`.
#[derive(Subcommand)]
pub enum InstanceCmd {
    /// Launch instances of an image (detached unless --foreground)
    ///
    /// REMOTE:IMAGE (when REMOTE is a configured remote) pulls the image first unless a copy was pulled already
    Run(RunArgs),
    /// List instances
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one instance (id or name)
    Show {
        instance: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop: ACPI power button through QMP, then kill after --timeout
    Stop {
        instance: String,
        /// Kill at once
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off
        #[arg(long, default_value_t = STOP_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Start a stopped instance
    Start {
        instance: String,
        /// Keep QEMU as a child (for systemd units: Type=notify)
        #[arg(long)]
        foreground: bool,
    },
    /// Stop and start
    Restart {
        instance: String,
        #[arg(long, default_value_t = STOP_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Delete an instance (its disk, seed, sockets and logs)
    Delete {
        instance: String,
        /// Kill it first if it is running
        #[arg(long)]
        force: bool,
    },
    /// Print the serial console log
    Logs {
        instance: String,
        /// Keep printing while the instance runs
        #[arg(long, short)]
        follow: bool,
    },
    /// Attach to the serial console (Ctrl-] to detach)
    Console { instance: String },
    /// Print a systemd unit that runs the instance
    Unit { instance: String },
    /// Capture the instance as a backup image (tagged backup-of=ID)
    Backup {
        instance: String,
        #[arg(long)]
        name: Option<String>,
        /// Keep only the N newest backups of this instance
        #[arg(long)]
        keep: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Make the instance's disk an image's content again (restarts it if running)
    Restore {
        instance: String,
        #[arg(long = "from", value_name = "IMAGE")]
        from: String,
    },
}

/// The flags of `vmdepot instance run`.
#[derive(Args)]
pub struct RunArgs {
    /// An image's id or name, or REMOTE:IMAGE (pulled first unless this depot has it)
    image: String,
    /// Instance name; with --count N: NAME-1 … NAME-N
    #[arg(long)]
    name: Option<String>,
    /// How many instances (batch launch)
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory, e.g. 512M or 2G
    #[arg(long, default_value = "512M")]
    memory: String,
    /// lazy (qcow2 overlay; the image is read from the store as the guest needs it, no base file), overlay (qcow2 over a raw base file of the image, made on first use) or copy (private raw disk)
    #[arg(long, default_value = "lazy")]
    disk: String,
    /// auto (KVM if it really works here, else TCG), kvm or tcg
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Guest hostname (NoCloud local-hostname) [default: the instance name]
    #[arg(long)]
    hostname: Option<String>,
    /// Public key file to authorise (generated user-data)
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<PathBuf>,
    /// User-data file for cloud-init (replaces the generated one)
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// Forward a host TCP port to the guest: [ADDR:]HOST:GUEST
    #[arg(long = "forward", value_name = "HOST:GUEST")]
    forwards: Vec<String>,
    /// Keep QEMU as a child: exit with the guest; SIGTERM powers it off
    #[arg(long)]
    foreground: bool,
    #[arg(long)]
    json: bool,
}

/// Runs one `instance` subcommand on `depot`; the exit code is QEMU's for
/// a foreground run or start. (stdout is locked only by the commands that
/// print: the console's output thread writes to it.)
pub fn run(depot: &Depot, cmd: InstanceCmd, progress: &dyn Progress) -> anyhow::Result<i32> {
    let out = || std::io::stdout().lock();
    match cmd {
        InstanceCmd::Run(a) => return launch(depot, a, progress),
        InstanceCmd::Start {
            instance,
            foreground: true,
        } => return run_foreground(|| depot.start_foreground(&instance)),
        InstanceCmd::Start { instance, .. } => start(depot, &instance, &mut out())?,
        InstanceCmd::Console { instance } => attach(depot, &instance)?,
        InstanceCmd::List { json } => list(depot, json, &mut out())?,
        InstanceCmd::Show { instance, json } => {
            show(&mut out(), &depot.instance(&instance)?, json)?
        }
        InstanceCmd::Stop {
            instance,
            force,
            timeout,
        } => {
            let i = depot.stop_instance(&instance, force, Duration::from_secs(timeout))?;
            print_state(&mut out(), &i)?;
        }
        InstanceCmd::Restart { instance, timeout } => {
            let (i, notice) = depot.restart_instance(&instance, Duration::from_secs(timeout))?;
            print_notice(notice.as_deref());
            print_state(&mut out(), &i)?;
        }
        InstanceCmd::Delete { instance, force } => {
            let i = depot.delete_instance(&instance, force)?;
            writeln!(out(), "deleted {} ({})", esc(&i.name), i.id)?;
        }
        InstanceCmd::Logs { instance, follow } => logs(depot, &instance, follow, &mut out())?,
        InstanceCmd::Backup {
            instance,
            name,
            keep,
            json,
        } => {
            if let Some(n) = &name {
                depot.check_local_name(n)?;
            }
            let (info, pruned) = depot.backup_instance(&instance, name, keep, progress)?;
            print_backup(&mut out(), &info, &pruned, json)?;
        }
        InstanceCmd::Restore { instance, from } => {
            let (i, notice) = depot.restore_instance(&instance, &from, progress)?;
            print_notice(notice.as_deref());
            print_restored(&mut out(), &i)?;
        }
        InstanceCmd::Unit { instance } => write!(out(), "{}", depot.instance_unit(&instance)?)?,
    }
    Ok(0)
}

/// `instance list`.
fn list(depot: &Depot, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let list = depot.list_instances()?;
    if json {
        return print_json(out, &list);
    }
    print_instance_table(out, &list)
}

/// `instance start` (not in the foreground).
fn start(depot: &Depot, instance: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let (i, notice) = depot.start_instance(instance)?;
    print_notice(notice.as_deref());
    let name = esc(&i.name);
    writeln!(out, "{name} ({}) {}  {}", i.id, i.state, ssh_hint(&i))?;
    Ok(())
}

/// `instance backup`: the new backup and the ones pruned.
fn print_backup(
    out: &mut impl Write,
    info: &ImageInfo,
    pruned: &[String],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(
            out,
            &serde_json::json!({ "backup": info, "pruned": pruned }),
        );
    }
    writeln!(out, "{}  {}", info.id, esc(&info.name))?;
    for p in pruned {
        writeln!(out, "pruned {}", esc(p))?;
    }
    Ok(())
}

/// `instance run`: launches the instances and prints them, or runs the one
/// instance in the foreground.
fn launch(depot: &Depot, a: RunArgs, progress: &dyn Progress) -> anyhow::Result<i32> {
    if a.foreground && a.count != 1 {
        anyhow::bail!("--foreground runs one instance: drop --count or --foreground");
    }
    let (foreground, json) = (a.foreground, a.json);
    let mut opts = a.into_options()?;
    if depot.remote_reference(&opts.image).is_some() {
        opts.image = pulled(depot, &opts.image, progress)?;
    }
    let launched = depot.launch(&opts, progress)?;
    if foreground {
        // (the start prints the notice)
        let id = launched.instances[0].id().to_owned();
        return run_foreground(|| {
            let started = depot.start_foreground(&id);
            if started.is_err() {
                // `run` leaves nothing behind when the VM does not start.
                let _ = depot.delete_instance(&id, true);
            }
            started
        });
    }
    print_notice(launched.notice.as_deref());
    let infos: Vec<&InstanceInfo> = launched.instances.iter().map(|i| i.info()).collect();
    let out = &mut std::io::stdout().lock();
    if json {
        print_json(out, &infos)?;
        return Ok(0);
    }
    for i in infos {
        writeln!(out, "{}  {}  {}", i.id, esc(&i.name), ssh_hint(i))?;
    }
    Ok(0)
}

/// The id of the local copy of `REMOTE:IMAGE` (which the account must be
/// allowed to launch): the original it was pushed from or one pulled
/// before, else pulled now.
fn pulled(depot: &Depot, reference: &str, progress: &dyn Progress) -> anyhow::Result<String> {
    let (remote, img) = remote_image(depot, reference, Op::Launch)?;
    if let Some(local) = depot.local_copy(&remote, &img)? {
        return Ok(local.id);
    }
    Ok(depot.pull_image(&remote, &img, None, progress)?.image.id)
}

impl RunArgs {
    /// The library's options; `--ssh-key` and `--user-data` files are read
    /// here. `--foreground` launches without starting (the CLI starts it).
    fn into_options(self) -> anyhow::Result<LaunchOptions> {
        let mut opts = LaunchOptions::new(self.image);
        opts.name = self.name;
        opts.count = self.count;
        opts.cpus = self.cpus;
        opts.memory_mib = vmdepot::launch::qemu::parse_memory(&self.memory)?;
        opts.disk = DiskMode::parse(&self.disk)?;
        opts.accel = Accel::parse(&self.accel)?;
        opts.hostname = self.hostname;
        opts.ssh_keys = self
            .ssh_keys
            .iter()
            .map(|p| read_file(p, MAX_SSH_KEY))
            .collect::<Result<_, _>>()?;
        opts.user_data = self
            .user_data
            .as_ref()
            .map(|p| read_file(p, MAX_USER_DATA))
            .transpose()?;
        opts.forwards = self
            .forwards
            .iter()
            .map(|f| Forward::parse(f))
            .collect::<Result<_, _>>()?;
        opts.no_start = self.foreground;
        Ok(opts)
    }
}

/// `instance console`: attaches to a running or paused instance.
fn attach(depot: &Depot, instance: &str) -> anyhow::Result<()> {
    let i = depot.instance(instance)?;
    if !is_up(&i) {
        anyhow::bail!(
            "instance {} ({}) is {}: start it first",
            i.name,
            i.id,
            i.state
        );
    }
    console(&i)
}

/// `instance logs`: the serial log; with `follow`, what it gains until the
/// instance stops.
fn logs(depot: &Depot, instance: &str, follow: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let i = depot.instance(instance)?;
    let mut pos = 0u64;
    loop {
        pos += copy_from(&i.serial_log, pos, out)?;
        out.flush()?;
        if !follow {
            return Ok(());
        }
        if !is_up(&depot.instance(&i.id)?) {
            copy_from(&i.serial_log, pos, out)?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether QEMU runs for the instance (running or paused).
fn is_up(i: &InstanceInfo) -> bool {
    matches!(i.state.as_str(), "running" | "paused")
}

/// A notice of the library for the user (e.g. why TCG), on stderr.
fn print_notice(notice: Option<&str>) {
    if let Some(n) = notice {
        eprintln!("vmdepot: {}", esc(n));
    }
}

/// `NAME (ID) STATE`.
fn print_state(out: &mut impl Write, i: &InstanceInfo) -> anyhow::Result<()> {
    writeln!(out, "{} ({}) {}", esc(&i.name), i.id, i.state)?;
    Ok(())
}

fn print_restored(out: &mut impl Write, i: &InstanceInfo) -> anyhow::Result<()> {
    writeln!(
        out,
        "{} ({}) restored from {} ({}); {}",
        esc(&i.name),
        i.id,
        esc(&i.image_name),
        i.image,
        i.state
    )?;
    Ok(())
}

fn print_instance_table(out: &mut impl Write, list: &[InstanceInfo]) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<20}  {:<20}  {:<20}  {:<8}  {:<4}  {:>8}  {:>6}",
        "ID", "NAME", "IMAGE", "STATE", "ACCEL", "PID", "SSH"
    )?;
    for i in list {
        writeln!(
            out,
            "{:<20}  {:<20}  {:<20}  {:<8}  {:<4}  {:>8}  {:>6}",
            i.id,
            esc(&i.name),
            esc(&i.image_name),
            i.state,
            i.accel,
            i.pid.map(|p| p.to_string()).unwrap_or("-".into()),
            i.ssh_port.map(|p| p.to_string()).unwrap_or("-".into()),
        )?;
    }
    Ok(())
}

fn ssh_hint(i: &InstanceInfo) -> String {
    match i.ssh_port {
        Some(p) => format!("ssh -p {p} <user>@127.0.0.1"),
        None => String::new(),
    }
}

/// Appends the file's bytes from `pos` to `out`; returns how many.
fn copy_from(path: &Path, pos: u64, out: &mut impl Write) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    f.seek(std::io::SeekFrom::Start(pos))?;
    Ok(std::io::copy(&mut f, out)?)
}
