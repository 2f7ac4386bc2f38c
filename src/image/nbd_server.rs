//! The server side of NBD: how QEMU reads an image straight from the chunk
//! store (lazy instance disks, `image::lazy`). One blocking thread per
//! connection speaks the "fixed newstyle" handshake (`NBD_OPT_GO`,
//! `NBD_OPT_INFO` and the older `NBD_OPT_EXPORT_NAME`; every other option,
//! structured replies included, is answered "unsupported") and simple
//! replies in transmission, reads served by a few threads at once and
//! answered as they complete. Exports are read-only: reads are served,
//! flushes and cache hints succeed, writes and trims fail with `EPERM`.
//!
//! Main items: [`Export`] (what is served: a size and reads that may fail
//! with an errno) and [`serve_connection`]. The protocol constants are those
//! of the NBD protocol document (`doc/proto.md` of the NBD project); the
//! ones the client uses too are in [`super::nbd`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::nbd::{
    be_u64, CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC,
    OPT_EXPORT_NAME, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
/// The magic of an option reply.
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
const FLAG_HAS_FLAGS: u16 = 1 << 0;
const FLAG_READ_ONLY: u16 = 1 << 1;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const FLAG_SEND_CACHE: u16 = 1 << 10;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_CACHE: u16 = 5;
/// errno values of replies.
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
/// The largest option payload accepted, and the largest read or write (4
/// MiB, announced as the maximum block size, which QEMU honours: a
/// connection's buffer stays small).
const MAX_OPTION: u32 = 64 << 10;
pub(crate) const MAX_REQUEST: u32 = 4 << 20;
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What one export serves.
pub(crate) trait Export: Send + Sync {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `off` (`off + buf.len()` is within the
    /// size); on failure the errno the client gets.
    fn read(&self, buf: &mut [u8], off: u64) -> std::result::Result<(), u32>;
}

/// Why a connection ended, when it did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("NBD client: {0}")]
    Protocol(String),
}

fn proto(what: impl Into<String>) -> ConnError {
    ConnError::Protocol(what.into())
}

/// Serves one client on `s` until it disconnects: the handshake (the
/// export chosen by name through `resolve`), then its requests. Returns
/// the export's name once transmission ended (`Ok(None)`: the client left
/// during the handshake).
pub(crate) fn serve_connection(
    mut s: UnixStream,
    resolve: &dyn Fn(&str) -> Option<Arc<dyn Export>>,
) -> std::result::Result<Option<String>, ConnError> {
    // A client that does not finish its handshake in time is dropped (an
    // idle one afterwards is fine: QEMU may not read for hours).
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let Some((name, export)) = handshake(&mut s, resolve)? else {
        return Ok(None);
    };
    s.set_read_timeout(None)?;
    transmission(&mut s, export.as_ref())?;
    Ok(Some(name))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

fn option_reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&REP_MAGIC.to_be_bytes());
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)
}

fn transmission_flags() -> u16 {
    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE
}

type Chosen = (String, Arc<dyn Export>);

