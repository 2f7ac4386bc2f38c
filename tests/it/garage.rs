//! [`Garage`]: a real 3-node Garage cluster on 127.0.0.1 for a test (the
//! recipe is docs/GARAGE.md): one config, data and metadata directory and
//! process per node in a temp dir, free ports picked per cluster (tests
//! run in parallel), one node per zone `dc1`, `dc2`, `dc3`, replication
//! factor 3, a key and a bucket it may read, write and own. A node can be
//! killed and restarted (a node lost mid-push). Dropped, the cluster's
//! processes are killed (they also die with the test binary: SIGKILL on
//! parent death), and if the test failed, each node's log is printed first.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmdepot::internals::store::{S3Credentials, S3Location, S3Store};

/// The S3 region of the cluster.
pub const REGION: &str = "garage";
/// Nodes in the cluster, one per zone.
const NODES: usize = 3;
/// How long a start or a restart may take before the test fails.
const START_WAIT: Duration = Duration::from_secs(60);

/// The garage binary: `$GARAGE_BIN`, else ~/.cargo/bin/garage (where
/// .ci/setup installs it), else `garage` on the PATH.
fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("GARAGE_BIN") {
        return b.into();
    }
    let cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/garage"));
    cargo
        .filter(|p| p.exists())
        .unwrap_or_else(|| "garage".into())
}

/// One node: its config, its ports, its process while it runs.
struct Node {
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    child: Option<Child>,
}

/// A running 3-node cluster with a bucket and a key (see the module doc).
pub struct Garage {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    /// The bucket the key may read, write and own.
    pub bucket: String,
    /// The access key id.
    pub key_id: String,
    /// The secret access key.
    pub secret: String,
}

impl Garage {
    /// Starts a cluster and waits until it is healthy and its S3 API
    /// answers for the bucket; a start that fails (a port taken by a
    /// test in between) is tried again on other ports.
    pub fn start() -> Garage {
        let (t, mut last) = (Instant::now(), String::new());
        for _ in 0..3 {
            match Garage::try_start() {
                Ok(g) => {
                    eprintln!("garage: 3 nodes up in {:.1?}", t.elapsed());
                    return g;
                }
                Err(e) => last = e,
            }
        }
        panic!("garage did not start: {last}");
    }

    fn try_start() -> Result<Garage, String> {
        let dir = tempfile::tempdir_in(crate::common::scratch()).map_err(|e| e.to_string())?;
        let secret = hex_of(&format!("rpc {:?} {}", Instant::now(), std::process::id()));
        let ports = free_ports(2 * NODES);
        let nodes = (0..NODES)
            .map(|i| Node::configure(dir.path(), i, ports[2 * i], ports[2 * i + 1], &secret))
            .collect::<Result<Vec<_>, _>>()?;
        let key_id = format!("GK{}", &hex_of(&format!("key {:?}", dir.path()))[..24]);
        let mut g = Garage {
            secret: hex_of(&format!("secret {:?} {secret}", dir.path())),
            dir,
            nodes,
            bucket: "vmdepot".into(),
            key_id,
        };
        for i in 0..NODES {
            g.spawn(i)?;
        }
        g.set_up()?;
        Ok(g)
    }

    /// Connects the nodes, applies the layout, makes the key and the
    /// bucket, and waits for them to be served.
    fn set_up(&mut self) -> Result<(), String> {
        let ids = (0..NODES)
            .map(|i| self.node_id(i))
            .collect::<Result<Vec<_>, _>>()?;
        for id in &ids[1..] {
            self.poll(0, || self.cli(0, &["node", "connect", id]))?;
        }
        for (i, id) in ids.iter().enumerate() {
            let zone = format!("dc{}", i + 1);
            let short = &id[..16];
            self.cli(0, &["layout", "assign", "-z", &zone, "-c", "1G", short])?;
        }
        self.cli(0, &["layout", "apply", "--version", "1"])?;
        let (key, secret) = (self.key_id.clone(), self.secret.clone());
        self.cli(
            0,
            &["key", "import", "--yes", "-n", "vmdepot", &key, &secret],
        )?;
        self.cli(0, &["bucket", "create", &self.bucket.clone()])?;
        let bucket = self.bucket.clone();
        let perms = ["--read", "--write", "--owner"];
        self.cli(
            0,
            &[&["bucket", "allow"][..], &perms, &["--key", &key, &bucket]].concat(),
        )?;
        self.wait_ready()
    }

    /// The S3 endpoint of node 0, the one tests talk to.
    pub fn endpoint(&self) -> String {
        self.endpoints()[0].clone()
    }

