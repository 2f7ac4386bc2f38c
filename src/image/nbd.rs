//! A read-only NBD client over a Unix socket, and the `qemu-nbd` server it
//! reads: how import reads a foreign image (qcow2, vmdk, vhd, vhdx, vdi) as
//! a raw disk, block by block, without a temporary raw copy of it.
//!
//! Main items: [`Served`] (a `qemu-nbd --read-only` child serving one image
//! on a private socket, killed on drop) and [`Client`] (a small pool of
//! connections; [`Client::read_at`] is safe to call from many threads).
//!
//! Only the "fixed newstyle" handshake with `NBD_OPT_EXPORT_NAME` and
//! simple replies to `NBD_CMD_READ` are spoken: all that reading a disk
//! needs. The protocol constants are those of the NBD protocol document
//! (`doc/proto.md` of the NBD project) and must not be edited.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use tracing::instrument;

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, also the prefix of every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_DISC: u16 = 2;
/// Largest read sent in one request (qemu-nbd accepts up to 32 MiB).
const MAX_READ: usize = 4 << 20;
/// A server that does not answer within this long is taken as dead: an
/// import fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A pool of connections to one NBD export.
pub struct Client {
    socket: PathBuf,
    export: String,
    size: u64,
    idle: Mutex<Vec<UnixStream>>,
}

impl Client {
    /// Connects once (learning the export's size); more connections are
    /// opened as concurrent readers need them.
    pub fn connect(socket: &Path) -> std::io::Result<Client> {
        Client::connect_to(socket, "")
    }

    /// Connects to the export named `export`.
    pub fn connect_to(socket: &Path, export: &str) -> std::io::Result<Client> {
        let (conn, size) = handshake(socket, export)?;
        Ok(Client {
            socket: socket.to_owned(),
            export: export.to_owned(),
            size,
            idle: Mutex::new(vec![conn]),
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `off`, or fewer only at the end of the
    /// export; returns how many.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let want = (buf.len() as u64).min(self.size.saturating_sub(off)) as usize;
        if want == 0 {
            return Ok(0);
        }
        let taken = self.idle.lock().unwrap().pop();
        let mut conn = match taken {
            Some(c) => c,
            None => handshake(&self.socket, &self.export)?.0,
        };
        let mut done = 0;
        while done < want {
            let n = (want - done).min(MAX_READ);
            read_request(&mut conn, &mut buf[done..done + n], off + done as u64)?;
            done += n;
        }
        self.idle.lock().unwrap().push(conn);
        Ok(want)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for mut c in self.idle.lock().unwrap().drain(..) {
            let _ = c.write_all(&request(CMD_DISC, 0, 0, 0));
        }
    }
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn protocol(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("NBD server: {what}"),
    )
}

fn handshake(socket: &Path, export: &str) -> std::io::Result<(UnixStream, u64)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if be_u64(&hello) != NBDMAGIC || be_u64(&hello[8..]) != IHAVEOPT {
        return Err(protocol("not a newstyle NBD server"));
    }
    let hflags = u16::from_be_bytes([hello[16], hello[17]]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("no fixed newstyle negotiation"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { 2 } else { 0 };
    let mut opt = Vec::with_capacity(20);
    opt.extend_from_slice(&cflags.to_be_bytes());
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt)?;
    let mut info = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { 134 };
    s.read_exact(&mut info[..n])?;
    Ok((s, be_u64(&info)))
}

pub(crate) fn request(kind: u16, handle: u64, off: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r[16..24].copy_from_slice(&off.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

fn read_request(s: &mut UnixStream, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    s.write_all(&request(CMD_READ, off, off, buf.len() as u32))?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)?;
    if u32::from_be_bytes(reply[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
        return Err(protocol("bad reply magic"));
    }
    let err = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    if be_u64(&reply[8..]) != off {
        return Err(protocol("reply to another request"));
    }
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err as i32));
    }
    s.read_exact(buf)
}

/// A `qemu-nbd` serving one image read-only on a Unix socket of its own;
/// killed (and its socket removed) on drop. It also exits by itself once
/// its last client disconnects, so a killed vmdepot leaves no server
/// behind.
pub struct Served {
    child: Child,
    dir: tempfile::TempDir,
    /// The client, connected before `serve` returns.
    pub client: Client,
}

impl Served {
    /// Starts `qemu-nbd` on `spec` (a `json:` block-device description that
    /// fixes every driver), in a private temporary directory under `tmp`
    /// (or the system's temp dir when that path would be too long for a
    /// socket).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn serve(spec: &str, tmp: &Path, what: &Path) -> Result<Served> {
        let dir = socket_dir(tmp)?;
        let socket = dir.path().join("s");
        let mut child = Command::new("qemu-nbd")
            .arg("--read-only")
            .arg("--shared=16")
            .arg("--cache=writeback")
            .arg(format!("--socket={}", socket.display()))
            .arg(spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Tool {
                tool: "qemu-nbd".into(),
                detail: format!("{e}: install the Debian package qemu-utils"),
            })?;
        let client = wait_for_server(&mut child, &socket, what)?;
        Ok(Served { child, dir, client })
    }
}

/// A private temporary directory for the server's socket, under `tmp` (or
/// the system's temp dir when that path would be too long for a socket).
fn socket_dir(tmp: &Path) -> Result<tempfile::TempDir> {
    // sun_path holds 108 bytes.
    let base = if tmp.as_os_str().len() < 80 {
        tmp.to_owned()
    } else {
        std::env::temp_dir()
    };
    std::fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
    tempfile::Builder::new()
        .prefix("nbd-")
        .tempdir_in(&base)
        .map_err(|e| Error::io(&base, e))
}

/// Connects to the `qemu-nbd` `child` once it listens on `socket` (30 s at
/// most); a server that exits first could not open `what`.
fn wait_for_server(child: &mut Child, socket: &Path, what: &Path) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().map_err(|e| Error::io(what, e))? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let first = err.lines().last().unwrap_or("").trim().to_owned();
            return Err(Error::BadInput {
                file: what.to_owned(),
                reason: format!("qemu-nbd could not open it ({st}): {first}"),
            });
        }
        if socket.exists() {
            match Client::connect(socket) {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() > deadline => return Err(Error::io(socket, e)),
                Err(_) => {}
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Tool {
                tool: "qemu-nbd".into(),
                detail: format!("no server on {} after 30 s", socket.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}