/// The fixed newstyle handshake; the export chosen, or `None` when the
/// client aborted.
fn handshake(
    s: &mut UnixStream,
    resolve: &dyn Fn(&str) -> Option<Arc<dyn Export>>,
) -> std::result::Result<Option<Chosen>, ConnError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    let cflags = be_u32(&cflags);
    if cflags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(proto("does not speak fixed newstyle negotiation"));
    }
    let no_zeroes = cflags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        if be_u64(&head) != IHAVEOPT {
            return Err(proto("bad option magic"));
        }
        let opt = be_u32(&head[8..]);
        let len = be_u32(&head[12..]);
        if len > MAX_OPTION {
            return Err(proto(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No error reply exists for this option: an unknown
                // export closes the connection.
                let Some(export) = resolve(&name) else {
                    return Err(proto(format!("unknown export {name:?}")));
                };
                let mut r = Vec::with_capacity(10 + 124);
                r.extend_from_slice(&export.size().to_be_bytes());
                r.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                return Ok(Some((name, export)));
            }
            OPT_ABORT => {
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_INFO | OPT_GO => {
                let parsed = parse_go(&data);
                let Some((name, infos)) = parsed else {
                    option_reply(s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                };
                let Some(export) = resolve(&name) else {
                    option_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(s, opt, REP_INFO, &info)?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut b = Vec::with_capacity(14);
                    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    option_reply(s, opt, REP_INFO, &b)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some((name, export)));
                }
            }
            _ => option_reply(s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// The export name and information requests of `NBD_OPT_GO`/`INFO`.
fn parse_go(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = be_u32(data.get(..4)?) as usize;
    let name = data.get(4..4 + n)?;
    let rest = data.get(4 + n..)?;
    let count = be_u16(rest.get(..2)?) as usize;
    let reqs = rest.get(2..2 + 2 * count)?;
    let infos = reqs.chunks(2).map(be_u16).collect();
    Some((String::from_utf8_lossy(name).into_owned(), infos))
}

fn simple_reply(s: &mut UnixStream, err: u32, handle: u64, data: &[u8]) -> std::io::Result<()> {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&err.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    if data.is_empty() {
        return s.write_all(&r);
    }
    s.write_all(&r)?;
    s.write_all(data)
}

/// Reads served at once on one connection (QEMU's client keeps up to 16
/// requests in flight): a read that waits for the remote does not hold
/// up the others.
const READERS: usize = 4;

/// A read to serve: its handle, offset and length.
type ReadJob = (u64, u64, u32);

/// Requests until `NBD_CMD_DISC` or the client goes away. Reads are served
/// by [`READERS`] threads and answered as each completes (replies carry
/// the request's handle, so their order is free); everything else is
/// answered at once, in order. At the end, reads in flight are answered
/// before it returns.
fn transmission(s: &mut UnixStream, export: &dyn Export) -> std::result::Result<(), ConnError> {
    let out = Mutex::new(s.try_clone()?);
    let (tx, rx) = std::sync::mpsc::sync_channel::<ReadJob>(READERS);
    let rx = Mutex::new(rx);
    let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let ended = std::thread::scope(|scope| {
        for _ in 0..READERS {
            scope.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((handle, off, len)) = job else {
                        return;
                    };
                    if failed.lock().unwrap().is_some() {
                        continue; // the client is gone: drop what is queued
                    }
                    buf.resize(len as usize, 0);
                    let sent = match export.read(&mut buf, off) {
                        Ok(()) => simple_reply(&mut out.lock().unwrap(), 0, handle, &buf),
                        Err(errno) => simple_reply(&mut out.lock().unwrap(), errno, handle, &[]),
                    };
                    if let Err(e) = sent {
                        // The client is gone: the request loop ends too.
                        let _ = out.lock().unwrap().shutdown(std::net::Shutdown::Both);
                        failed.lock().unwrap().get_or_insert(e);
                    }
                }
            });
        }
        let ended = requests(s, export.size(), &tx, &out);
        drop(tx); // the readers answer what is queued, then end
        ended
    });
    match failed.into_inner().unwrap() {
        Some(e) if ended.is_ok() => Err(e.into()),
        _ => ended,
    }
}

/// The request loop of [`transmission`]: reads go to the readers through
/// `reads`, other replies are written on `out`.
fn requests(
    s: &mut UnixStream,
    size: u64,
    reads: &std::sync::mpsc::SyncSender<ReadJob>,
    out: &Mutex<UnixStream>,
) -> std::result::Result<(), ConnError> {
    let reply = |err: u32, handle: u64| simple_reply(&mut out.lock().unwrap(), err, handle, &[]);
    loop {
        let mut req = [0u8; 28];
        match s.read_exact(&mut req) {
            Ok(()) => {}
            // A client that closed without NBD_CMD_DISC (QEMU killed).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if be_u32(&req) != REQUEST_MAGIC {
            return Err(proto("bad request magic"));
        }
        let kind = be_u16(&req[6..]);
        let handle = be_u64(&req[8..]);
        let off = be_u64(&req[16..]);
        let len = be_u32(&req[24..]);
        let in_range =
            len <= MAX_REQUEST && off.checked_add(u64::from(len)).is_some_and(|e| e <= size);
        match kind {
            CMD_READ if !in_range => reply(EINVAL, handle)?,
            CMD_READ => {
                // The readers live as long as the channel: this never fails.
                let _ = reads.send((handle, off, len));
            }
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Err(proto(format!("write of {len} bytes")));
                }
                // The payload follows the request: read past it.
                let mut left = u64::from(len);
                let mut sink = [0u8; 8192];
                while left > 0 {
                    let n = left.min(sink.len() as u64) as usize;
                    s.read_exact(&mut sink[..n])?;
                    left -= n as u64;
                }
                reply(EPERM, handle)?;
            }
            // Nothing is ever written: a flush has nothing to wait for.
            CMD_FLUSH | CMD_CACHE => reply(0, handle)?,
            // TRIM, WRITE_ZEROES: the export is read-only.
            4 | 6 => reply(EPERM, handle)?,
            _ => reply(EINVAL, handle)?,
        }
    }
}