    /// Every node's S3 endpoint (node 0 first).
    pub fn endpoints(&self) -> Vec<String> {
        let url = |n: &Node| format!("http://127.0.0.1:{}", n.s3_port);
        self.nodes.iter().map(url).collect()
    }

    /// The cluster's bucket at `prefix`, through node 0.
    pub fn location(&self, prefix: &str) -> S3Location {
        S3Location {
            bucket: self.bucket.clone(),
            prefix: prefix.to_owned(),
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_owned()),
        }
    }

    /// The cluster's key.
    pub fn credentials(&self) -> S3Credentials {
        S3Credentials {
            key_id: self.key_id.clone(),
            secret: self.secret.clone(),
            token: None,
        }
    }

    /// A store on the bucket at `prefix`, through node 0.
    pub fn store(&self, prefix: &str) -> S3Store {
        S3Store::open_with(&self.location(prefix), "garage", &self.credentials()).unwrap()
    }

    /// Kills node `i` (SIGKILL) and waits for its end.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again and waits until the cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i).unwrap();
        self.wait_ready().unwrap();
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&node.config).arg("server");
        cmd.env("RUST_LOG", "garage=info").stdout(log).stderr(err);
        // The node dies with the test binary, however that ends.
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e} (run .ci/setup)", binary().display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Runs `garage -c <node i's config> ARGS`; its stdout, or an error
    /// with its stderr.
    fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(binary())
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", binary().display()))?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        match out.status.success() {
            true => Ok(text(&out.stdout)),
            false => Err(format!("garage {args:?}: {}", text(&out.stderr))),
        }
    }

    /// Node `i`'s `ID@127.0.0.1:PORT` (read from its key file, which the
    /// node writes as it starts).
    fn node_id(&self, i: usize) -> Result<String, String> {
        let rpc_port = self.nodes[i].rpc_port;
        self.poll(i, || {
            let id = self.cli(i, &["node", "id", "-q"])?;
            let id = id.lines().last().unwrap_or_default().trim().to_owned();
            match id.split_once('@') {
                Some((hex, _)) if hex.len() == 64 => Ok(format!("{hex}@127.0.0.1:{rpc_port}")),
                _ => Err(format!("node id: {id:?}")),
            }
        })
    }

    /// Waits until every node is up in the layout's view and a listing of
    /// the bucket succeeds through each node's S3 API.
    fn wait_ready(&self) -> Result<(), String> {
        self.poll(0, || {
            let health = self.cli(0, &["json-api", "GetClusterHealth"])?;
            if !health.contains("\"healthy\"") {
                return Err(format!("not healthy yet: {health}"));
            }
            for e in self.endpoints() {
                let loc = S3Location {
                    endpoint: Some(e),
                    ..self.location("")
                };
                let s = S3Store::open_with(&loc, "garage", &self.credentials());
                s.and_then(|s| s.probe()).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }

    /// Calls `f` until it succeeds, for [`START_WAIT`] at most; fails at
    /// once if node `i`'s process ended.
    fn poll<T>(&self, i: usize, f: impl Fn() -> Result<T, String>) -> Result<T, String> {
        let end = Instant::now() + START_WAIT;
        loop {
            let last = match f() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let pid = self.nodes[i].child.as_ref().map(Child::id);
            if pid.is_none_or(|p| !crate::common::alive(p.into())) {
                let log = std::fs::read(&self.nodes[i].log).unwrap_or_default();
                let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(2000)..]);
                return Err(format!("garage node {i} exited: {tail}"));
            }
            if Instant::now() > end {
                return Err(format!("gave up after {START_WAIT:?}: {last}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Node {
    /// Writes node `i`'s config in `dir/n<i>/`.
    fn configure(
        dir: &Path,
        i: usize,
        s3_port: u16,
        rpc_port: u16,
        secret: &str,
    ) -> Result<Node, String> {
        let home = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let config = home.join("garage.toml");
        let text = format!(
            r#"metadata_dir = "{home}/meta"
data_dir = "{home}/data"
db_engine = "lmdb"
lmdb_map_size = "1G"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
            home = home.display()
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        Ok(Node {
            config,
            log: home.join("garage.log"),
            s3_port,
            rpc_port,
            child: None,
        })
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for i in 0..NODES {
            self.kill(i);
            if failed {
                crate::guard::print_tail(&self.nodes[i].log);
            }
        }
        let left = crate::common::procs_naming(&format!("{}/", self.dir.path().display()));
        if !left.is_empty() && !failed {
            panic!("garage processes left running: {left:?}");
        }
    }
}

/// `n` distinct ports free now (held while they are picked).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// 64 hex digits derived from `seed`.
fn hex_of(seed: &str) -> String {
    blake3::hash(seed.as_bytes()).to_hex().to_string()
}
