//! Helpers shared by the integration tests: a fresh depot per test ([`T`],
//! whose drop kills the QEMUs the test started: see `guard.rs`), the real
//! binary, the fixtures (Debian disk images, the tiny test guest).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmdepot")
}

/// A fresh depot in a temp dir. Dropped, it kills every QEMU started in
/// that dir, first printing their logs if the test failed (see `guard.rs`).
pub struct T {
    pub dir: tempfile::TempDir,
    /// The depot's directory name in `dir`.
    name: String,
}

impl Drop for T {
    fn drop(&mut self) {
        crate::guard::reap(self.dir.path(), std::thread::panicking());
    }
}

impl T {
    pub fn new() -> T {
        T::in_dir(tempfile::tempdir_in(scratch()).unwrap(), "depot")
    }
    /// A fresh depot named `name` in its temp dir (instead of `depot`).
    pub fn at(name: &str) -> T {
        T::in_dir(tempfile::tempdir_in(scratch()).unwrap(), name)
    }
    /// The depot `name` in `dir`.
    pub fn in_dir(dir: tempfile::TempDir, name: &str) -> T {
        T {
            dir,
            name: name.to_owned(),
        }
    }
    pub fn depot(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        cmd_in(&self.depot(), args)
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        ok_in(&self.depot(), args)
    }
    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let o = self.run(args);
        assert!(!o.status.success(), "vmdepot {args:?} should have failed");
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(
            err.trim().lines().count(),
            1,
            "one-line error expected: {err}"
        );
        (o.status.code().unwrap(), err)
    }
    /// Runs and asserts the one-line failure of [`T::fails`], with exit
    /// `code` and an error that names `needle`; returns the error.
    pub fn refuses(&self, args: &[&str], code: i32, needle: &str) -> String {
        refused(self.run(args), args, code, needle)
    }
    /// `image import FILE --name NAME -q`, not yet started.
    pub fn import_cmd(&self, file: &Path, name: &str) -> Command {
        self.cmd(&[
            "image",
            "import",
            file.to_str().unwrap(),
            "--name",
            name,
            "-q",
        ])
    }
    /// Starts an import in the background.
    pub fn spawn_import(&self, file: &Path, name: &str) -> std::process::Child {
        self.import_cmd(file, name)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }
    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
    pub fn import(&self, file: &Path, name: &str) -> Value {
        self.json(&[
            "image",
            "import",
            file.to_str().unwrap(),
            "--name",
            name,
            "--json",
            "-q",
        ])
    }
    pub fn stats(&self) -> Value {
        self.json(&["stats", "--json"])
    }
    pub fn assert_fsck_clean(&self) -> Value {
        let r = self.json(&["fsck", "--json"]);
        assert_eq!(r["problems"], Value::Array(vec![]), "fsck: {r}");
        r
    }
    pub fn pack_files(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.depot().join("packs")) {
            for d in rd.flatten() {
                for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                    // pack files only (their `.idx` indexes sit beside them)
                    if f.path().extension().is_some_and(|e| e == "pack") {
                        v.push(f.path());
                    }
                }
            }
        }
        v.sort();
        v
    }
}

/// `vmdepot --depot DEPOT ARGS`, not yet started: a depot other than a
/// [`T`]'s own (another region, one on a test filesystem).
pub fn cmd_in(depot: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("--depot").arg(depot).args(args);
    c.env_remove("VMDEPOT_DIR");
    c
}

/// Runs `vmdepot --depot DEPOT ARGS` to its end.
pub fn run_in(depot: &Path, args: &[&str]) -> Output {
    cmd_in(depot, args).output().unwrap()
}

/// Runs on `depot` and asserts success; returns stdout.
pub fn ok_in(depot: &Path, args: &[&str]) -> String {
    ok_stdout(run_in(depot, args), &format!("vmdepot {args:?}"))
}

/// Runs on `depot`, asserts success, parses stdout as JSON.
pub fn json_in(depot: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&ok_in(depot, args)).unwrap()
}

/// Asserts that `vmdepot ARGS` failed with exit `code` and a one-line
/// error naming `needle`; returns the error.
pub fn refused(o: Output, args: &[&str], code: i32, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "vmdepot {args:?}: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one-line error expected: {err}"
    );
    assert!(
        err.contains(needle),
        "vmdepot {args:?}: {needle:?} not in: {err}"
    );
    err
}