/// The errno of a read that failed because the data is bad or missing.
pub(crate) const READ_FAILED: u32 = EIO;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::nbd::{request, Client};

    /// Bytes `(offset % 251)`; a read at 8192 fails; one at 12288 waits
    /// (up to 5 s, then fails) until the export read offset 0.
    struct Pattern(u64, std::sync::atomic::AtomicBool);

    impl Export for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read(&self, buf: &mut [u8], off: u64) -> std::result::Result<(), u32> {
            use std::sync::atomic::Ordering::SeqCst;
            if off == 8192 {
                return Err(READ_FAILED);
            }
            if off == 0 {
                self.1.store(true, SeqCst);
            }
            let t0 = std::time::Instant::now();
            while off == 12288 && !self.1.load(SeqCst) {
                if t0.elapsed() > std::time::Duration::from_secs(5) {
                    return Err(READ_FAILED);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((off + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    fn server(dir: &std::path::Path) -> std::path::PathBuf {
        let sock = dir.join("s");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let c = c.unwrap();
                std::thread::spawn(move || {
                    let resolve = |n: &str| -> Option<Arc<dyn Export>> {
                        (n == "disk").then(|| {
                            Arc::new(Pattern(1 << 20, Default::default())) as Arc<dyn Export>
                        })
                    };
                    let _ = serve_connection(c, &resolve);
                });
            }
        });
        sock
    }

    #[test]
    fn the_client_reads_an_export_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sock = server(dir.path());
        let c = Client::connect_to(&sock, "disk").unwrap();
        assert_eq!(c.size(), 1 << 20);
        let mut buf = vec![0u8; 4096];
        assert_eq!(c.read_at(&mut buf, 4096).unwrap(), 4096);
        assert_eq!(buf[0], (4096 % 251) as u8);
        assert_eq!(buf[4095], (8191 % 251) as u8);
        // a failed read is an I/O error, not data
        let e = c.read_at(&mut buf, 8192).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5));
        // an unknown export closes the connection
        assert!(Client::connect_to(&sock, "other").is_err());
    }

    /// The export name handshake on `sock`, by hand: the stream, in
    /// transmission.
    fn connect_raw(sock: &std::path::Path) -> UnixStream {
        let mut s = UnixStream::connect(sock).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&3u32.to_be_bytes());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&4u32.to_be_bytes());
        opt.extend_from_slice(b"disk");
        s.write_all(&opt).unwrap();
        let mut info = [0u8; 10];
        s.read_exact(&mut info).unwrap();
        assert_eq!(be_u16(&info[8..]) & FLAG_READ_ONLY, FLAG_READ_ONLY);
        s
    }

    #[test]
    fn a_slow_read_does_not_hold_up_the_next_and_replies_come_as_reads_end() {
        let dir = tempfile::tempdir().unwrap();
        let sock = server(dir.path());
        let mut s = connect_raw(&sock);
        // The read at 12288 can only end once the one at 0 was served.
        s.write_all(&request(CMD_READ, 1, 12288, 4096)).unwrap();
        s.write_all(&request(CMD_READ, 2, 0, 4096)).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let mut r = [0u8; 16];
            s.read_exact(&mut r).unwrap();
            assert_eq!(be_u32(&r[4..]), 0, "both reads succeed");
            let handle = be_u64(&r[8..]);
            let mut data = vec![0u8; 4096];
            s.read_exact(&mut data).unwrap();
            let off = if handle == 1 { 12288 } else { 0 };
            assert_eq!(
                data[1],
                ((off + 1) % 251) as u8,
                "read {handle}'s own bytes"
            );
            got.push(handle);
        }
        assert_eq!(got, [2, 1], "the later read is answered first");
        // Reads in flight are answered before a disconnect ends the connection.
        s.write_all(&request(CMD_READ, 3, 4096, 4096)).unwrap();
        s.write_all(&request(CMD_DISC, 4, 0, 0)).unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!((be_u32(&r[4..]), be_u64(&r[8..])), (0, 3));
    }

    #[test]
    fn writes_and_out_of_range_reads_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = server(dir.path());
        let c = Client::connect_to(&sock, "disk").unwrap();
        drop(c);
        // speak the protocol by hand: export name, then a write and a read past the end
        let mut s = connect_raw(&sock);
        s.write_all(&request(CMD_WRITE, 7, 0, 5)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!((be_u32(&r[4..]), be_u64(&r[8..])), (EPERM, 7));
        s.write_all(&request(CMD_READ, 8, (1 << 20) - 10, 20))
            .unwrap();
        s.read_exact(&mut r).unwrap();
        assert_eq!((be_u32(&r[4..]), be_u64(&r[8..])), (EINVAL, 8));
        // an unsupported option is answered, and the handshake goes on
        let mut s = UnixStream::connect(&sock).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&3u32.to_be_bytes());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&8u32.to_be_bytes()); // NBD_OPT_STRUCTURED_REPLY
        opt.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&opt).unwrap();
        let mut rep = [0u8; 20];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(be_u32(&rep[12..]), REP_ERR_UNSUP);
    }
}
