//! Instances: QEMU virtual machines started from images.
//!
//! Main items: [`LaunchOptions`] and [`Depot::launch`] (batch launch),
//! [`InstanceInfo`] (what `instance show` prints), the lifecycle methods on
//! [`Depot`] (`stop_instance`, `start_instance`, `delete_instance`, …), the
//! [`Instance`] handle a test harness holds (wait for a serial line; an
//! ephemeral instance is destroyed when the handle drops), and
//! [`Foreground`] (QEMU as a child, for systemd units).
//!
//! Files: `DEPOT/bases/IMAGE.raw` is the read-only raw base of an image,
//! made once and shared by every overlay instance of it (made under an
//! exclusive flock on `bases/IMAGE.lock`, which gc also takes before it
//! evicts a base no instance uses). `DEPOT/instances/ID/` holds an
//! instance's disk (`disk.qcow2` overlay on the base, or a private sparse
//! `disk.raw`), `seed.img` (NoCloud), `qmp.sock`, `console.sock`,
//! `serial.log`, `qemu.pid`, `lock` (flocked by whoever changes the
//! instance's state) and, while a live capture has the guest paused,
//! `pause` (the pause lease: see [`PauseLease`]).
//!
//! **State is true**: a row says `running` only while its QEMU lives; every
//! read of an instance checks the pid (and that the pid is our QEMU) and
//! records a death as `stopped`; a running guest is shown `paused` when QMP
//! `query-status` says so, and a pause whose owner died is ended by
//! whichever command looks at the instance next.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::catalog;
use crate::depot::{rfc3339, Depot};
use crate::error::{Error, IoContext, Result};
use crate::ids::random_hex;
use crate::image::bases::{self, base_flock, base_path, flock};
use crate::image::export::ExportFormat;
use crate::launch::qemu::{self, Accel, Forward, Qmp, VmConfig, VmFiles};
use crate::launch::seed::{write_seed, Seed};
use crate::perms::Perms;
use crate::progress::Progress;

/// How an instance's disk is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// A qcow2 overlay over the image's shared raw base (the default).
    Overlay,
    /// A private sparse raw copy of the image.
    Copy,
}

impl DiskMode {
    pub fn parse(s: &str) -> Result<DiskMode> {
        match s {
            "overlay" => Ok(DiskMode::Overlay),
            "copy" => Ok(DiskMode::Copy),
            _ => Err(Error::Invalid(format!(
                "unknown disk mode {s:?}: use overlay or copy"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::Overlay => "overlay",
            DiskMode::Copy => "copy",
        }
    }
}

/// What `instance run` asks for.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Image id or name.
    pub image: String,
    /// Instance name; with `count` > 1 the instances are NAME-1 … NAME-N.
    /// Default: the image's name plus a short random suffix.
    pub name: Option<String>,
    pub count: u32,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk: DiskMode,
    pub accel: Accel,
    /// Default: the instance name.
    pub hostname: Option<String>,
    /// Public keys (file contents) for the generated user-data.
    pub ssh_keys: Vec<String>,
    /// User-data document; replaces the generated one.
    pub user_data: Option<String>,
    pub forwards: Vec<Forward>,
    /// Forward a free host port to guest port 22 (shown as `ssh_port`).
    pub ssh_forward: bool,
    /// Destroy the instance when its [`Instance`] handle drops (harnesses).
    pub ephemeral: bool,
    /// Create and prepare the instances but do not start them (the caller
    /// starts one in the foreground).
    pub no_start: bool,
}

impl LaunchOptions {
    pub fn new(image: impl Into<String>) -> LaunchOptions {
        LaunchOptions {
            image: image.into(),
            name: None,
            count: 1,
            cpus: 1,
            memory_mib: 512,
            disk: DiskMode::Overlay,
            accel: Accel::Auto,
            hostname: None,
            ssh_keys: Vec::new(),
            user_data: None,
            forwards: Vec::new(),
            ssh_forward: true,
            ephemeral: false,
            no_start: false,
        }
    }
}

/// An instance as users see it (`instance show --json`).
#[derive(Clone, Debug, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub name: String,
    /// Id of the image it was launched from.
    pub image: String,
    pub image_name: String,
    pub owner: String,
    /// pending, running, paused (QEMU lives, the guest's CPUs are
    /// stopped), stopped or failed.
    pub state: String,
    /// What QMP `query-status` said (`running`, `paused`, `io-error`, …),
    /// when QEMU lives and answered.
    pub run_state: Option<String>,
    /// The accelerator of the last start (kvm or tcg), or the request.
    pub accel: String,
    pub pid: Option<i32>,
    pub ssh_port: Option<u16>,
    pub forwards: Vec<Forward>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk: String,
    pub hostname: String,
    pub created_at: String,
    pub dir: PathBuf,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_socket: PathBuf,
    /// Why it failed (empty otherwise).
    pub error: String,
}

/// Result of a launch.
pub struct Launched {
    pub instances: Vec<Instance>,
    /// A one-line notice for the user (e.g. why TCG instead of KVM).
    pub notice: Option<String>,
}

/// A handle on an instance. For an ephemeral launch, dropping it kills QEMU
/// and deletes the instance.
pub struct Instance {
    root: PathBuf,
    info: InstanceInfo,
    ephemeral: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) image_name: String,
    pub(crate) owner: String,
    pub(crate) state: String,
    pub(crate) disk: DiskMode,
    pub(crate) cpus: u32,
    pub(crate) memory_mib: u64,
    pub(crate) accel: String,
    pub(crate) accel_used: String,
    pub(crate) hostname: String,
    pub(crate) forwards: Vec<Forward>,
    pub(crate) ssh_port: Option<u16>,
    pub(crate) pid: Option<i32>,
    pub(crate) created_at: i64,
    pub(crate) error: String,
    /// Launch-only origin of the disk's content (see access.rs), or empty.
    pub(crate) restricted_from: String,
}