/// Asserts that `what` succeeded; returns its stdout.
pub fn ok_stdout(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The elements of the JSON array `v` (which must be one).
pub fn items(v: &Value) -> &Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("a JSON array expected: {v}"))
}

/// The string `v[key]` (which must be one).
pub fn str_at(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
        .to_owned()
}

/// The `id` of an image or instance object.
pub fn id_of(v: &Value) -> String {
    str_at(v, "id")
}

/// The string `key` of every element of the JSON array `v`.
pub fn strs_at(v: &Value, key: &str) -> Vec<String> {
    items(v).iter().map(|i| str_at(i, key)).collect()
}

/// A tmpfs of `size` (e.g. "1m") mounted on `T::path(name)`, unmounted on
/// drop (also on panic).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts it (needs root).
    pub fn new(t: &T, name: &str, size: &str) -> Tmpfs {
        let mnt = t.path(name);
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs on {}", mnt.display());
        Tmpfs(mnt)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Where test files go (same filesystem as the fixtures cache when possible).
pub fn scratch() -> PathBuf {
    let p = std::env::temp_dir();
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// The Debian disk images A, B, B2 (512 MiB) from fixtures/.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| fixture_script("build-disk-images.sh", &["512M"]))
}

/// The tiny bootable test guest (a raw disk; see fixtures/build-test-guest.sh).
pub fn test_guest() -> &'static Path {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| fixture_script("build-test-guest.sh", &[]))
}

/// The Debian 12 guest (cloud-init, sshd, user `debian`; a raw disk; see
/// fixtures/build-debian-guest.sh, built once and cached).
pub fn debian_guest() -> &'static Path {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| fixture_script("build-debian-guest.sh", &[]))
}

/// The depot in which fixtures/build-debian-guest.sh built the Debian 12
/// guest (`image build debian-12`): the image `debian-12` with its recipe.
/// Tests copy from it; they do not change it.
pub fn debian_depot() -> PathBuf {
    debian_guest().parent().unwrap().join("depot")
}

/// The .deb cache of the fixture's builds (`VMDEPOT_BUILD_CACHE`), so a
/// test's build downloads only what the fixture's did not.
pub fn build_cache() -> PathBuf {
    debian_guest().parent().unwrap().join("debs")
}

