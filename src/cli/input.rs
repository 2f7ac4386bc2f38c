//! Small text inputs named on the command line (an SSH key, user-data):
//! [`read_file`] reads a regular file or a pipe up to a size limit, and
//! refuses anything else ([`vmdepot::Error::Refused`], exit code 4) rather
//! than block on a FIFO without a writer or read a device without end.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// How long a pipe's writer has to finish.
const PIPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pipe could not be read to its end.
#[derive(Debug, thiserror::Error)]
enum PipeError {
    #[error("a pipe whose writer did not finish within 10 s")]
    Timeout,
    #[error("{0}")]
    Poll(#[from] nix::Error),
    #[error("{0}")]
    Read(#[from] std::io::Error),
}

/// Reads a small text input (user-data, an SSH key) of at most `cap`
/// bytes: a regular file or a pipe; never blocks on a FIFO without a
/// writer, never reads a device without end.
pub fn read_file(p: &Path, cap: usize) -> anyhow::Result<String> {
    let refuse = |reason: String| -> anyhow::Error {
        vmdepot::Error::Refused {
            file: p.to_owned(),
            reason,
        }
        .into()
    };
    let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", p.display());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => refuse("a socket, not a regular file or a pipe".into()),
            _ => at(&e),
        })?;
    let ft = f.metadata().map_err(|e| at(&e))?.file_type();
    if !(ft.is_file() || ft.is_fifo()) {
        return Err(refuse("not a regular file or a pipe".into()));
    }
    let mut buf = Vec::new();
    if ft.is_fifo() {
        // A pipe: read until its writer closes it, for at most 10 s.
        read_pipe(&f, cap, &mut buf).map_err(|e| refuse(e.to_string()))?;
    } else {
        let blocking = nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty());
        nix::fcntl::fcntl(&f, blocking).map_err(|e| at(&e))?;
        f.take(cap as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| at(&e))?;
    }
    if buf.len() > cap {
        return Err(refuse(format!("larger than the limit of {cap} bytes")));
    }
    String::from_utf8(buf).map_err(|_| refuse("not UTF-8 text".into()))
}

/// Reads a non-blocking pipe to its end, at most `cap + 1` bytes, within
/// 10 s.
fn read_pipe(f: &File, cap: usize, buf: &mut Vec<u8>) -> Result<(), PipeError> {
    let deadline = Instant::now() + PIPE_TIMEOUT;
    let mut chunk = [0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PipeError::Timeout);
        }
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(10_000) as i32).unwrap_or(PollTimeout::MAX);
        poll(&mut fds, ms)?;
        match (&*f).read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > cap {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}
