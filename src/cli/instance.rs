//! `vmdepot instance …`: the CLI side of instances (argument parsing,
//! printing, signals, the interactive console). The work is the library's
//! (`vmdepot::launch::instance`).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use crate::esc;
use vmdepot::launch::instance::{press_power_button, STOP_TIMEOUT};
use vmdepot::{Accel, Depot, DiskMode, Forward, InstanceInfo, LaunchOptions, Progress};

#[derive(Subcommand)]
pub enum InstanceCmd {
    /// Launch instances of an image (detached unless --foreground)
    Run {
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
        /// overlay (qcow2 over a shared base) or copy (private raw disk)
        #[arg(long, default_value = "overlay")]
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
    },
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

/// Reads a small text input (user-data, an SSH key) of at most `cap`
/// bytes: a regular file or a pipe; never blocks on a FIFO without a
/// writer, never reads a device without end.
fn read_file(p: &PathBuf, cap: usize) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let refuse = |why: String| -> anyhow::Error {
        vmdepot::Error::Refused {
            file: p.clone(),
            reason: why,
        }
        .into()
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => refuse("a socket, not a regular file or a pipe".into()),
            _ => anyhow::anyhow!("{}: {e}", p.display()),
        })?;
    let ft = f
        .metadata()
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        .file_type();
    if !(ft.is_file() || ft.is_fifo()) {
        return Err(refuse("not a regular file or a pipe".into()));
    }
    let mut buf = Vec::new();
    if ft.is_fifo() {
        // A pipe: read until its writer closes it, for at most 10 s.
        read_pipe(&f, cap, &mut buf).map_err(refuse)?;
    } else {
        nix::fcntl::fcntl(
            &f,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        f.take(cap as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    if buf.len() > cap {
        return Err(refuse(format!("larger than the limit of {cap} bytes")));
    }
    String::from_utf8(buf).map_err(|_| refuse("not UTF-8 text".into()))
}

/// Reads a non-blocking pipe to its end, at most `cap + 1` bytes, within
/// 10 s.
fn read_pipe(f: &std::fs::File, cap: usize, buf: &mut Vec<u8>) -> Result<(), String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err("a pipe whose writer did not finish within 10 s".into());
        }
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(10_000) as i32).unwrap_or(PollTimeout::MAX);
        poll(&mut fds, ms).map_err(|e| e.to_string())?;
        match (&*f).read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > cap {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

pub fn run(depot: &Depot, cmd: InstanceCmd, progress: &dyn Progress) -> anyhow::Result<i32> {
    let mut out = std::io::stdout().lock();
    match cmd {
        InstanceCmd::Run {
            image,
            name,
            count,
            cpus,
            memory,
            disk,
            accel,
            hostname,
            ssh_keys,
            user_data,
            forwards,
            foreground,
            json,
        } => {
            if foreground && count != 1 {
                anyhow::bail!("--foreground runs one instance: drop --count or --foreground");
            }
            let mut opts = LaunchOptions::new(image);
            opts.name = name;
            opts.count = count;
            opts.cpus = cpus;
            opts.memory_mib = vmdepot::launch::qemu::parse_memory(&memory)?;
            opts.disk = DiskMode::parse(&disk)?;
            opts.accel = Accel::parse(&accel)?;
            opts.hostname = hostname;
            opts.ssh_keys = ssh_keys
                .iter()
                .map(|p| read_file(p, vmdepot::launch::seed::MAX_SSH_KEY))
                .collect::<Result<_, _>>()?;
            opts.user_data = user_data
                .as_ref()
                .map(|p| read_file(p, vmdepot::launch::seed::MAX_USER_DATA))
                .transpose()?;
            opts.forwards = forwards
                .iter()
                .map(|f| Forward::parse(f))
                .collect::<Result<_, _>>()?;
            opts.no_start = foreground;
            let launched = depot.launch(&opts, progress)?;
            // (in the foreground the start says it again)
            if let Some(n) = launched.notice.as_ref().filter(|_| !foreground) {
                eprintln!("vmdepot: {}", esc(n));
            }
            if foreground {
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
            let infos: Vec<&InstanceInfo> = launched.instances.iter().map(|i| i.info()).collect();
            if json {
                crate::print_json(&infos)?;
            } else {
                for i in infos {
                    writeln!(out, "{}  {}  {}", i.id, esc(&i.name), ssh_hint(i))?;
                }
            }
        }
        InstanceCmd::List { json } => {
            let list = depot.list_instances()?;
            if json {
                crate::print_json(&list)?;
            } else {
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
            }
        }
        InstanceCmd::Show { instance, json } => {
            let i = depot.instance(&instance)?;
            if json {
                crate::print_json(&i)?;
            } else {
                crate::print_fields(&mut out, &i)?;
            }
        }
        InstanceCmd::Stop {
            instance,
            force,
            timeout,
        } => {
            let i = depot.stop_instance(&instance, force, Duration::from_secs(timeout))?;
            writeln!(out, "{} ({}) {}", esc(&i.name), i.id, i.state)?;
        }
        InstanceCmd::Start {
            instance,
            foreground,
        } => {
            if foreground {
                return run_foreground(|| depot.start_foreground(&instance));
            }
            let (i, notice) = depot.start_instance(&instance)?;
            if let Some(n) = notice {
                eprintln!("vmdepot: {}", esc(&n));
            }
            writeln!(
                out,
                "{} ({}) {}  {}",
                esc(&i.name),
                i.id,
                i.state,
                ssh_hint(&i)
            )?;
        }
        InstanceCmd::Restart { instance, timeout } => {
            let (i, notice) = depot.restart_instance(&instance, Duration::from_secs(timeout))?;
            if let Some(n) = notice {
                eprintln!("vmdepot: {}", esc(&n));
            }
            writeln!(out, "{} ({}) {}", esc(&i.name), i.id, i.state)?;
        }
        InstanceCmd::Delete { instance, force } => {
            let i = depot.delete_instance(&instance, force)?;
            writeln!(out, "deleted {} ({})", esc(&i.name), i.id)?;
        }
        InstanceCmd::Logs { instance, follow } => {
            let i = depot.instance(&instance)?;
            let mut pos = 0u64;
            loop {
                pos += copy_from(&i.serial_log, pos, &mut out)?;
                out.flush()?;
                if !follow {
                    break;
                }
                if !matches!(depot.instance(&i.id)?.state.as_str(), "running" | "paused") {
                    copy_from(&i.serial_log, pos, &mut out)?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        InstanceCmd::Console { instance } => {
            let i = depot.instance(&instance)?;
            if !matches!(i.state.as_str(), "running" | "paused") {
                anyhow::bail!(
                    "instance {} ({}) is {}: start it first",
                    i.name,
                    i.id,
                    i.state
                );
            }
            drop(out); // the console's output thread writes to stdout
            console(&i)?;
            return Ok(0);
        }
        InstanceCmd::Backup {
            instance,
            name,
            keep,
            json,
        } => {
            let (info, pruned) = depot.backup_instance(&instance, name, keep, progress)?;
            if json {
                crate::print_json(&serde_json::json!({ "backup": info, "pruned": pruned }))?;
            } else {
                writeln!(out, "{}  {}", info.id, esc(&info.name))?;
                for p in pruned {
                    writeln!(out, "pruned {}", esc(&p))?;
                }
            }
        }
        InstanceCmd::Restore { instance, from } => {
            let (i, notice) = depot.restore_instance(&instance, &from, progress)?;
            if let Some(n) = notice {
                eprintln!("vmdepot: {}", esc(&n));
            }
            writeln!(
                out,
                "{} ({}) restored from {} ({}); {}",
                esc(&i.name),
                i.id,
                esc(&i.image_name),
                i.image,
                i.state
            )?;
        }
        InstanceCmd::Unit { instance } => {
            write!(out, "{}", depot.instance_unit(&instance)?)?;
        }
    }
    Ok(0)
}

fn ssh_hint(i: &InstanceInfo) -> String {
    match i.ssh_port {
        Some(p) => format!("ssh -p {p} <user>@127.0.0.1"),
        None => String::new(),
    }
}

/// Appends the file's bytes from `pos` to `out`; returns how many.
fn copy_from(path: &PathBuf, pos: u64, out: &mut impl Write) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    f.seek(std::io::SeekFrom::Start(pos))?;
    Ok(std::io::copy(&mut f, out)?)
}

/// Waits for a QEMU started as our child: READY=1 to systemd (QEMU is up); SIGTERM/SIGINT/SIGHUP press the power button, and QEMU is killed
/// if it still runs STOP_TIMEOUT later. Exits with QEMU's code.
fn run_foreground(
    start: impl FnOnce() -> vmdepot::Result<(vmdepot::Foreground, Option<String>)>,
) -> anyhow::Result<i32> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    // Registered before QEMU starts: a SIGTERM meanwhile waits in `signals`
    // and powers the guest off as soon as it runs (QEMU is never orphaned).
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (fg, notice) = start()?;
    if let Some(n) = notice {
        eprintln!("vmdepot: {}", esc(&n));
    }
    let qmp = fg.qmp_socket().to_owned();
    let pid = fg.pid() as i32;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!("signal {sig}: pressing the power button");
            if press_power_button(&qmp).is_err() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            std::thread::sleep(STOP_TIMEOUT);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    // QEMU runs now: a failing notification must not orphan it.
    if let Err(e) = vmdepot::launch::qemu::sd_notify_ready() {
        eprintln!("vmdepot: could not notify systemd: {e}");
    }
    eprintln!("vmdepot: instance {} running (QEMU pid {pid})", fg.id());
    Ok(fg.wait()?)
}

/// Bridges the terminal and the serial console socket.
fn console(i: &InstanceInfo) -> anyhow::Result<()> {
    use nix::sys::termios;
    let sock = std::os::unix::net::UnixStream::connect(&i.console_socket)
        .map_err(|e| anyhow::anyhow!("{}: {e}", i.console_socket.display()))?;
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        let t = termios::tcgetattr(&stdin)?;
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw)?;
        Some(t)
    } else {
        None
    };
    eprint!(
        "Connected to the serial console of {} ({}); Ctrl-] detaches.\r\n",
        esc(&i.name),
        i.id
    );
    let mut rd = sock.try_clone()?;
    let output = std::thread::spawn(move || {
        let mut o = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf) {
            if n == 0 || o.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = o.flush();
        }
    });
    let mut wr = sock;
    let mut buf = [0u8; 1024];
    let mut input = stdin.lock();
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(k) = buf[..n].iter().position(|&b| b == 0x1d) {
            wr.write_all(&buf[..k])?;
            break;
        }
        wr.write_all(&buf[..n])?;
    }
    // Let the output side finish what QEMU already sent, then stop it.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = wr.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    if let Some(t) = saved {
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &t)?;
    }
    eprintln!();
    Ok(())
}
