//! Remote depots through the real binary, on a real 3-node Garage cluster
//! (tests/it/garage.rs): "hosts" are depots with their own catalogs in one
//! temp dir, sharing one remote. Push from one, pull on another; resume
//! after kill -9; concurrent pushes; a remote gc while another host
//! pushes; a node down mid-push; bad credentials, bucket and endpoint.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::garage::{Garage, REGION};
use vmdepot::internals::store::{ObjectKind, ObjectStore};

/// One host: a depot of its own, with the cluster's credentials in the
/// environment of every command it runs.
struct Host {
    depot: PathBuf,
    env: Vec<(String, String)>,
}

impl Host {
    fn new(t: &T, g: &Garage, name: &str) -> Host {
        let h = Host {
            depot: t.path(name),
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), g.key_id.clone()),
                ("AWS_SECRET_ACCESS_KEY".into(), g.secret.clone()),
            ],
        };
        let url = format!("s3://{}", g.bucket);
        h.ok(&[
            "remote",
            "add",
            "r",
            &url,
            "--endpoint",
            &g.endpoint(),
            "--region",
            REGION,
        ]);
        h
    }

    /// The same depot with one more environment variable.
    fn with_env(mut self, k: &str, v: &str) -> Host {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = cmd_in(&self.depot, args);
        c.env("AWS_REGION", REGION)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        ok_stdout(self.run(args), &format!("vmdepot {args:?}"))
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs and asserts a one-line failure with `code` naming `needle`.
    fn refuses(&self, args: &[&str], code: i32, needle: &str) -> String {
        refused(self.run(args), args, code, needle)
    }

    fn import(&self, file: &std::path::Path, name: &str) {
        self.ok(&[
            "image",
            "import",
            file.to_str().unwrap(),
            "--name",
            name,
            "-q",
        ]);
    }

    fn push(&self, image: &str) -> Value {
        self.json(&["image", "push", image, "r", "--json", "-q"])
    }

    fn pull(&self, image: &str) -> Value {
        self.json(&["image", "pull", &format!("r:{image}"), "--json", "-q"])
    }

    fn digest(&self, image: &str) -> String {
        str_at(
            &self.json(&["image", "show", image, "--json"]),
            "content_digest",
        )
    }

    fn remote_names(&self) -> Vec<String> {
        let mut v = strs_at(
            &self.json(&["image", "list", "--remote", "r", "--json"]),
            "name",
        );
        v.sort();
        v
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn export_same(h: &Host, image: &str, original: &std::path::Path, t: &T) {
    let out = t.path(&format!("{image}.out"));
    h.ok(&["image", "export", image, out.to_str().unwrap(), "-q"]);
    assert!(same_content(&out, original), "{image}: the export differs");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn push_on_one_host_pull_on_another() {
    let t = T::new();
    let g = Garage::start();
    let (h1, h2) = (Host::new(&t, &g, "h1"), Host::new(&t, &g, "h2"));
    let (a, b) = (fixtures().join("A.raw"), fixtures().join("B.raw"));
    h1.import(&a, "a");
    h1.import(&b, "b");

    let pa = h1.push("a");
    assert_eq!(u(&pa, "chunks_present"), 0, "{pa}");
    assert_eq!(u(&pa, "chunks_sent"), u(&pa, "chunks"), "{pa}");
    assert!(u(&pa, "bytes_sent") > 0);
    // B is A changed in place: it sends fewer than 10% of its chunks
    let pb = h1.push("b");
    assert_eq!(
        u(&pb, "chunks_present") + u(&pb, "chunks_sent"),
        u(&pb, "chunks")
    );
    assert!(u(&pb, "chunks_sent") * 10 < u(&pb, "chunks"), "{pb}");
    // pushing again sends nothing
    let again = h1.push("b");
    assert_eq!(u(&again, "chunks_sent"), 0, "{again}");
    assert_eq!(h1.remote_names(), ["a", "b"]);

    // the other host: A into an empty depot, then B fetches only what A lacks
    let la = h2.pull("a");
    assert_eq!(u(&la, "chunks_fetched"), u(&la, "chunks"), "{la}");
    let lb = h2.pull("b");
    assert!(u(&lb, "chunks_fetched") * 10 < u(&lb, "chunks"), "{lb}");
    for (name, file) in [("a", &a), ("b", &b)] {
        assert_eq!(h2.digest(name), h1.digest(name), "{name}");
        export_same(&h2, name, file, &t);
    }
    let shown = h2.json(&["image", "show", "a", "--json"]);
    assert!(
        str_at(&shown, "copied_from").starts_with("remote:r "),
        "{shown}"
    );
    h2.ok(&["image", "verify", "r:a", "-q"]);
    h2.ok(&["fsck", "-q"]);

    // delete on the remote: gone from its listing, the local copies stay
    h2.ok(&["image", "delete", "r:a"]);
    assert_eq!(h1.remote_names(), ["b"]);
    h2.ok(&["image", "show", "a"]);
}

#[test]
fn a_push_killed_with_sigkill_leaves_nothing_visible_and_resumes() {
    let t = T::new();
    let g = Garage::start();
    let (h1, h2) = (Host::new(&t, &g, "h1"), Host::new(&t, &g, "h2"));
    let big = t.path("big.raw");
    // incompressible enough for several packs
    synthetic_raw(&big, 300, 7);
    h1.import(&big, "big");
    let mut c = h1.spawn(&["image", "push", "big", "r", "-q"]);
    // kill it once a pack index is on the remote (a pack has arrived)
    let end = Instant::now() + Duration::from_secs(120);
    let store = g.store("");
    while store.list(ObjectKind::PackIndex).unwrap().is_empty() {
        assert!(
            c.try_wait().unwrap().is_none(),
            "the push ended before it could be killed"
        );
        assert!(Instant::now() < end, "no pack reached the remote");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill().unwrap();
    assert!(!c.wait().unwrap().success());
    assert!(
        h2.remote_names().is_empty(),
        "a killed push left an image visible"
    );
    let rep = h1.push("big");
    assert!(
        u(&rep, "chunks_present") > 0,
        "the resumed push sent everything again: {rep}"
    );
    assert_eq!(
        u(&rep, "chunks_present") + u(&rep, "chunks_sent"),
        u(&rep, "chunks")
    );
    h2.pull("big");
    export_same(&h2, "big", &big, &t);
}

#[test]
fn concurrent_pushes_of_related_images_both_land_and_dedup() {
    let t = T::new();
    let g = Garage::start();
    let (h1, h2, h3) = (
        Host::new(&t, &g, "h1"),
        Host::new(&t, &g, "h2"),
        Host::new(&t, &g, "h3"),
    );
    let (a, b) = (fixtures().join("A.raw"), fixtures().join("B.raw"));
    h1.import(&a, "a");
    h2.import(&b, "b");
    let c1 = h1.spawn(&["image", "push", "a", "r", "--json", "-q"]);
    let c2 = h2.spawn(&["image", "push", "b", "r", "--json", "-q"]);
    for c in [c1, c2] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(h3.remote_names(), ["a", "b"]);
    // a later push finds what both stored
    h3.import(&fixtures().join("B2.raw"), "b2");
    let p = h3.push("b2");
    assert!(u(&p, "chunks_present") > 0, "{p}");
    for (name, file) in [("a", &a), ("b", &b)] {
        h3.ok(&["image", "verify", &format!("r:{name}"), "-q"]);
        h3.pull(name);
        export_same(&h3, name, file, &t);
    }
}

#[test]
fn remote_gc_while_another_host_pushes_keeps_every_image_whole() {
    let t = T::new();
    let g = Garage::start();
    // (a push must finish within half the grace: 3 s on a loaded machine)
    let grace = "6";
    let h1 = Host::new(&t, &g, "h1").with_env("VMDEPOT_REMOTE_GRACE_SECS", grace);
    let h2 = Host::new(&t, &g, "h2").with_env("VMDEPOT_REMOTE_GRACE_SECS", grace);
    let h3 = Host::new(&t, &g, "h3").with_env("VMDEPOT_REMOTE_GRACE_SECS", grace);
    let (x, y) = (t.path("x.raw"), t.path("y.raw"));
    synthetic_raw(&x, 40, 1);
    synthetic_raw(&y, 40, 2);
    // x's short tail differs from y's, so that x shares no chunk with y
    // and its packs die whole when it is deleted (a remote is not repacked)
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&x).unwrap();
    f.write_all_at(&[0x5a; 1536], 40 << 20).unwrap();
    h1.import(&x, "x");
    h1.import(&y, "y");
    h1.push("x");
    h1.push("y");
    h1.ok(&["image", "delete", "r:x"]);
    std::thread::sleep(Duration::from_secs(7)); // x's packs are older than the grace
                                                // h3 pushes while h2 collects, twice (retire, then purge after the grace)
    let z = t.path("z.raw");
    synthetic_raw(&z, 120, 3);
    h3.import(&z, "z");
    let push = h3.spawn(&["image", "push", "z", "r", "--json", "-q"]);
    let g1 = h2.json(&["gc", "--remote", "r", "--json"]);
    assert!(u(&g1, "packs_retired") > 0, "{g1}");
    std::thread::sleep(Duration::from_secs(7));
    let g2 = h2.json(&["gc", "--remote", "r", "--json"]);
    assert!(u(&g2, "packs_purged") > 0, "{g2}");
    let o = push.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    h2.json(&["gc", "--remote", "r", "--json"]);
    assert_eq!(h2.remote_names(), ["y", "z"]);
    for name in ["y", "z"] {
        h2.ok(&["image", "verify", &format!("r:{name}"), "-q"]);
    }
    h2.pull("z");
    export_same(&h2, "z", &z, &t);
}

#[test]
fn a_push_survives_a_node_going_down() {
    let t = T::new();
    let mut g = Garage::start();
    let h1 = Host::new(&t, &g, "h1");
    let big = t.path("big.raw");
    synthetic_raw(&big, 300, 9);
    h1.import(&big, "big");
    let mut c = h1.spawn(&["image", "push", "big", "r", "--json", "-q"]);
    // the node dies mid-push: once a first pack has arrived, before the end
    let store = g.store("");
    let end = Instant::now() + Duration::from_secs(120);
    while store.list(ObjectKind::PackIndex).unwrap().is_empty() {
        assert!(Instant::now() < end, "no pack reached the remote");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        c.try_wait().unwrap().is_none(),
        "the push ended before the node could be killed"
    );
    g.kill(2);
    let o = c.wait_with_output().unwrap();
    if !o.status.success() {
        // a clear one-line error, and a re-run completes once the node is back
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("remote r"), "{err}");
        g.restart(2);
        h1.push("big");
    } else {
        g.restart(2);
    }
    let h2 = Host::new(&t, &g, "h2");
    h2.pull("big");
    export_same(&h2, "big", &big, &t);
}

#[test]
fn bad_credentials_bucket_and_endpoint_each_fail_in_one_line() {
    let t = T::new();
    let g = Garage::start();
    let h = Host::new(&t, &g, "h");
    let x = t.path("x.raw");
    synthetic_raw(&x, 4, 1);
    h.import(&x, "x");
    let wrong = Host {
        depot: h.depot.clone(),
        env: h.env.clone(),
    }
    .with_env("AWS_SECRET_ACCESS_KEY", &"0".repeat(64));
    wrong.refuses(&["image", "push", "x", "r"], 8, "remote r");
    let ep = g.endpoint();
    h.refuses(
        &[
            "remote",
            "add",
            "nob",
            "s3://no-such-bucket",
            "--endpoint",
            &ep,
        ],
        8,
        "no-such-bucket",
    );
    h.refuses(
        &[
            "remote",
            "add",
            "down",
            "s3://b",
            "--endpoint",
            "http://127.0.0.1:9",
        ],
        8,
        "127.0.0.1:9",
    );
    // nothing secret in the config, which only its owner reads
    let cfg = h.depot.join("remotes/r.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.contains(&g.secret));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn instance_run_from_a_remote_pulls_then_boots() {
    let t = T::new();
    let g = Garage::start();
    let (h1, h2) = (Host::new(&t, &g, "h1"), Host::new(&t, &g, "h2"));
    h1.import(test_guest(), "tiny");
    h1.push("tiny");
    h2.ok(&[
        "instance", "run", "r:tiny", "--name", "vm", "--accel", "tcg", "--disk", "overlay", "-q",
    ]);
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let log = h2.ok(&["instance", "logs", "vm"]);
        if log.contains(READY) {
            break;
        }
        assert!(Instant::now() < end, "the guest did not boot:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // a second run reuses the pulled copy
    let before = items(&h2.json(&["image", "list", "--json"])).len();
    h2.ok(&[
        "instance", "run", "r:tiny", "--name", "vm2", "--accel", "tcg", "-q",
    ]);
    assert_eq!(items(&h2.json(&["image", "list", "--json"])).len(), before);
    for vm in ["vm", "vm2"] {
        h2.ok(&["instance", "delete", vm, "--force"]);
    }
}

impl Host {
    /// Waits for `needle` in the serial log of instance `vm`; returns the log.
    fn wait_log(&self, vm: &str, needle: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let log = self.ok(&["instance", "logs", vm]);
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < end, "no {needle:?} from {vm}:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes `line` to the guest's serial console (its console socket).
    fn console_line(&self, vm: &str, line: &str) {
        use std::io::Write;
        let sock = str_at(
            &self.json(&["instance", "show", vm, "--json"]),
            "console_socket",
        );
        let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
        c.write_all(format!("{line}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The guest's md5 of its disk's /noise.bin (a 4 MiB file nothing
    /// reads at boot), or its error: the `n`th answer in its log.
    fn read_noise(&self, vm: &str, n: usize) -> String {
        self.console_line(vm, "VMDEPOT-READ-NOISE");
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let log = self.ok(&["instance", "logs", vm]);
            let answers: Vec<&str> = log
                .lines()
                .filter_map(|l| l.trim().strip_prefix("VMDEPOT-NOISE: "))
                .collect();
            if answers.len() >= n {
                return answers[n - 1].to_owned();
            }
            assert!(Instant::now() < end, "no answer {n} from {vm}:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn image_state(&self, image: &str) -> (String, String) {
        let v = self.json(&["image", "show", image, "--json"]);
        (str_at(&v, "state"), str_at(&v, "id"))
    }
}

fn noise_md5() -> String {
    let p = test_guest().parent().unwrap().join("noise.md5");
    std::fs::read_to_string(p).unwrap().trim().to_owned()
}

#[test]
fn a_lazy_run_from_a_remote_fetches_what_the_guest_reads_and_a_pull_completes_it() {
    let t = T::new();
    let g = Garage::start();
    let (h1, h2) = (Host::new(&t, &g, "h1"), Host::new(&t, &g, "h2"));
    h1.import(test_guest(), "tiny");
    let pushed = h1.push("tiny");
    let stored = u(&pushed, "bytes_sent");
    // lazy is the default: no pull, a partial image, the guest boots
    h2.ok(&[
        "instance", "run", "r:tiny", "--name", "vm", "--accel", "tcg", "-q",
    ]);
    let (state, id) = h2.image_state("tiny");
    assert_eq!(state, "partial");
    let log = h2.wait_log("vm", READY, Duration::from_secs(120));
    assert!(log.contains(DISK_MARKER), "{log}");
    let shown = h2.json(&["instance", "show", "vm", "--json"]);
    let at_boot = u(&shown, "remote_bytes_fetched");
    assert!(
        at_boot > 0 && at_boot < stored,
        "fetched {at_boot} of {stored} stored bytes"
    );
    assert!(shown["disk_error"].is_null(), "{shown}");
    // what it reads later is fetched then, checked: the file's own bytes
    assert_eq!(h2.read_noise("vm", 1), noise_md5());
    let later = u(
        &h2.json(&["instance", "show", "vm", "--json"]),
        "remote_bytes_fetched",
    );
    assert!(later > at_boot, "{later} <= {at_boot}");
    // what was fetched is the partial image's share of the store
    let img = h2.json(&["image", "show", "tiny", "--json"]);
    assert!(u(&img, "unique_stored_bytes") > 0, "{img}");
    // other commands refuse it and say how to complete it: by the remote
    // image's id, which a local rename does not change
    let hint = format!("image pull r:{}", h1.image_state("tiny").1);
    let x = t.path("x");
    let x = x.to_str().unwrap();
    h2.refuses(&["image", "export", "tiny", x], 1, &hint);
    h2.ok(&["image", "update", "tiny", "--name", "tiny-local"]);
    h2.refuses(&["image", "export", "tiny-local", x], 1, &hint);
    h2.ok(&["image", "update", "tiny-local", "--name", "tiny"]);
    // a second run uses the same partial image
    h2.ok(&[
        "instance", "run", "r:tiny", "--name", "vm2", "--accel", "tcg", "-q",
    ]);
    h2.wait_log("vm2", READY, Duration::from_secs(120));
    assert_eq!(items(&h2.json(&["image", "list", "--json"])).len(), 1);
    // gc keeps what was fetched; a pull completes the same image in place
    h2.ok(&["gc"]);
    assert_eq!(h2.read_noise("vm2", 1), noise_md5());
    let pull = h2.pull("tiny");
    assert!(u(&pull, "bytes_fetched") < stored, "{pull}");
    assert_eq!(h2.image_state("tiny"), ("available".into(), id));
    assert_eq!(h2.digest("tiny"), h1.digest("tiny"));
    export_same(&h2, "tiny", test_guest(), &t);
    for vm in ["vm", "vm2"] {
        h2.ok(&["instance", "delete", vm, "--force"]);
    }
    let fsck = h2.json(&["fsck", "--json"]);
    assert!(problems(&fsck).is_empty(), "{fsck}");

    // --prefetch: the disk server fetches the rest; the image completes
    let h3 = Host::new(&t, &g, "h3");
    h3.ok(&[
        "instance",
        "run",
        "r:tiny",
        "--name",
        "p",
        "--accel",
        "tcg",
        "--prefetch",
        "-q",
    ]);
    let end = Instant::now() + Duration::from_secs(120);
    while h3.image_state("tiny").0 != "available" {
        assert!(
            Instant::now() < end,
            "the prefetch did not complete the image"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    h3.wait_log("p", READY, Duration::from_secs(120));
    assert_eq!(h3.read_noise("p", 1), noise_md5());
    assert_eq!(h3.digest("tiny"), h1.digest("tiny"));
    h3.ok(&["instance", "delete", "p", "--force"]);
}

#[test]
fn losing_the_remote_under_a_lazy_guest_is_an_io_error_never_a_hang() {
    let t = T::new();
    let mut g = Garage::start();
    let (h1, h2) = (Host::new(&t, &g, "h1"), Host::new(&t, &g, "h2"));
    h1.import(test_guest(), "tiny");
    h1.push("tiny");
    h2.ok(&[
        "instance", "run", "r:tiny", "--name", "vm", "--accel", "tcg", "-q",
    ]);
    h2.wait_log("vm", READY, Duration::from_secs(120));
    // the node the remote's endpoint names goes away
    g.kill(0);
    let answer = h2.read_noise("vm", 1);
    assert!(answer.starts_with("failed"), "the guest read {answer:?}");
    let started = Instant::now();
    let shown = h2.json(&["instance", "show", "vm", "--json"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "instance show hung"
    );
    assert_eq!(shown["state"], "running");
    let err = str_at(&shown, "disk_error");
    assert!(
        err.contains("remote r") && err.contains("I/O error"),
        "{err}"
    );
    let log = h2.ok(&["instance", "logs", "vm"]);
    assert!(log.contains("vmdepot: disk read failed"), "{log}");
    // the remote back: the next read is fetched
    g.restart(0);
    let end = Instant::now() + Duration::from_secs(60);
    let mut n = 2;
    loop {
        if h2.read_noise("vm", n) == noise_md5() {
            break;
        }
        assert!(
            Instant::now() < end,
            "the remote came back, the read still fails"
        );
        n += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let shown = h2.json(&["instance", "show", "vm", "--json"]);
    assert!(shown["disk_error"].is_null(), "the remote is back: {shown}");
    h2.ok(&["instance", "delete", "vm", "--force"]);
}

#[test]
fn remote_add_refuses_foreign_objects_nested_prefixes_and_secrets() {
    let t = T::new();
    let g = Garage::start();
    let h = Host {
        depot: t.path("h"),
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), g.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), g.secret.clone()),
        ],
    };
    let ep = g.endpoint();
    let b = &g.bucket;
    let add = |name: &str, url: &str| -> Vec<String> {
        [
            "remote",
            "add",
            name,
            url,
            "--endpoint",
            &ep,
            "--region",
            REGION,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let refuses = |name: &str, url: &str, needle: &str| {
        let args = add(name, url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.refuses(&args, 8, needle);
    };
    g.store("plain")
        .put(ObjectKind::Meta, "backup.tar", b"not ours")
        .unwrap();
    refuses("pl", &format!("s3://{b}/plain"), "plain/backup.tar");
    let prod = format!("s3://{b}/prod");
    let args = add("r", &prod);
    h.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let x = t.path("x.raw");
    synthetic_raw(&x, 4, 1);
    h.import(&x, "x");
    h.push("x");
    // the bucket's root holds another remote's prefix
    refuses("root", &format!("s3://{b}"), "no vmdepot remote's object");
    // prefixes inside the remote, holding its objects or empty
    refuses("inpacks", &format!("{prod}/packs"), "inside the remote");
    refuses("sub", &format!("{prod}/new"), "inside the remote");
    // user info in the endpoint: refused as a usage error, never echoed
    let secret_ep = ep.replacen("://", &format!("://{}:{}@", g.key_id, g.secret), 1);
    let e = h.refuses(
        &["remote", "add", "cr", &prod, "--endpoint", &secret_ep],
        2,
        "user info",
    );
    assert!(!e.contains(&g.secret), "{e}");
    // a second host joins the remote
    let h2 = Host {
        depot: t.path("h2"),
        env: h.env.clone(),
    };
    h2.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(h2.remote_names(), ["x"]);
}
