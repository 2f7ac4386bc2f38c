//! The CLI's terminal side of instances: [`run_foreground`] keeps QEMU as
//! a child (for `--foreground` and systemd units), turning signals into an
//! ACPI power-off; [`console`] bridges the terminal, in raw mode, and an
//! instance's serial console socket until Ctrl-].

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{self, Termios};
use nix::unistd::Pid;
use vmdepot::{press_power_button, InstanceInfo, STOP_TIMEOUT};

use super::output::esc;

/// The byte Ctrl-] sends: it detaches from the console.
const DETACH: u8 = 0x1d;

/// Waits for a QEMU started as our child: READY=1 to systemd (QEMU is
/// up); SIGTERM/SIGINT/SIGHUP press the power button, and QEMU is killed
/// if it still runs STOP_TIMEOUT later (said on stderr, exit code 1).
/// Exits with QEMU's code.
pub fn run_foreground(
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
    let killed = Arc::new(AtomicBool::new(false));
    let killing = Arc::clone(&killed);
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let pid = Pid::from_raw(pid);
            tracing::info!("signal {sig}: pressing the power button");
            if press_power_button(&qmp).is_err() {
                let _ = kill(pid, Signal::SIGTERM);
            }
            std::thread::sleep(STOP_TIMEOUT);
            // (QEMU is our child, not reaped before `wait` returns: the
            // pid is still QEMU's.)
            killing.store(true, Ordering::SeqCst);
            let _ = kill(pid, Signal::SIGKILL);
        }
    });
    // QEMU runs now: a failing notification must not orphan it.
    if let Err(e) = vmdepot::sd_notify_ready() {
        eprintln!("vmdepot: could not notify systemd: {e}");
    }
    let id = fg.id().to_owned();
    eprintln!("vmdepot: instance {id} running (QEMU pid {pid})");
    let code = fg.wait()?;
    if killed.load(Ordering::SeqCst) {
        eprintln!(
            "vmdepot: instance {id} ignored the power button for {} s and was killed (it is \
             stopped): a guest still booting may not listen to it yet",
            STOP_TIMEOUT.as_secs()
        );
        return Ok(code.max(1));
    }
    Ok(code)
}

/// Bridges the terminal and the serial console socket.
pub fn console(i: &InstanceInfo) -> anyhow::Result<()> {
    let sock = UnixStream::connect(&i.console_socket)
        .map_err(|e| anyhow::anyhow!("{}: {e}", i.console_socket.display()))?;
    let stdin = std::io::stdin();
    let saved = raw_mode(&stdin)?;
    eprint!(
        "Connected to the serial console of {} ({}); Ctrl-] detaches.\r\n",
        esc(&i.name),
        i.id
    );
    let output = copy_to_stdout(sock.try_clone()?);
    let mut wr = sock;
    forward_input(&mut stdin.lock(), &mut wr)?;
    // Let the output side finish what QEMU already sent, then stop it.
    std::thread::sleep(Duration::from_millis(100));
    let _ = wr.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    if let Some(t) = saved {
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &t)?;
    }
    eprintln!();
    Ok(())
}

/// Puts a terminal stdin in raw mode; returns its settings to restore
/// (None if stdin is no terminal).
fn raw_mode(stdin: &std::io::Stdin) -> anyhow::Result<Option<Termios>> {
    if !stdin.is_terminal() {
        return Ok(None);
    }
    let t = termios::tcgetattr(stdin)?;
    let mut raw = t.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(stdin, termios::SetArg::TCSANOW, &raw)?;
    Ok(Some(t))
}

/// A thread copying the console's output to stdout until the socket
/// closes.
fn copy_to_stdout(mut rd: UnixStream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut o = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf) {
            if n == 0 || o.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = o.flush();
        }
    })
}

/// Sends the input to the console until its end or Ctrl-] (not sent).
fn forward_input(input: &mut impl Read, wr: &mut impl Write) -> anyhow::Result<()> {
    let mut buf = [0u8; 1024];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if let Some(k) = buf[..n].iter().position(|&b| b == DETACH) {
            wr.write_all(&buf[..k])?;
            return Ok(());
        }
        wr.write_all(&buf[..n])?;
    }
}