/// Runs a fixtures/ script; returns the path it prints.
fn fixture_script(name: &str, args: &[&str]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "fixtures/{name} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The `problems` of an `fsck --json` report.
pub fn problems(fsck: &Value) -> Vec<String> {
    items(&fsck["problems"])
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

/// The raw image `raw` converted to qcow2 at `qcow2`.
pub fn to_qcow2(raw: &Path, qcow2: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
}

/// A raw image with data, zero runs, a hole and a short tail.
pub fn synthetic_raw(path: &Path, mib: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..mib {
        if i % 4 == 3 {
            // leave a hole
            continue;
        }
        for (j, chunk) in buf.chunks_mut(8).enumerate() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // compressible: text-like bytes, with some all-zero 4 KiB blocks
            let v = if (j / 512) % 5 == 0 {
                0
            } else {
                (x >> 33) & 0x3f3f3f3f3f3f3f3f
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        use std::os::unix::fs::FileExt;
        f.write_all_at(&buf, i << 20).unwrap();
    }
    // a short, non-zero tail: the size is not a multiple of 4 KiB
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xa5u8; 1536], mib << 20).unwrap();
}

pub fn same_content(a: &Path, b: &Path) -> bool {
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    if ma.len() != mb.len() {
        return false;
    }
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// What a power cut after an unsynced rename leaves: the name, the size,
/// no blocks (truncate to 0, then extend: a same-size sparse file of zeros).
pub fn lose_data(file: &Path) {
    let size = std::fs::metadata(file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(0).unwrap();
    f.set_len(size).unwrap();
    f.sync_all().unwrap();
    assert_eq!(allocated(file), 0);
}

/// 384 MiB of incompressible noise: an import that takes a while.
pub fn slow_source(t: &T) -> PathBuf {
    let p = t.path("slow.raw");
    write_noise(
        &mut std::fs::File::create(&p).unwrap(),
        384,
        88172645463325252,
    );
    p
}

/// Appends `mib` MiB of incompressible xorshift noise from `seed` (not 0)
/// to `f`: the same seed gives the same bytes (the same chunks).
pub fn write_noise(f: &mut std::fs::File, mib: u64, seed: u64) {
    let mut x = seed;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
}

pub fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Polls `cond` (every 20 ms) until it holds; fails naming `what` after
/// `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "{what}: not after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Generous: a TCG boot takes a few seconds, more with parallel tests.
pub const BOOT: Duration = Duration::from_secs(120);

/// The test guest's serial line once it has read its disk and seed and
/// listens for the power button.
pub const READY: &str = "VMDEPOT-GUEST: ready";

/// The test guest's serial line when it read its own disk.
pub const DISK_MARKER: &str = "VMDEPOT-DISK: vmdepot test guest disk marker 7f3a";

/// Kills the QEMU `pid` (SIGKILL) and waits until it is gone.
pub fn kill_qemu(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the killed QEMU exits", Duration::from_secs(10), || {
        !alive(pid as i64)
    });
}

/// `instance run IMAGE --name NAME`, then waits until the guest is [`READY`].
pub fn boot(t: &T, image: &str, name: &str) {
    t.ok(&["instance", "run", image, "--name", name, "-q"]);
    wait_serial(t, name, READY);
}

/// A depot holding the test guest as image "tiny".
pub fn depot_with_guest() -> T {
    let t = T::new();
    t.import(test_guest(), "tiny");
    t
}

pub fn serial(t: &T, inst: &str) -> String {
    t.ok(&["instance", "logs", inst])
}

/// Waits for a serial console line containing `needle`; returns it.
pub fn wait_serial(t: &T, inst: &str, needle: &str) -> String {
    let log = wait_serial_count(t, inst, needle, 1);
    let line = log.lines().find(|l| l.contains(needle)).unwrap();
    line.trim_end_matches('\r').to_owned()
}

/// Waits until `needle` is `n` times on the serial console (`n` boots,
/// say); returns the log.
pub fn wait_serial_count(t: &T, inst: &str, needle: &str, n: usize) -> String {
    let end = Instant::now() + BOOT;
    loop {
        let log = serial(t, inst);
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(
            Instant::now() < end,
            "{inst}: {needle:?} not {n} times on the serial console after {BOOT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn show(t: &T, inst: &str) -> Value {
    t.json(&["instance", "show", inst, "--json"])
}

/// Processes (other than this one) whose command line names `needle`.
pub fn procs_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            v.push(pid);
        }
    }
    v
}

/// Live lazy disk servers (`vmdepot … disk-server IMG`) of the depot at
/// `dir` or of depots below it (pids).
pub fn disk_servers_in(dir: &Path) -> Vec<i32> {
    let dir = dir.display().to_string();
    let below = format!("{dir}/");
    procs_naming("disk-server")
        .into_iter()
        .filter(|&p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == "disk-server")
                && args.iter().any(|a| *a == dir || a.starts_with(&below))
                && alive(p.into())
        })
        .collect()
}

/// The process lives (and is no zombie).
pub fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// `vmdepot --account WHO …`.
pub fn as_(t: &T, who: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["--account", who];
    a.extend_from_slice(args);
    t.run(&a)
}

pub fn ok_as(t: &T, who: &str, args: &[&str]) -> String {
    ok_stdout(as_(t, who, args), &format!("{who}: {args:?}"))
}

/// Imports the test guest as alice's image `secret` and shares it with bob.
pub fn share_guest_with_bob(t: &T) {
    let g = test_guest().to_str().unwrap();
    ok_as(
        t,
        "alice",
        &["image", "import", g, "--name", "secret", "-q"],
    );
    ok_as(t, "alice", &["image", "share", "secret", "--with", "bob"]);
}

/// `vmdepot --account WHO ARGS`, asserted to succeed, stdout as JSON.
pub fn json_as(t: &T, who: &str, args: &[&str]) -> Value {
    serde_json::from_str(&ok_as(t, who, args)).unwrap()
}

/// `image create --from-instance INST --name NAME` (a capture), then `extra`.
pub fn capture_args<'a>(inst: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["image", "create", "--from-instance", inst, "--name", name];
    a.extend_from_slice(extra);
    a
}

/// Asserts a refusal with `code`; returns the one-line message.
pub fn refused_as(t: &T, who: &str, args: &[&str], code: i32) -> String {
    let o = as_(t, who, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{who}: {args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    err
}