const COLS: &str = "id, name, image, image_name, owner, state, disk, cpus, memory_mib, accel, \
                    accel_used, hostname, forwards, ssh_port, pid, created_at, error, \
                    restricted_from";

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let disk: String = r.get(6)?;
    let fwd: String = r.get(12)?;
    Ok(Row {
        id: r.get(0)?,
        name: r.get(1)?,
        image: r.get(2)?,
        image_name: r.get(3)?,
        owner: r.get(4)?,
        state: r.get(5)?,
        disk: if disk == "copy" {
            DiskMode::Copy
        } else {
            DiskMode::Overlay
        },
        cpus: r.get(7)?,
        memory_mib: r.get::<_, i64>(8)? as u64,
        accel: r.get(9)?,
        accel_used: r.get(10)?,
        hostname: r.get(11)?,
        forwards: serde_json::from_str(&fwd).unwrap_or_default(),
        ssh_port: r.get(13)?,
        pid: r.get(14)?,
        created_at: r.get(15)?,
        error: r.get(16)?,
        restricted_from: r.get(17)?,
    })
}

/// Paths of an instance's files.
pub(crate) struct Paths {
    pub(crate) dir: PathBuf,
}

impl Paths {
    pub(crate) fn new(root: &Path, id: &str) -> Paths {
        Paths {
            dir: root.join("instances").join(id),
        }
    }
    pub(crate) fn disk(&self, mode: DiskMode) -> PathBuf {
        self.dir.join(match mode {
            DiskMode::Overlay => "disk.qcow2",
            DiskMode::Copy => "disk.raw",
        })
    }
    fn seed(&self) -> PathBuf {
        self.dir.join("seed.img")
    }
    pub(crate) fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub(crate) fn pause(&self) -> PathBuf {
        self.dir.join("pause")
    }
    pub(crate) fn files(&self) -> VmFiles {
        VmFiles {
            qmp: self.dir.join("qmp.sock"),
            console: self.dir.join("console.sock"),
            serial_log: self.dir.join("serial.log"),
            pidfile: self.dir.join("qemu.pid"),
        }
    }
}

fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("ins-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A valid instance name: what users type, a directory never uses it.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !is_instance_id(name);
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad instance name {name:?}: use 1-63 letters, digits, '-', '_' or '.' \
             (and not the form of an id, ins-…)"
        )))
    }
}

/// A hostname the guest can take (RFC 1123 labels); it goes into the
/// seed's meta-data as is.
fn check_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad --hostname {h:?}: use letters, digits and '-' in dot-separated labels of 1-63"
        )))
    }
}

/// A hostname from a name: lowercase letters, digits and '-'.
fn hostname_from(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let h = h.trim_matches('-').chars().take(63).collect::<String>();
    if h.is_empty() {
        "vmdepot".into()
    } else {
        h
    }
}

