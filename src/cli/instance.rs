//! `vmdepot instance …`: [`InstanceCmd`], the instance subcommands, and
//! their handlers (flags into [`LaunchOptions`], one [`Depot`] call,
//! printing). The work is the library's (`vmdepot::launch::instance`);
//! foreground runs and the console are in [`super::terminal`], the reading
//! of key and user-data files in [`super::input`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use vmdepot::{
    check_account, console_attached, parse_memory, Accel, Depot, DiskMode, Firmware, Forward,
    ImageInfo, InstanceInfo, LaunchOptions, Op, Progress, MAX_COUNT, MAX_CPUS, MAX_SSH_KEY,
    MAX_USER_DATA, STOP_TIMEOUT,
};

use super::input::read_file;
use super::output::{error_line, esc, exit_code, print_json, show, Table};
use super::remote::remote_image;
use super::terminal::{console, run_foreground};

/// The subcommands of `vmdepot instance`.
#[derive(Subcommand)]
pub enum InstanceCmd {
    /// Launch instances of an image (detached unless --foreground)
    ///
    /// Each instance gets a qcow2 overlay over the image (--disk), a NoCloud seed (hostname,
    /// SSH keys or user-data) and user-mode networking with SSH forwarded from a free host port.
    /// REMOTE:IMAGE (when REMOTE is a configured remote) pulls the image first unless a copy was
    /// pulled already.
    #[command(
        visible_alias = "launch",
        after_long_help = "Examples:
  vmdepot instance run debian-12 --name web --forward 8080:80
  vmdepot instance launch debian-12 --name node --count 3 --cpus 2 --memory 2G
  vmdepot instance run debian-12 --name ci --ssh-key ~/.ssh/id_ed25519.pub --foreground"
    )]
    Run(RunArgs),
    /// List this account's instances with their true states
    #[command(
        visible_alias = "ls",
        after_long_help = "Examples:
  vmdepot instance list
  vmdepot instance ls --json"
    )]
    List {
        /// Print a JSON array of instances instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one instance: state, pid, SSH port, files, disk, image
    #[command(after_long_help = "Examples:
  vmdepot instance show web
  vmdepot instance show ins-0123456789abcdef --json")]
    Show {
        /// The instance's id (ins-…) or name
        instance: String,
        /// Print a JSON object instead of one `field value` line each
        #[arg(long)]
        json: bool,
    },
    /// Stop instances: ACPI power button through QMP, then kill after --timeout
    ///
    /// Several instances are stopped in order, one line each; a failure is reported on stderr
    /// and the others are still stopped (the exit code is the first failure's). Stopping a
    /// stopped instance is no error.
    #[command(after_long_help = "Examples:
  vmdepot instance stop web
  vmdepot instance stop web db cache --timeout 20
  vmdepot instance stop --all --force")]
    Stop {
        /// The instances to stop (ids or names), in order
        #[arg(value_name = "INSTANCE", required_unless_present = "all")]
        instances: Vec<String>,
        /// Stop every instance of this account
        #[arg(long, conflicts_with = "instances")]
        all: bool,
        /// Kill QEMU at once instead of pressing the power button
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off before killing it
        #[arg(long, value_name = "SECONDS", default_value_t = STOP_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Start stopped instances (detached unless --foreground)
    ///
    /// Several instances are started in order, one line each; a failure is reported on stderr
    /// and the others are still started (the exit code is the first failure's).
    #[command(after_long_help = "Examples:
  vmdepot instance start web
  vmdepot instance start web db
  vmdepot instance start --all")]
    Start {
        /// The instances to start (ids or names), in order
        #[arg(value_name = "INSTANCE", required_unless_present = "all")]
        instances: Vec<String>,
        /// Start every instance of this account that is not running
        #[arg(long, conflicts_with_all = ["instances", "foreground"])]
        all: bool,
        /// Keep QEMU as a child, for systemd units (Type=notify); one instance only
        #[arg(long)]
        foreground: bool,
    },
    /// Stop instances and start them again
    ///
    /// Several instances are restarted in order, one line each; a failure is reported on stderr
    /// and the others are still restarted (the exit code is the first failure's). A stopped
    /// instance is started.
    #[command(after_long_help = "Examples:
  vmdepot instance restart web
  vmdepot instance restart web db --timeout 20
  vmdepot instance restart --all")]
    Restart {
        /// The instances to restart (ids or names), in order
        #[arg(value_name = "INSTANCE", required_unless_present = "all")]
        instances: Vec<String>,
        /// Restart every instance of this account
        #[arg(long, conflicts_with = "instances")]
        all: bool,
        /// Seconds to wait for the guest to power off before killing it
        #[arg(long, value_name = "SECONDS", default_value_t = STOP_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Delete instances: their disks, seeds, sockets and logs
    ///
    /// A running instance is refused unless --force (which kills it). Several instances are
    /// deleted in order, one line each; a failure is reported on stderr and the others are still
    /// deleted (the exit code is the first failure's).
    #[command(
        visible_alias = "rm",
        after_long_help = "Examples:
  vmdepot instance delete web
  vmdepot instance rm web db --force
  vmdepot instance delete --all --force"
    )]
    Delete {
        /// The instances to delete (ids or names), in order
        #[arg(value_name = "INSTANCE", required_unless_present = "all")]
        instances: Vec<String>,
        /// Delete every instance of this account (running ones only with --force)
        #[arg(long, conflicts_with = "instances")]
        all: bool,
        /// Kill running instances first instead of refusing them
        #[arg(long)]
        force: bool,
    },
    /// Print an instance's serial console log
    #[command(after_long_help = "Examples:
  vmdepot instance logs web
  vmdepot instance logs web -n 20
  vmdepot instance logs web -n 0 --follow")]
    Logs {
        /// The instance's id (ins-…) or name
        instance: String,
        /// Keep printing what the log gains while the instance runs (as `tail -f`)
        #[arg(long, short)]
        follow: bool,
        /// Print only the last N lines (with --follow: then what follows, as `tail -n N -f`)
        #[arg(long, short = 'n', value_name = "N")]
        lines: Option<u64>,
    },
    /// Attach to an instance's serial console (Ctrl-] to detach)
    #[command(after_long_help = "Examples:
  vmdepot instance console web")]
    Console {
        /// The instance's id (ins-…) or name; it must be running
        instance: String,
    },
    /// Wait until an instance's guest is reachable: its SSH port answers (or a serial line)
    ///
    /// Exits 0 once the forwarded SSH port answers with an SSH banner (the guest's sshd
    /// listens), or with --serial once a serial console line contains TEXT; 1 at the timeout
    /// or if QEMU exits first.
    #[command(after_long_help = "Examples:
  vmdepot instance wait web
  vmdepot instance wait web --timeout 600 && vmdepot instance exec web -- uptime
  vmdepot instance wait tiny --serial 'login:'")]
    Wait {
        /// The instance's id (ins-…) or name
        instance: String,
        /// Wait for the SSH banner on the forwarded port (the default)
        #[arg(long, conflicts_with = "serial")]
        ssh: bool,
        /// Wait for a serial console line containing TEXT instead
        #[arg(long, value_name = "TEXT")]
        serial: Option<String>,
        /// Give up after this many seconds
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        timeout: u64,
    },
    /// Log into an instance over SSH (as the user its image names), or run a command there
    ///
    /// Uses the instance's forwarded port, the account's own key (injected at launch) and
    /// yours, and the instance's host key learnt on first use (no prompt). COMMAND is run by
    /// the guest's shell, as ssh runs it. The exit status is ssh's (the command's).
    #[command(after_long_help = "Examples:
  vmdepot instance ssh web
  vmdepot instance ssh web -- 'journalctl -b | tail'
  vmdepot instance ssh web --user root")]
    Ssh {
        /// The instance's id (ins-…) or name; it must be running
        instance: String,
        /// Log in as USER [default: the image's ssh-user tag]
        #[arg(long, short = 'l', value_name = "USER")]
        user: Option<String>,
        /// What to run instead of a login shell
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Run a command in an instance over SSH, without a terminal; its exit status is passed through
    ///
    /// Each argument reaches the guest as one word (quoted for its shell), as `docker exec`
    /// runs them. Exit status: the command's, or 255 if SSH failed.
    #[command(after_long_help = "Examples:
  vmdepot instance exec web -- hostname
  vmdepot instance exec web -- sh -c 'systemctl is-active nginx'")]
    Exec {
        /// The instance's id (ins-…) or name; it must be running
        instance: String,
        /// Run it as USER [default: the image's ssh-user tag]
        #[arg(long, short = 'l', value_name = "USER")]
        user: Option<String>,
        /// The command and its arguments
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Print a systemd unit (Type=notify) that runs the instance
    #[command(after_long_help = "Examples:
  vmdepot instance unit web > /etc/systemd/system/vm-web.service
  systemctl daemon-reload && systemctl enable --now vm-web")]
    Unit {
        /// The instance's id (ins-…) or name
        instance: String,
    },
    /// Capture an instance as a backup image (tagged backup-of=ID)
    #[command(after_long_help = "Examples:
  vmdepot instance backup web
  vmdepot instance backup web --name web-nightly --keep 7")]
    Backup {
        /// The instance's id (ins-…) or name
        instance: String,
        /// The backup image's name [default: INSTANCE-backup-TIME-XXXX]
        #[arg(long)]
        name: Option<String>,
        /// Keep only the N newest backups of this instance (older ones are deleted)
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Print the backup and the pruned images as a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Make an instance's disk an image's content again (restarts it if running)
    #[command(after_long_help = "Examples:
  vmdepot instance restore web --from web-v2
  vmdepot instance restore web --from img-0123456789abcdef")]
    Restore {
        /// The instance's id (ins-…) or name
        instance: String,
        /// The image (id or name) whose content the disk becomes
        #[arg(long = "from", value_name = "IMAGE")]
        from: String,
    },
}

/// The flags of `vmdepot instance run`.
#[derive(Args)]
pub struct RunArgs {
    /// An image's id or name, or REMOTE:IMAGE (run lazily from the remote unless this depot has it)
    image: String,
    /// The instance's name (with --count N: NAME-1 … NAME-N) [default: IMAGE-XXXX, XXXX random]
    #[arg(long)]
    name: Option<String>,
    /// How many instances to launch in one call (1 to 1000)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_COUNT)))]
    count: u32,
    /// Virtual CPUs per instance (1 to 255)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CPUS)))]
    cpus: u32,
    /// Guest memory, e.g. 512M or 2G (at least 16M)
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    memory: u64,
    /// The instance's disk: lazy, overlay or copy
    ///
    /// lazy: a qcow2 overlay whose backing is read from the chunk store as the guest needs it (no
    /// base file); overlay: a qcow2 overlay over a raw base file of the image, made on first use;
    /// copy: a private raw copy of the image.
    #[arg(long, value_name = "MODE", default_value = "lazy", value_parser = DiskMode::parse)]
    disk: DiskMode,
    /// Acceleration: auto (KVM if it works here, else TCG), kvm or tcg
    #[arg(long, value_name = "ACCEL", default_value = "auto", value_parser = Accel::parse)]
    accel: Accel,
    /// Firmware: auto (BIOS if the image's firmware tag lists it or there is none, else
    /// UEFI), bios (SeaBIOS) or uefi (OVMF, from Debian's ovmf package)
    #[arg(long, value_name = "FW", default_value = "auto", value_parser = Firmware::parse)]
    firmware: Firmware,
    /// The guest's hostname (NoCloud local-hostname) [default: the instance name]
    #[arg(long)]
    hostname: Option<String>,
    /// A public key file to authorise in the generated user-data (repeatable)
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<PathBuf>,
    /// A cloud-init user-data file (replaces the generated one)
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// Forward a host TCP port to the guest: [ADDR:]HOST:GUEST (repeatable)
    #[arg(long = "forward", value_name = "HOST:GUEST", value_parser = Forward::parse)]
    forwards: Vec<Forward>,
    /// Keep QEMU as a child: exit with the guest; SIGTERM powers it off
    #[arg(long)]
    foreground: bool,
    /// With REMOTE:IMAGE, fetch the rest of the image in the background
    ///
    /// A lazy disk of a remote image fetches only the chunks the guest reads; with --prefetch its
    /// disk server also fetches the rest, and the image becomes a complete local one.
    #[arg(long)]
    prefetch: bool,
    /// Print the launched instances as a JSON array
    #[arg(long)]
    json: bool,
}

impl InstanceCmd {
    /// Whether the command only looks (see `Cmd::looks_only`).
    pub fn looks_only(&self) -> bool {
        matches!(
            self,
            InstanceCmd::List { .. }
                | InstanceCmd::Show { .. }
                | InstanceCmd::Logs { .. }
                | InstanceCmd::Console { .. }
                | InstanceCmd::Unit { .. }
                | InstanceCmd::Wait { .. }
                | InstanceCmd::Ssh { .. }
                | InstanceCmd::Exec { .. }
        )
    }
}

/// Runs one `instance` subcommand on `depot`; the exit code is QEMU's for
/// a foreground run or start. (stdout is locked only by the commands that
/// print: the console's output thread writes to it.)
pub fn run(depot: &Depot, cmd: InstanceCmd, progress: &dyn Progress) -> anyhow::Result<i32> {
    let out = || std::io::stdout().lock();
    match cmd {
        InstanceCmd::Run(a) => return launch(depot, a, progress),
        InstanceCmd::Start {
            instances,
            foreground: true,
            ..
        } => {
            let [instance] = &instances[..] else {
                anyhow::bail!(vmdepot::Error::Usage(
                    "--foreground starts one instance: name only one".into()
                ));
            };
            return run_foreground(|| depot.start_foreground(instance));
        }
        InstanceCmd::Start { instances, all, .. } => {
            let targets = targets(depot, instances, all, |i| !is_up(i))?;
            return each(&targets, &mut out(), |name| {
                let (i, notice) = depot.start_instance(name)?;
                Ok((started_line(&i), notice))
            });
        }
        InstanceCmd::Stop {
            instances,
            all,
            force,
            timeout,
        } => {
            let targets = targets(depot, instances, all, |_| true)?;
            return each(&targets, &mut out(), |name| {
                let i = depot.stop_instance(name, force, Duration::from_secs(timeout))?;
                Ok((state_line(&i), None))
            });
        }
        InstanceCmd::Restart {
            instances,
            all,
            timeout,
        } => {
            let targets = targets(depot, instances, all, |_| true)?;
            return each(&targets, &mut out(), |name| {
                let (i, notice) = depot.restart_instance(name, Duration::from_secs(timeout))?;
                Ok((state_line(&i), notice))
            });
        }
        InstanceCmd::Delete {
            instances,
            all,
            force,
        } => {
            let targets = targets(depot, instances, all, |_| true)?;
            return each(&targets, &mut out(), |name| {
                let i = depot.delete_instance(name, force)?;
                Ok((format!("deleted {} ({})", esc(&i.name), i.id), None))
            });
        }
        InstanceCmd::Console { instance } => attach(depot, &instance)?,
        InstanceCmd::List { json } => list(depot, json, &mut out())?,
        InstanceCmd::Show { instance, json } => {
            show(&mut out(), &depot.instance(&instance)?, json)?
        }
        InstanceCmd::Logs {
            instance,
            follow,
            lines,
        } => logs(depot, &instance, follow, lines, &mut out())?,
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
        InstanceCmd::Wait {
            instance,
            serial,
            timeout,
            ..
        } => {
            let timeout = Duration::from_secs(timeout);
            let i = match serial {
                Some(text) => {
                    let i = depot.instance(&instance)?;
                    if !i.state.is_up() {
                        anyhow::bail!(vmdepot::Error::Conflict(format!(
                            "instance {} ({}) is {}: start it first (`vmdepot instance start {}`)",
                            esc(&i.name),
                            i.id,
                            i.state,
                            esc(&i.name)
                        )));
                    }
                    let line = depot
                        .instance_handle(&i.id)?
                        .wait_for_serial(&text, timeout)?;
                    writeln!(out(), "{line}")?;
                    i
                }
                None => depot.wait_for_ssh(&instance, timeout)?,
            };
            eprintln!("{} ({}) is ready", esc(&i.name), i.id);
        }
        InstanceCmd::Ssh {
            instance,
            user,
            command,
        } => return ssh(depot.ssh_command(&instance, user.as_deref(), false, &command)?),
        InstanceCmd::Exec {
            instance,
            user,
            command,
        } => {
            let words = vmdepot::shell_quote(&command);
            return ssh(depot.ssh_command(&instance, user.as_deref(), true, &words)?);
        }
    }
    Ok(0)
}

/// Runs ssh in place of this process (its terminal, its exit status).
fn ssh(mut cmd: std::process::Command) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let e = cmd.exec();
    anyhow::bail!(vmdepot::Error::Tool {
        tool: "ssh".into(),
        detail: format!(
            "{e}: install the Debian package openssh-client (apt-get install openssh-client)"
        ),
    })
}

/// The instances a stop, start, restart or delete acts on: those named,
/// or with `all` the ids of this account's instances (oldest first) that
/// `wanted` picks.
fn targets(
    depot: &Depot,
    named: Vec<String>,
    all: bool,
    wanted: impl Fn(&InstanceInfo) -> bool,
) -> anyhow::Result<Vec<String>> {
    if !all {
        return Ok(named);
    }
    let list = depot.list_instances()?;
    Ok(list.into_iter().filter(wanted).map(|i| i.id).collect())
}

/// Acts on each instance in order: `act`'s line on stdout for each that
/// succeeded, one error line on stderr for each that failed (and its notice,
/// such as why TCG, once). Returns the first failure's exit code, 0 if none
/// failed. Only a failing stdout ends it early.
fn each(
    instances: &[String],
    out: &mut impl Write,
    mut act: impl FnMut(&str) -> anyhow::Result<(String, Option<String>)>,
) -> anyhow::Result<i32> {
    let mut code = 0;
    let mut notices = Vec::new();
    for name in instances {
        match act(name) {
            Ok((line, notice)) => {
                if let Some(n) = notice.filter(|n| !notices.contains(n)) {
                    print_notice(Some(&n));
                    notices.push(n);
                }
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Err(e) => {
                eprintln!("{}", error_line(&e));
                if code == 0 {
                    code = exit_code(&e);
                }
            }
        }
    }
    Ok(code)
}

/// `instance list`.
fn list(depot: &Depot, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let list = depot.list_instances()?;
    if json {
        return print_json(out, &list);
    }
    print_instance_table(out, &list)
}

/// A started instance: `NAME (ID) STATE  ssh -p PORT …`.
fn started_line(i: &InstanceInfo) -> String {
    format!("{} ({}) {}  {}", esc(&i.name), i.id, i.state, ssh_hint(i))
        .trim_end()
        .to_owned()
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
        anyhow::bail!(vmdepot::Error::Usage(
            "--foreground runs one instance: drop --count or --foreground".into()
        ));
    }
    let (foreground, json, prefetch) = (a.foreground, a.json, a.prefetch);
    let mut opts = a.into_options()?;
    if depot.remote_reference(&opts.image).is_some() {
        opts.image = from_remote(depot, &opts.image, opts.disk, prefetch, progress)?;
    } else if prefetch {
        anyhow::bail!(vmdepot::Error::Usage(
            "--prefetch is for REMOTE:IMAGE: a local image has nothing to fetch".into()
        ));
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

/// The id of the local image that runs `REMOTE:IMAGE` (which the account
/// must be allowed to launch): the original it was pushed from or one
/// pulled before; else, for a lazy disk, a partial image (made now unless
/// an earlier run made it; `prefetch` asks its disk server for the rest);
/// else one pulled now.
fn from_remote(
    depot: &Depot,
    reference: &str,
    disk: vmdepot::DiskMode,
    prefetch: bool,
    progress: &dyn Progress,
) -> anyhow::Result<String> {
    let (remote, img) = remote_image(depot, reference, Op::Launch)?;
    if let Some(local) = depot.local_copy(&remote, &img)? {
        return Ok(local.id);
    }
    if disk != vmdepot::DiskMode::Lazy {
        return Ok(depot.pull_image(&remote, &img, None, progress)?.image.id);
    }
    let partial = match depot.partial_copy(&remote, &img)? {
        Some(p) => p,
        None => depot.begin_partial(&remote, &img)?,
    };
    if prefetch {
        depot.prefetch(&partial.id)?;
    }
    Ok(partial.id)
}

impl RunArgs {
    /// The library's options; `--ssh-key` and `--user-data` files are read
    /// here. `--foreground` launches without starting (the CLI starts it).
    fn into_options(self) -> anyhow::Result<LaunchOptions> {
        let mut opts = LaunchOptions::new(self.image);
        opts.name = self.name;
        opts.count = self.count;
        opts.cpus = self.cpus;
        opts.memory_mib = self.memory;
        opts.disk = self.disk;
        opts.accel = self.accel;
        opts.firmware = self.firmware;
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
        opts.forwards = self.forwards;
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
    if console_attached(&i.qmp_socket) {
        anyhow::bail!(vmdepot::Error::ConsoleBusy {
            instance: format!("{} ({})", i.name, i.id)
        });
    }
    console(&i)
}

/// `instance logs`: the serial log (its last `lines` lines); with
/// `follow`, then what it gains until the instance stops.
fn logs(
    depot: &Depot,
    instance: &str,
    follow: bool,
    lines: Option<u64>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let i = depot.instance(instance)?;
    let mut pos = match lines {
        Some(n) => tail_start(&i.serial_log, n)?,
        None => 0,
    };
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

/// Where the last `n` lines of the file begin, as `tail -n` counts them (a
/// last line without its newline is a line): 0 if it has no more than `n`
/// lines or does not exist.
fn tail_start(path: &Path, n: u64) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    let len = f.metadata()?.len();
    if n == 0 {
        return Ok(len);
    }
    // Newlines from the end, the last byte's own not counted: the n-th
    // ends the line before the last n.
    let mut left = n;
    let mut buf = vec![0u8; 64 << 10];
    let mut end = len.saturating_sub(1);
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let block = &mut buf[..(end - start) as usize];
        f.read_exact_at(block, start)?;
        for (k, _) in block.iter().enumerate().rev().filter(|(_, b)| **b == b'\n') {
            left -= 1;
            if left == 0 {
                return Ok(start + k as u64 + 1);
            }
        }
        end = start;
    }
    Ok(0)
}

/// Whether QEMU runs for the instance (running or paused).
fn is_up(i: &InstanceInfo) -> bool {
    i.state.is_up()
}

/// A notice of the library for the user (e.g. why TCG), on stderr.
fn print_notice(notice: Option<&str>) {
    if let Some(n) = notice {
        eprintln!("vmdepot: {}", esc(n));
    }
}

/// `NAME (ID) STATE`.
fn state_line(i: &InstanceInfo) -> String {
    format!("{} ({}) {}", esc(&i.name), i.id, i.state)
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
    let mut t = Table::new(&["ID", "NAME", "IMAGE", "STATE", "ACCEL", ">PID", ">SSH"]);
    let or_dash = |n: Option<String>| n.unwrap_or_else(|| "-".into());
    for i in list {
        t.row(vec![
            i.id.clone(),
            esc(&i.name).into_owned(),
            esc(&i.image_name).into_owned(),
            i.state.to_string(),
            i.accel.as_str().to_owned(),
            or_dash(i.pid.map(|p| p.to_string())),
            or_dash(i.ssh_port.map(|p| p.to_string())),
        ]);
    }
    t.print(out)
}

fn ssh_hint(i: &InstanceInfo) -> String {
    match i.ssh_port {
        // A tag that is no user name is not printed as one.
        Some(p) => match i.ssh_user.as_deref().filter(|u| check_account(u).is_ok()) {
            Some(u) => format!("ssh -p {p} {u}@127.0.0.1"),
            None => format!("ssh -p {p} 127.0.0.1"),
        },
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