impl Depot {
    /// Launches `opts.count` instances of an image: one shared raw base
    /// (made once), a qcow2 overlay (or private copy) and a NoCloud seed per
    /// instance, QEMU started detached. On any error nothing of this launch
    /// is left behind.
    pub fn launch(&self, opts: &LaunchOptions, progress: &dyn Progress) -> Result<Launched> {
        let qemu_bin = qemu::qemu_binary()?;
        let (img, _) = self.available_for(&opts.image, crate::depot::access::Op::Launch)?;
        if opts.count == 0 || opts.count > 1000 {
            return Err(Error::Invalid(format!(
                "--count {}: launch 1 to 1000 instances at once",
                opts.count
            )));
        }
        if opts.cpus == 0 || opts.cpus > 255 {
            return Err(Error::Invalid(format!(
                "--cpus {}: use 1 to 255",
                opts.cpus
            )));
        }
        for f in &opts.forwards {
            f.check_free()?;
        }
        if opts.count > 1 && !opts.forwards.is_empty() {
            return Err(Error::Invalid(
                "--forward with --count > 1: every instance would need the same host port; \
                 launch them one by one"
                    .into(),
            ));
        }
        let base_name = match &opts.name {
            Some(n) => n.clone(),
            None => format!("{}-{}", img.name, random_hex(2)),
        };
        let names: Vec<String> = if opts.count == 1 {
            vec![base_name.clone()]
        } else {
            (1..=opts.count)
                .map(|i| format!("{base_name}-{i}"))
                .collect()
        };
        for n in &names {
            check_name(n)?;
        }
        crate::launch::seed::check_sizes(opts.user_data.as_deref(), &opts.ssh_keys)?;
        if let Some(h) = &opts.hostname {
            check_hostname(h)?;
        }
        let (accel, notice) =
            qemu::choose_accel(&qemu_bin, opts.accel, self.root(), self.perms().file())?;
        for d in ["instances", "bases"] {
            self.perms().mkdir_all(&self.root().join(d))?;
        }

        // Rows first (pending), under the base's lock, so that gc sees the
        // base is in use before it could evict it; the base is made once.
        let ids: Vec<String> = names
            .iter()
            .map(|_| format!("ins-{}", random_hex(8)))
            .collect();
        let mut guard = LaunchGuard {
            depot: self,
            ids: Vec::new(),
            locks: Vec::new(),
        };
        let base = {
            let _base_lock = base_flock(&self.repo, img.id.as_str(), FlockArg::LockExclusive)?;
            for id in &ids {
                let p = Paths::new(self.root(), id);
                self.perms().mkdir_all(&p.dir)?;
                guard
                    .locks
                    .push(flock(&p.lock(), FlockArg::LockExclusive, self.perms())?);
                guard.ids.push(id.clone());
            }
            let now = catalog::now();
            catalog::write(&self.repo.conn, |tx| {
                let mut ins = tx.prepare_cached(
                    "INSERT INTO instances (id, name, image, image_name, owner, state, disk, cpus,
                     memory_mib, accel, hostname, created_at, restricted_from)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )?;
                let restricted_from = crate::depot::access::restriction_of(&img, self.account());
                for (i, (id, name)) in ids.iter().zip(&names).enumerate() {
                    let host = match &opts.hostname {
                        Some(h) if opts.count == 1 => h.clone(),
                        Some(h) => format!("{h}-{}", i + 1),
                        None => hostname_from(name),
                    };
                    let r = ins.execute(params![
                        id,
                        name,
                        img.id.as_str(),
                        img.name,
                        self.account(),
                        opts.disk.as_str(),
                        opts.cpus,
                        opts.memory_mib as i64,
                        opts.accel.as_str(),
                        host,
                        now,
                        restricted_from
                    ]);
                    if let Err(e) = r {
                        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                            return Err(Error::Invalid(format!(
                                "an instance named {name:?} already exists: pick another --name \
                                 or delete that instance first"
                            )));
                        }
                        return Err(e.into());
                    }
                }
                Ok(())
            })?;
            match opts.disk {
                DiskMode::Overlay => Some(bases::ensure_base(&self.repo, &img, progress)?),
                DiskMode::Copy => None,
            }
        };

        // Disks and seeds.
        let mut ports_taken = std::collections::HashSet::new();
        for id in &ids {
            let row = self.row(id)?;
            let p = Paths::new(self.root(), id);
            for f in [p.files().qmp, p.files().console] {
                qemu::check_socket_path(&f)?;
            }
            make_disk(self, &img, base.as_deref(), &p.disk(opts.disk), progress)?;
            let seed = Seed::new(id, &row.hostname, opts.user_data.clone(), &opts.ssh_keys);
            write_seed(&p.seed(), &seed, self.perms().file())?;
            let mut forwards = opts.forwards.clone();
            if opts.ssh_forward && !forwards.iter().any(|f| f.guest == 22) {
                // distinct within this launch too (the kernel may hand the
                // same free port out twice)
                let mut port = qemu::free_port()?;
                while !ports_taken.insert(port) {
                    port = qemu::free_port()?;
                }
                forwards.insert(
                    0,
                    Forward {
                        addr: "127.0.0.1".into(),
                        host: port,
                        guest: 22,
                    },
                );
            }
            let ssh = forwards.iter().find(|f| f.guest == 22).map(|f| f.host);
            let fwd = serde_json::to_string(&forwards).expect("forwards serialise");
            catalog::write(&self.repo.conn, |tx| {
                tx.execute(
                    "UPDATE instances SET forwards = ?2, ssh_port = ?3, state = 'stopped' WHERE id = ?1",
                    params![id, fwd, ssh],
                )?;
                Ok(())
            })?;
        }
        if !opts.no_start {
            // Start them all, then wait for them all: QEMU start-up overlaps.
            let rows: Vec<Row> = ids.iter().map(|id| self.row(id)).collect::<Result<_>>()?;
            let started: Vec<Result<std::process::Child>> = rows
                .iter()
                .map(|r| spawn_detached(self.root(), &qemu_bin, r, accel))
                .collect();
            let mut first_err = None;
            for (r, c) in rows.iter().zip(started) {
                let res = c.and_then(|c| finish_start(self, r, c, accel));
                if let Err(e) = res {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        let infos: Vec<InstanceInfo> = ids
            .iter()
            .map(|id| self.instance(id))
            .collect::<Result<_>>()?;
        guard.ids.clear();
        Ok(Launched {
            instances: infos
                .into_iter()
                .map(|info| Instance {
                    root: self.root().to_owned(),
                    info,
                    ephemeral: opts.ephemeral,
                })
                .collect(),
            notice,
        })
    }

    pub(crate) fn row(&self, reference: &str) -> Result<Row> {
        // An account sees its own instances only.
        let sql =
            format!("SELECT {COLS} FROM instances WHERE (id = ?1 OR name = ?1) AND owner = ?2");
        self.repo
            .conn
            .query_row(&sql, params![reference, self.account()], row_from)
            .optional()?
            .ok_or_else(|| Error::InstanceNotFound(reference.to_owned()))
    }

    /// Re-reads a row and records a QEMU that died (or a launch that was
    /// interrupted): never a stale `running`.
    pub(crate) fn fresh_row(&self, reference: &str) -> Result<Row> {
        let r = self.row(reference)?;
        let dead_qemu =
            r.state == "running" && !r.pid.is_some_and(|p| crate::proc::pid_alive(p, &r.id));
        let dead_launch =
            r.state == "pending" && !lock_held(&Paths::new(self.root(), &r.id).lock());
        if !dead_qemu && !dead_launch {
            return Ok(r);
        }
        if dead_qemu {
            set_stopped(&self.repo.conn, &r.id, r.pid)?;
        } else {
            catalog::write(&self.repo.conn, |tx| {
                tx.execute(
                    "UPDATE instances SET state = 'failed', error = 'its launch was interrupted' WHERE id = ?1 AND state = 'pending'",
                    [&r.id],
                )?;
                Ok(())
            })?;
        }
        self.row(&r.id)
    }

    /// Takes the instance's lock (waiting for another state change) and
    /// reads its true state.
    pub(crate) fn hold(&self, reference: &str) -> Result<Held> {
        let id = self.row(reference)?.id;
        let p = Paths::new(self.root(), &id);
        let lock = flock(&p.lock(), FlockArg::LockExclusive, self.perms())?;
        let r = self.fresh_row(&id)?;
        if r.state == "running" {
            // With the lock ours, a lease left here is a dead process's.
            end_orphaned_pause(&p);
        }
        Ok(Held { r, p, _lock: lock })
    }

    /// What every start does first: hold the instance, refuse if it runs,
    /// choose the accelerator, make sure its host ports are free.
    fn prepare_start(&self, reference: &str) -> Result<Starting> {
        let qemu_bin = qemu::qemu_binary()?;
        let mut h = self.hold(reference)?;
        if h.r.state == "running" {
            return Err(Error::Invalid(format!(
                "instance {} ({}) is already running",
                h.r.name, h.r.id
            )));
        }
        let (accel, notice) = qemu::choose_accel(
            &qemu_bin,
            Accel::parse(&h.r.accel)?,
            self.root(),
            self.perms().file(),
        )?;
        h.r = self.refresh_forwards(h.r)?;
        if h.r.disk == DiskMode::Overlay {
            self.check_start_base(&h.r)?;
        }
        Ok(Starting {
            held: h,
            qemu_bin,
            accel,
            notice,
        })
    }

    /// The base of a stopped overlay instance about to start, checked like a
    /// launch's (under the base's lock: [`ensure_base`], rebuilt if bad and
    /// no running QEMU has it open), so a base a power cut emptied is never
    /// booted. A base whose image was deleted cannot be rebuilt: any problem
    /// with it ([`base_problem`]) refuses the start.
    fn check_start_base(&self, r: &Row) -> Result<()> {
        let _base_lock = base_flock(&self.repo, &r.image, FlockArg::LockExclusive)?;
        let img = catalog::find_images(&self.repo.conn, &r.image)?
            .into_iter()
            .find(|i| i.id.as_str() == r.image);
        match img {
            Some(img) => {
                bases::ensure_base(&self.repo, &img, &crate::progress::NoProgress)?;
            }
            None => {
                let p = base_path(self.root(), &r.image);
                let problem = if p.exists() {
                    bases::base_problem(
                        &self.repo,
                        &r.image,
                        None,
                        false,
                        &crate::progress::NoProgress,
                    )?
                } else {
                    Some(format!(
                        "launch base {} of deleted image {} is missing",
                        p.display(),
                        r.image
                    ))
                };
                if let Some(why) = problem {
                    return Err(Error::StoreDamaged(format!(
                        "instance {} ({}) cannot start: {why} (its image is deleted, so \
                         the base cannot be rebuilt)",
                        r.name, r.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// The guest's run state (QMP `query-status`) of a running instance,
    /// after ending a pause whose owner died: taking the instance's lock
    /// without waiting (a holder ends such a pause itself in `hold`, and a
    /// live capture holds it for as long as its pause lasts). `None` when
    /// QMP does not answer within [`QMP_STATUS_TIMEOUT`].
    fn run_state(&self, r: &Row) -> Option<String> {
        let p = Paths::new(self.root(), &r.id);
        if p.pause().exists() {
            if let Ok(_lock) = flock(&p.lock(), FlockArg::LockExclusiveNonblock, self.perms()) {
                end_orphaned_pause(&p);
            }
        }
        match Qmp::connect_timeout(&p.files().qmp, QMP_STATUS_TIMEOUT)
            .and_then(|mut q| q.run_state())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("instance {}: no run state: {e}", r.id);
                None
            }
        }
    }

    fn info(&self, r: Row, run_state: Option<String>) -> InstanceInfo {
        let p = Paths::new(self.root(), &r.id);
        let files = p.files();
        InstanceInfo {
            accel: if r.accel_used.is_empty() {
                r.accel.clone()
            } else {
                r.accel_used.clone()
            },
            id: r.id,
            name: r.name,
            image: r.image,
            image_name: r.image_name,
            owner: r.owner,
            state: if r.state == "running" && run_state.as_deref() == Some("paused") {
                "paused".into()
            } else {
                r.state
            },
            run_state,
            pid: r.pid,
            ssh_port: r.ssh_port,
            forwards: r.forwards,
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            disk: r.disk.as_str().to_owned(),
            hostname: r.hostname,
            created_at: rfc3339(r.created_at),
            dir: p.dir,
            serial_log: files.serial_log,
            qmp_socket: files.qmp,
            console_socket: files.console,
            error: r.error,
        }
    }

    /// One instance by id or name, with its true state.
    pub fn instance(&self, reference: &str) -> Result<InstanceInfo> {
        let r = self.fresh_row(reference)?;
        let run_state = if r.state == "running" {
            self.run_state(&r)
        } else {
            None
        };
        Ok(self.info(r, run_state))
    }

    /// This account's instances, oldest first, with their true states.
    pub fn list_instances(&self) -> Result<Vec<InstanceInfo>> {
        let ids: Vec<String> = {
            let mut st = self
                .repo
                .conn
                .prepare("SELECT id FROM instances WHERE owner = ?1 ORDER BY created_at, name")?;
            let rows = st.query_map([self.account()], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.instance(&id) {
                Ok(i) => out.push(i),
                Err(Error::InstanceNotFound(_)) => {} // deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Starts a stopped (or failed) instance, detached.
    pub fn start_instance(&self, reference: &str) -> Result<(InstanceInfo, Option<String>)> {
        let s = self.prepare_start(reference)?;
        let r = &s.held.r;
        let child = spawn_detached(self.root(), &s.qemu_bin, r, s.accel)?;
        finish_start(self, r, child, s.accel)?;
        Ok((self.instance(&r.id)?, s.notice))
    }

    /// Re-picks a free host port for an automatic SSH forward whose port was
    /// taken meanwhile; a user's own forward must be free.
    fn refresh_forwards(&self, mut r: Row) -> Result<Row> {
        let mut changed = false;
        for f in r.forwards.iter_mut() {
            let automatic = f.guest == 22 && Some(f.host) == r.ssh_port && f.addr == "127.0.0.1";
            match f.check_free() {
                Err(_) if automatic => {
                    f.host = qemu::free_port()?;
                    changed = true;
                }
                r => r?,
            }
        }
        if changed {
            r.ssh_port = r.forwards.iter().find(|f| f.guest == 22).map(|f| f.host);
            let fwd = serde_json::to_string(&r.forwards).expect("forwards serialise");
            catalog::write(&self.repo.conn, |tx| {
                tx.execute(
                    "UPDATE instances SET forwards = ?2, ssh_port = ?3 WHERE id = ?1",
                    params![r.id, fwd, r.ssh_port],
                )?;
                Ok(())
            })?;
        }
        Ok(r)
    }

    /// Stops an instance: ACPI power button through QMP, then kill after
    /// `timeout`; `force` kills at once. Stopping a stopped instance is not
    /// an error.
    pub fn stop_instance(
        &self,
        reference: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<InstanceInfo> {
        let Held { r, p, .. } = &self.hold(reference)?;
        if r.state == "running" {
            if let Some(pid) = r.pid {
                stop_qemu(p, pid, &r.id, force, timeout);
            }
            set_stopped(&self.repo.conn, &r.id, r.pid)?;
        }
        self.instance(&r.id)
    }

    /// Stops (see [`Depot::stop_instance`]) and starts an instance.
    pub fn restart_instance(
        &self,
        reference: &str,
        timeout: Duration,
    ) -> Result<(InstanceInfo, Option<String>)> {
        self.stop_instance(reference, false, timeout)?;
        self.start_instance(reference)
    }

    /// Deletes an instance: its disk, seed, sockets, logs and row. A running
    /// instance needs `force` (it is killed).
    pub fn delete_instance(&self, reference: &str, force: bool) -> Result<InstanceInfo> {
        let Held { r, p, .. } = &self.hold(reference)?;
        if r.state == "running" {
            if !force {
                return Err(Error::Invalid(format!(
                    "instance {} ({}) is running: stop it first, or delete it with --force",
                    r.name, r.id
                )));
            }
            if let Some(pid) = r.pid {
                stop_qemu(p, pid, &r.id, true, Duration::ZERO);
            }
        }
        let info = self.info(r.clone(), None);
        catalog::write(&self.repo.conn, |tx| {
            tx.execute("DELETE FROM instances WHERE id = ?1", [&r.id])?;
            Ok(())
        })?;
        fs::remove_dir_all(&p.dir).at(&p.dir)?;
        Ok(info)
    }

    /// A systemd unit that runs the instance in the foreground
    /// (`Type=notify`: ready once QEMU is up; stop = ACPI power button).
    /// Every word of `ExecStart=` is quoted and every value escaped per
    /// systemd.syntax(7) ([`systemd_word`], [`systemd_text`]).
    pub fn instance_unit(&self, reference: &str) -> Result<String> {
        let r = self.row(reference)?;
        let exe = std::env::current_exe().unwrap_or_else(|_| "vmdepot".into());
        let exe = path_str(&exe)?;
        let root = path_str(self.root())?;
        let exec = [
            exe,
            "--depot",
            root,
            "--account",
            &r.owner,
            "instance",
            "start",
            &r.id,
            "--foreground",
        ]
        .iter()
        .map(|w| systemd_word(w))
        .collect::<Result<Vec<_>>>()?
        .join(" ");
        Ok(format!(
            "# vmdepot instance {name}, image {image_name} ({image})\n\
             [Unit]\n\
             Description=vmdepot instance {name} ({id})\n\
             After=network.target\n\
             \n\
             [Service]\n\
             Type=notify\n\
             NotifyAccess=main\n\
             ExecStart={exec}\n\
             # SIGTERM presses the ACPI power button; QEMU is killed {stop_secs} s later.\n\
             KillMode=mixed\n\
             TimeoutStopSec={unit_stop}\n\
             Restart=on-failure\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            name = systemd_text(&r.name)?,
            id = systemd_text(&r.id)?,
            image = systemd_text(&r.image)?,
            image_name = systemd_text(&r.image_name)?,
            stop_secs = STOP_TIMEOUT.as_secs(),
            unit_stop = STOP_TIMEOUT.as_secs() + 15,
        ))
    }

    /// Starts a stopped instance with QEMU as a child of this process (for
    /// systemd units and `--foreground`).
    pub fn start_foreground(&self, reference: &str) -> Result<(Foreground, Option<String>)> {
        let Starting {
            held: Held { r, p, _lock },
            qemu_bin,
            accel,
            notice,
        } = self.prepare_start(reference)?;
        let cfg = vm_config(self.root(), &r, accel);
        clean_runtime_files(&cfg.files);
        // QEMU's messages go to a file: a pipe nobody reads would block a
        // long-running QEMU once full.
        let log_path = p.dir.join("qemu.log");
        let log = self
            .perms()
            .open_options()
            .create(true)
            .append(true)
            .open(&log_path)
            .at(&log_path)?;
        let log_start = log.metadata().at(&log_path)?.len();
        let mut child = Command::new(&qemu_bin)
            .args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .at(&qemu_bin)?;
        let pid = child.id() as i32;
        // QEMU is up when its QMP socket answers.
        let up = Qmp::connect_retry(&cfg.files.qmp, Duration::from_secs(30));
        if let Err(e) = up.and_then(|mut q| watch_accel(&mut q, accel)) {
            let _ = child.kill();
            let _ = child.wait();
            let said = fs::read(&log_path).unwrap_or_default();
            let msg = first_lines(said.get(log_start as usize..).unwrap_or_default())
                .unwrap_or_else(|| e.to_string());
            self.set_failed(&r.id, &msg)?;
            return Err(start_error(&r, &msg));
        }
        fix_runtime_modes(self.perms(), &cfg.files);
        set_running(&self.repo.conn, &r.id, pid, accel)?;
        Ok((
            Foreground {
                root: self.root().to_owned(),
                id: r.id.clone(),
                qmp: cfg.files.qmp,
                child,
            },
            notice,
        ))
    }

    fn set_failed(&self, id: &str, msg: &str) -> Result<()> {
        catalog::write(&self.repo.conn, |tx| {
            tx.execute(
                "UPDATE instances SET state = 'failed', pid = NULL, error = ?2 WHERE id = ?1",
                params![id, msg],
            )?;
            Ok(())
        })
    }

    /// A handle on an existing instance (not ephemeral).
    pub fn instance_handle(&self, reference: &str) -> Result<Instance> {
        Ok(Instance {
            root: self.root().to_owned(),
            info: self.instance(reference)?,
            ephemeral: false,
        })
    }
}

/// How long `stop` waits for the guest to power off before killing QEMU.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// An instance held for a change of state (see [`Depot::hold`]).
pub(crate) struct Held {
    pub(crate) r: Row,
    pub(crate) p: Paths,
    _lock: Flock<File>,
}

/// An instance ready to start (see `Depot::prepare_start`).
struct Starting {
    held: Held,
    qemu_bin: PathBuf,
    accel: Accel,
    notice: Option<String>,
}

/// Records a QEMU that runs.
fn set_running(conn: &rusqlite::Connection, id: &str, pid: i32, accel: Accel) -> Result<()> {
    catalog::write(conn, |tx| {
        tx.execute(
            "UPDATE instances SET state = 'running', pid = ?2, accel_used = ?3, error = '' WHERE id = ?1",
            params![id, pid, accel.as_str()],
        )?;
        Ok(())
    })
}

/// Records that the QEMU `pid` of a running instance is gone (a row that
/// another start changed meanwhile is left alone).
fn set_stopped(conn: &rusqlite::Connection, id: &str, pid: Option<i32>) -> Result<()> {
    catalog::write(conn, |tx| {
        tx.execute(
            "UPDATE instances SET state = 'stopped', pid = NULL
             WHERE id = ?1 AND state = 'running' AND pid IS ?2",
            params![id, pid],
        )?;
        Ok(())
    })
}

/// Removes the rows, directories of a launch that did not finish.
struct LaunchGuard<'a> {
    depot: &'a Depot,
    ids: Vec<String>,
    locks: Vec<Flock<File>>,
}

impl Drop for LaunchGuard<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let p = Paths::new(self.depot.root(), id);
            if let Some(pid) = crate::proc::read_pidfile(&p.files().pidfile) {
                if crate::proc::pid_alive(pid, id) {
                    stop_qemu(&p, pid, id, true, Duration::ZERO);
                }
            }
            let _ = catalog::write(&self.depot.repo.conn, |tx| {
                tx.execute("DELETE FROM instances WHERE id = ?1", [id])?;
                Ok(())
            });
            let _ = fs::remove_dir_all(&p.dir);
        }
        self.locks.clear();
    }
}

/// Refuses what no systemd unit line can hold.
fn systemd_refuse(s: &str) -> Result<()> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "{s:?} has the control character {c:?}, which a systemd unit cannot hold: \
             rename it (or move the depot) to use `instance unit`"
        )));
    }
    Ok(())
}

/// One word of an `ExecStart=` command line, per systemd.syntax(7) and
/// systemd.service(5): in double quotes, with `\` and `"` escaped by a
/// backslash, `%` (specifiers) as `%%` and `$` (variables) as `$$`. Control
/// characters (newlines: a new directive) are refused.
pub fn systemd_word(s: &str) -> Result<String> {
    systemd_refuse(s)?;
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '%' => o.push_str("%%"),
            '$' => o.push_str("$$"),
            c => o.push(c),
        }
    }
    o.push('"');
    Ok(o)
}

/// Text in a unit setting (`Description=`) or comment: `%` as `%%`,
/// control characters refused.
pub fn systemd_text(s: &str) -> Result<String> {
    systemd_refuse(s)?;
    Ok(s.replace('%', "%%"))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("{}: path is not UTF-8", p.display())))
}

fn lock_held(p: &Path) -> bool {
    let Ok(f) = File::open(p) else {
        return false;
    };
    matches!(
        Flock::lock(f, FlockArg::LockSharedNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// An instance disk at `dest`: a qcow2 overlay on `base`, or without a
/// base a private sparse raw copy of the image.
pub(crate) fn make_disk(
    depot: &Depot,
    img: &catalog::ImageRow,
    base: Option<&Path>,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    match base {
        Some(b) => crate::image::source::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(b)?,
            "-F",
            "raw",
            path_str(dest)?,
        ])
        .map(drop),
        None => crate::image::export::export(&depot.repo, img, dest, ExportFormat::Raw, progress),
    }
}

fn vm_config(root: &Path, r: &Row, accel: Accel) -> VmConfig {
    let p = Paths::new(root, &r.id);
    VmConfig {
        tag: r.id.clone(),
        accel,
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        disk: (
            p.disk(r.disk),
            match r.disk {
                DiskMode::Overlay => "qcow2",
                DiskMode::Copy => "raw",
            },
        ),
        seed: Some(p.seed()),
        forwards: r.forwards.clone(),
        files: p.files(),
    }
}

/// Sockets and pid file of an earlier run (QEMU refuses a stale socket
/// path only sometimes; a stale pid file misleads).
fn clean_runtime_files(f: &VmFiles) {
    for p in [&f.qmp, &f.console, &f.pidfile] {
        let _ = fs::remove_file(p);
    }
    // A pause lease names a pause of the QEMU that is gone.
    if let Some(dir) = f.qmp.parent() {
        let _ = fs::remove_file(dir.join("pause"));
    }
}

/// Gives the files QEMU made (sockets, serial log, pid file) the depot's
/// file mode: QEMU makes sockets 0777 & !umask, and a daemonized QEMU sets
/// its umask to 027 before it opens them. (The instance directory is 0700
/// or 2770 in any case.)
fn fix_runtime_modes(perms: Perms, f: &VmFiles) {
    for p in [&f.qmp, &f.console, &f.serial_log, &f.pidfile] {
        if let Err(e) = perms.fix(p) {
            tracing::warn!("{e}");
        }
    }
}

/// Starts QEMU with `-daemonize` (returns once the VM is set up).
fn spawn_detached(
    root: &Path,
    qemu_bin: &Path,
    r: &Row,
    accel: Accel,
) -> Result<std::process::Child> {
    let cfg = vm_config(root, r, accel);
    clean_runtime_files(&cfg.files);
    Command::new(qemu_bin)
        .args(cfg.args())
        .arg("-daemonize")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .at(qemu_bin)
}

/// Waits for a detached start; records `running` (or `failed`, with QEMU's
/// own words).
fn finish_start(depot: &Depot, r: &Row, child: std::process::Child, accel: Accel) -> Result<()> {
    let files = Paths::new(depot.root(), &r.id).files();
    let out = child.wait_with_output().at(&files.pidfile)?;
    let pid = crate::proc::read_pidfile(&files.pidfile);
    let result = match (out.status.success(), pid) {
        (true, Some(pid)) if accel == Accel::Kvm => {
            Qmp::connect_retry(&files.qmp, Duration::from_secs(10))
                .and_then(|mut q| watch_accel(&mut q, accel))
                .map(|_| pid)
                .map_err(|e| {
                    let p = Paths::new(depot.root(), &r.id);
                    stop_qemu(&p, pid, &r.id, true, Duration::ZERO);
                    e.to_string()
                })
        }
        (true, Some(pid)) => Ok(pid),
        _ => {
            let mut msg = first_lines(&out.stderr)
                .unwrap_or_else(|| format!("QEMU exited with {}", out.status));
            if accel == Accel::Kvm {
                msg.push_str(" (KVM may not work on this host: try --accel tcg or auto)");
            }
            Err(msg)
        }
    };
    match result {
        Ok(pid) => {
            fix_runtime_modes(depot.perms(), &files);
            set_running(&depot.repo.conn, &r.id, pid, accel)
        }
        Err(msg) => {
            depot.set_failed(&r.id, &msg)?;
            Err(start_error(r, &msg))
        }
    }
}

fn start_error(r: &Row, msg: &str) -> Error {
    Error::Tool {
        tool: "qemu-system-x86_64".into(),
        detail: format!("instance {} ({}) did not start: {msg}", r.name, r.id),
    }
}

/// The first lines of QEMU's stderr, joined.
fn first_lines(stderr: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("qemu-system-x86_64: "))
        .take(3)
        .collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

/// Under KVM, watches the first moments of the guest: a host whose KVM
/// cannot run guests leaves the VM in `internal-error` (QEMU does not exit).
fn watch_accel(q: &mut Qmp, accel: Accel) -> Result<()> {
    if accel != Accel::Kvm {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        if q.run_state()? == "internal-error" {
            return Err(Error::Tool {
                tool: "qemu-system-x86_64".into(),
                detail: "the guest died with a KVM internal error: KVM does not work on this \
                         host; use --accel tcg (or auto)"
                    .into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Powers a QEMU off (or kills it) and waits until it is gone.
fn stop_qemu(p: &Paths, pid: i32, id: &str, force: bool, timeout: Duration) {
    let files = p.files();
    let deadline = Instant::now() + timeout;
    if !force {
        // A paused guest cannot see the power button: resume it first (the
        // caller holds the instance lock, so no live capture pauses it).
        let pressed = Qmp::connect(&files.qmp).and_then(|mut q| {
            if q.run_state()? == "paused" {
                tracing::info!("instance {id} is paused: resuming it to press its power button");
                q.resume()?;
            }
            q.powerdown()
        });
        if pressed.is_ok() {
            while Instant::now() < deadline && crate::proc::pid_alive(pid, id) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    if crate::proc::pid_alive(pid, id) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && crate::proc::pid_alive(pid, id) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    clean_runtime_files(&files);
}

/// QEMU running as a child of this process.
pub struct Foreground {
    root: PathBuf,
    id: String,
    qmp: PathBuf,
    child: std::process::Child,
}

impl Foreground {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The QMP socket (to press the power button from a signal handler).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp
    }

    /// Waits for QEMU to exit; records `stopped`. Returns QEMU's exit code.
    pub fn wait(mut self) -> Result<i32> {
        let st = self.child.wait().at(&self.qmp)?;
        let depot = Depot::open(&self.root)?;
        set_stopped(&depot.repo.conn, &self.id, Some(self.child.id() as i32))?;
        clean_runtime_files(&Paths::new(&self.root, &self.id).files());
        Ok(st.code().unwrap_or(1))
    }
}

/// Presses the power button of the QEMU behind `qmp` (signal handlers).
/// A paused guest is resumed first unless a live capture (holding the
/// instance's lock) is pausing it: it resumes the guest itself, which then
/// sees the press.
pub fn press_power_button(qmp: &Path) -> Result<()> {
    let mut q = Qmp::connect(qmp)?;
    if q.run_state()? == "paused" {
        let dir = qmp.parent().unwrap_or(Path::new("."));
        if let Ok(f) = File::open(dir.join("lock")) {
            if let Ok(_lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                q.resume()?;
                let _ = fs::remove_file(dir.join("pause"));
            }
        }
    }
    q.powerdown()
}

/// How long a status query waits for QMP (another client may have it).
pub const QMP_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock
/// ticks since boot): with the pid it names a process, never a later one
/// that got the same pid. `None`: no such process, or a zombie.
fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A pause lease: `instances/ID/pause`, one line `PID START` naming the
/// process that paused the guest (QMP `stop`) and its start time. Written
/// (atomically) under the instance lock before the pause, removed after the
/// guest is resumed, lock still held. A lease whose owner is dead — the
/// lock being free says so, the pid and start time confirm it — means a
/// killed capture: the next command that looks at the instance resumes the
/// guest ([`end_orphaned_pause`]).
pub(crate) struct PauseLease {
    path: PathBuf,
}

impl PauseLease {
    /// Takes the lease (the caller holds the instance lock).
    pub(crate) fn take(p: &Paths, perms: Perms) -> Result<PauseLease> {
        let pid = std::process::id() as i32;
        let start = process_start(pid).unwrap_or(0);
        let path = p.pause();
        let tmp = p.dir.join("pause.tmp");
        {
            use std::io::Write;
            let mut f = perms
                .open_options()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&tmp)
                .at(&tmp)?;
            writeln!(f, "{pid} {start}").at(&tmp)?;
        }
        fs::rename(&tmp, &path).at(&path)?;
        Ok(PauseLease { path })
    }

    /// Ends the lease once the guest runs again.
    pub(crate) fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether the process a lease names still lives (an unreadable lease:
/// no, its writer died before the rename or wrote garbage).
fn lease_owner_alive(text: &str) -> bool {
    let mut w = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        w.next().map(str::parse::<i32>),
        w.next().map(str::parse::<u64>),
    ) else {
        return false;
    };
    pid > 0 && process_start(pid) == Some(start)
}

/// With the instance lock held and QEMU alive: ends a pause whose owner is
/// dead (QMP `cont` if the guest is paused, then the lease is removed).
/// Returns whether it resumed the guest. Failures are logged: the lease
/// stays for the next command.
pub(crate) fn end_orphaned_pause(p: &Paths) -> bool {
    let path = p.pause();
    let Ok(text) = fs::read_to_string(&path) else {
        return false;
    };
    if lease_owner_alive(&text) {
        return false;
    }
    let resumed = Qmp::connect_timeout(&p.files().qmp, QMP_STATUS_TIMEOUT).and_then(|mut q| {
        if q.run_state()? == "paused" {
            q.resume()?;
            Ok(true)
        } else {
            Ok(false)
        }
    });
    match resumed {
        Ok(r) => {
            if r {
                tracing::warn!(
                    "{}: the guest was left paused by process {} (gone): resumed it",
                    p.dir.display(),
                    text.split_whitespace().next().unwrap_or("?")
                );
            }
            let _ = fs::remove_file(&path);
            r
        }
        Err(e) => {
            tracing::warn!(
                "{}: could not end a dead process's pause: {e}",
                p.dir.display()
            );
            false
        }
    }
}

impl Instance {
    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Everything the guest wrote to its serial console so far.
    pub fn serial(&self) -> Result<String> {
        match fs::read(&self.info.serial_log) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(Error::io(&self.info.serial_log, e)),
        }
    }

    /// Waits until a serial console line contains `needle`; returns that
    /// line. Fails at the timeout, or at once if QEMU is gone, quoting the
    /// end of the console log.
    pub fn wait_for_serial(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.serial()?;
            if let Some(l) = log.lines().find(|l| l.contains(needle)) {
                return Ok(l.trim_end_matches('\r').to_owned());
            }
            let alive = self
                .info
                .pid
                .is_some_and(|p| crate::proc::pid_alive(p, &self.info.id));
            if !alive || Instant::now() >= deadline {
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(Error::Invalid(format!(
                    "instance {} ({}): {} before {needle:?} appeared on its serial console \
                     (last lines: {:?})",
                    self.info.name,
                    self.info.id,
                    if alive { "timed out" } else { "QEMU exited" },
                    tail.join(" | ")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Refreshes the handle's view (state, pid) from the catalog.
    pub fn refresh(&mut self) -> Result<&InstanceInfo> {
        self.info = Depot::open(&self.root)?.instance(&self.info.id)?;
        Ok(&self.info)
    }

    /// Stops the instance (power button, then kill after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        self.info = Depot::open(&self.root)?.stop_instance(&self.info.id, false, timeout)?;
        Ok(())
    }

    /// Kills QEMU and deletes the instance now.
    pub fn destroy(mut self) -> Result<()> {
        self.ephemeral = false;
        Depot::open(&self.root)?.delete_instance(&self.info.id, true)?;
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.ephemeral {
            if let Ok(d) = Depot::open(&self.root) {
                let _ = d.delete_instance(&self.info.id, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_quoting() {
        assert_eq!(
            systemd_word("/usr/bin/vmdepot").unwrap(),
            "\"/usr/bin/vmdepot\""
        );
        assert_eq!(
            systemd_word(r#"/d ep%n$HOME\"x"#).unwrap(),
            r#""/d ep%%n$$HOME\\\"x""#
        );
        assert_eq!(systemd_text("50% off").unwrap(), "50%% off");
        for bad in ["m\nExecStartPre=/bin/touch /x", "a\rb", "\x1b[31m", "a\0"] {
            assert!(systemd_word(bad).is_err(), "{bad:?}");
            assert!(systemd_text(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pause_lease_owners() {
        let me = std::process::id() as i32;
        let start = process_start(me).expect("own start time");
        assert!(lease_owner_alive(&format!("{me} {start}\n")));
        // the same pid with another start time is another process
        assert!(!lease_owner_alive(&format!("{me} {}\n", start + 1)));
        for bad in ["", "garbage", "0 0", "-1 5", &format!("{me}")] {
            assert!(!lease_owner_alive(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_and_hostnames() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("ins-0123456789abcdef").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert_eq!(hostname_from("Web_Server.1"), "web-server-1");
        assert_eq!(hostname_from("__"), "vmdepot");
        assert!(check_hostname("web-1.example").is_ok());
        for bad in ["", "a b", "-a", "a-", "a..b", "x\ninstance-id: evil"] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
