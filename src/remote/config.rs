//! The remotes this depot knows: [`RemoteInfo`] (one remote's
//! configuration, as `remote list` shows it), and the [`Depot`] methods
//! that add, list, remove and open remotes. Each is one file,
//! `DEPOT/remotes/NAME.json` (mode 0600 even in a group depot: it names a
//! bucket and an endpoint, never a secret; credentials come from the
//! environment or the shared credentials file), beside the remote's cache
//! directory `DEPOT/remotes/NAME/` (docs/FORMAT.md, "Remote depots").
//!
//! Adding a remote checks the prefix it names: an empty one gets the
//! remote's marker object (`VMDEPOT`), one with a valid marker is taken as
//! it is, anything else is refused (another program's objects, or another
//! format). Config files and markers are read as hostile input: bounded in
//! size, and a bad one is an error naming the file or object.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Remote;
use crate::depot::{Depot, Timestamp};
use crate::error::{Error, IoContext, Result};
use crate::ids::random_hex;
use crate::store::{ObjectKind, ObjectStore, Patience, S3Location, S3Store};

/// The remote's marker object: what `remote add` writes on an empty prefix.
pub const REMOTE_MARKER: &str = "VMDEPOT";
/// The `format` a remote's marker names.
const MARKER_FORMAT: &str = "vmdepot remote";
/// The marker version this vmdepot writes and reads.
const MARKER_VERSION: u64 = 1;
/// The largest config file or marker read (they are a few hundred bytes).
const MAX_SMALL_OBJECT: u64 = 64 * 1024;

/// How many keys of a new remote's prefix are checked for foreign objects.
const FOREIGN_SAMPLE: usize = 100;

/// One configured remote (`remote list --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemoteInfo {
    /// Its name on this host (`[a-z0-9][a-z0-9_-]{0,62}`).
    pub name: String,
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// The S3 endpoint URL (none: the AWS default for the region).
    pub endpoint: Option<String>,
    /// The S3 region (none: the client's default).
    pub region: Option<String>,
    /// When it was added.
    pub added_at: Timestamp,
}

/// `DEPOT/remotes/NAME.json`, as written.
#[derive(Serialize, Deserialize)]
struct ConfigFile {
    name: String,
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    /// Unix seconds.
    added_at: i64,
}

/// The remote's marker object, as written.
#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u64,
    #[serde(default)]
    created_at: i64,
}

/// Refuses a remote name that is not `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn check_remote_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && matches!(b[0], b'a'..=b'z' | b'0'..=b'9')
        && b.iter()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "invalid remote name {name:?}: use 1-63 characters a-z, 0-9, '_' and '-', starting with a letter or digit"
        )))
    }
}

impl ConfigFile {
    fn info(self) -> RemoteInfo {
        RemoteInfo {
            name: self.name,
            url: self.url,
            endpoint: self.endpoint,
            region: self.region,
            added_at: Timestamp::from_unix(self.added_at),
        }
    }
}

impl Depot {
    /// `DEPOT/remotes`.
    fn remotes_dir(&self) -> PathBuf {
        self.root().join("remotes")
    }

    /// `DEPOT/remotes/NAME.json`.
    fn remote_config_path(&self, name: &str) -> PathBuf {
        self.remotes_dir().join(format!("{name}.json"))
    }

    /// Adds a remote called `name`: the S3 bucket (and prefix) of `url`
    /// (`s3://BUCKET[/PREFIX]`) at `endpoint`, in `region`. The remote is
    /// opened and probed with this host's credentials first, and its
    /// prefix checked (see the module doc); refused for a name in use.
    pub fn add_remote(
        &self,
        name: &str,
        url: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<RemoteInfo> {
        check_remote_name(name)?;
        self.check_name_free(name)?;
        if let Some(e) = endpoint {
            check_endpoint(e)?;
        }
        let mut loc = S3Location::parse_url(url)?;
        loc.endpoint = endpoint.map(str::to_owned);
        loc.region = region.map(str::to_owned);
        let store = S3Store::open(&loc, name)?;
        store.probe()?;
        check_not_nested(&loc, name, url)?;
        if let Some(k) = store
            .foreign_keys(FOREIGN_SAMPLE, &[REMOTE_MARKER, super::GC_LOCK])?
            .first()
        {
            return Err(remote_error(
                name,
                format!(
                    "{url} holds s3://{}/{} which is no vmdepot remote's object: a remote's prefix holds nothing else (nor another remote); use an empty prefix (s3://BUCKET/PREFIX)",
                    loc.bucket,
                    crate::error::one_line(k)
                ),
            ));
        }
        self.add_remote_on(name, url, endpoint, region, &store)
    }

    /// [`Depot::add_remote`] on a store already opened.
    pub(crate) fn add_remote_on(
        &self,
        name: &str,
        url: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
        store: &dyn ObjectStore,
    ) -> Result<RemoteInfo> {
        check_remote_name(name)?;
        self.check_name_free(name)?;
        self.check_no_local_names(name)?;
        ensure_marker(store, name, url)?;
        let cfg = ConfigFile {
            name: name.to_owned(),
            url: url.to_owned(),
            endpoint: endpoint.map(str::to_owned),
            region: region.map(str::to_owned),
            added_at: crate::catalog::now(),
        };
        self.write_config(&cfg)?;
        Ok(cfg.info())
    }

    /// Refuses a remote name this depot has already.
    fn check_name_free(&self, name: &str) -> Result<()> {
        if self.remote_config_path(name).exists() {
            return Err(name_in_use(name));
        }
        Ok(())
    }

    /// Writes a new config file, mode 0600: in full under a temporary
    /// name, fsynced, then hard-linked to its name (a link never replaces:
    /// of two adds of one name, the first wins).
    fn write_config(&self, cfg: &ConfigFile) -> Result<()> {
        let dir = self.remotes_dir();
        self.perms().mkdir_all(&dir)?;
        let path = self.remote_config_path(&cfg.name);
        let tmp = dir.join(format!(".{}.json.tmp-{}", cfg.name, random_hex(8)));
        let bytes = serde_json::to_vec_pretty(cfg).expect("a remote's config is serialisable");
        let written =
            write_private(&tmp, &bytes).and_then(|()| match std::fs::hard_link(&tmp, &path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Err(name_in_use(&cfg.name))
                }
                r => r.at(&path),
            });
        drop(std::fs::remove_file(&tmp));
        written?;
        crate::store::sync_dir(&dir)
    }

    /// The remotes configured, by name.
    pub fn remotes(&self) -> Result<Vec<RemoteInfo>> {
        let dir = self.remotes_dir();
        let rd = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            r => r.at(&dir)?,
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.at(&dir)?;
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if check_remote_name(name).is_ok() {
                out.push(self.read_config(name)?.info());
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One remote's configuration.
    pub fn remote_info(&self, name: &str) -> Result<RemoteInfo> {
        Ok(self.read_config(name)?.info())
    }

    /// Reads and checks a config file (hostile: bounded, and its name must
    /// be the file's).
    fn read_config(&self, name: &str) -> Result<ConfigFile> {
        check_remote_name(name)?;
        let path = self.remote_config_path(name);
        let bytes = match read_bounded(&path) {
            Err(Error::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(unknown_remote(name));
            }
            r => r?,
        };
        let bad = |why: String| {
            Error::Invalid(format!(
                "{}: {why}: fix the file, or `vmdepot remote remove {name}` and add the remote again",
                path.display()
            ))
        };
        let cfg: ConfigFile = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("not a remote's config ({e})")))?;
        if cfg.name != name {
            return Err(bad(format!("it names remote {:?}", cfg.name)));
        }
        Ok(cfg)
    }

    /// Forgets a remote: its config file and its cache directory. Nothing
    /// on the remote changes.
    pub fn remove_remote(&self, name: &str) -> Result<RemoteInfo> {
        let info = self.read_config(name)?.info();
        let cache = self.remotes_dir().join(name);
        match std::fs::remove_dir_all(&cache) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&cache, e)),
            _ => {}
        }
        let path = self.remote_config_path(name);
        std::fs::remove_file(&path).at(&path)?;
        Ok(info)
    }

    /// Opens a configured remote (its S3 store, with this host's
    /// credentials; its index cache under the depot).
    pub fn remote(&self, name: &str) -> Result<Remote> {
        self.remote_patient(name, Patience::Batch)
    }

    /// [`Depot::remote`] whose requests have `patience` (a lazy disk
    /// server's are [`Patience::Interactive`]: a guest waits for them).
    pub(crate) fn remote_patient(&self, name: &str, patience: Patience) -> Result<Remote> {
        let cfg = self.read_config(name)?;
        let mut loc = S3Location::parse_url(&cfg.url)?;
        loc.endpoint = cfg.endpoint;
        loc.region = cfg.region;
        let store = S3Store::open_patient(&loc, name, patience)?;
        check_opened(&store, name, &cfg.url)?;
        Ok(self.remote_on(name, Arc::new(store)))
    }

    /// A remote called `name` over `store`, cached under this depot.
    pub(crate) fn remote_on(&self, name: &str, store: Arc<dyn ObjectStore>) -> Remote {
        Remote::new(name, store, self.remotes_dir().join(name), self.perms())
    }

    /// Refuses a local image name `R:...` where `R` is a configured
    /// remote: every command would read it as the remote's image (the
    /// rule of [`Depot::remote_reference`]), so such a local image could
    /// never be named. `remote add` refuses the converse.
    pub fn check_local_name(&self, name: &str) -> Result<()> {
        match self.remote_reference(name) {
            Some((remote, _)) => Err(Error::Usage(format!(
                "the image name {:?} starts with \"{remote}:\", the name of a configured remote: `{remote}:IMAGE` always means remote {remote}'s image; pick another --name",
                crate::error::one_line(name)
            ))),
            None => Ok(()),
        }
    }

    /// Refuses a new remote name `R` when local images named `R:...`
    /// exist: they would become unreachable by name.
    fn check_no_local_names(&self, name: &str) -> Result<()> {
        let prefix = format!("{name}:");
        let rows = crate::catalog::list_images(&self.repo.conn)?;
        match rows.iter().find(|r| r.name.starts_with(&prefix)) {
            Some(r) => Err(Error::Usage(format!(
                "the local image {:?} ({}) has a name starting with \"{prefix}\": with a remote named {name}, `{prefix}IMAGE` would mean the remote's image; rename it (`vmdepot image update {} --name NEW`) or pick another remote name",
                crate::error::one_line(&r.name),
                r.id,
                r.id
            ))),
            None => Ok(()),
        }
    }

    /// `REMOTE:IMAGE` split into the remote's name and the image
    /// reference, when the part before the first `:` is the name of a
    /// configured remote (image names may hold `:` too: any other
    /// reference is a local image's).
    pub fn remote_reference<'a>(&self, reference: &'a str) -> Option<(&'a str, &'a str)> {
        let (remote, image) = reference.split_once(':')?;
        let known = check_remote_name(remote).is_ok() && self.remote_config_path(remote).is_file();
        known.then_some((remote, image))
    }
}

/// The error for a remote name this depot has already.
fn name_in_use(name: &str) -> Error {
    Error::Invalid(format!(
        "a remote named {name:?} exists already: `vmdepot remote remove {name}` first, or pick another name"
    ))
}

/// The error for a remote name not configured here.
fn unknown_remote(name: &str) -> Error {
    Error::RemoteNotFound(format!(
        "no remote named {name:?}: see `vmdepot remote list`; `vmdepot remote add {name} s3://BUCKET[/PREFIX] --endpoint URL` adds it"
    ))
}

/// Writes a new file of mode 0600 (whatever the depot's file mode) and
/// fsyncs it.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .at(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// A small file, refused past [`MAX_SMALL_OBJECT`] bytes.
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).at(path)?;
    let mut bytes = Vec::new();
    f.take(MAX_SMALL_OBJECT + 1)
        .read_to_end(&mut bytes)
        .at(path)?;
    if bytes.len() as u64 > MAX_SMALL_OBJECT {
        return Err(Error::Invalid(format!(
            "{}: over {MAX_SMALL_OBJECT} bytes: not a remote's config; remove it",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Checks the prefix a new remote names: writes the marker on an empty
/// one, accepts a valid marker, refuses anything else.
fn ensure_marker(store: &dyn ObjectStore, name: &str, url: &str) -> Result<()> {
    if let Some(m) = read_marker(store, name, url)? {
        return check_marker(&m, store, name, url);
    }
    for kind in ObjectKind::ALL {
        if let Some(o) = store.list(kind)?.first() {
            return Err(remote_error(
                name,
                format!(
                    "{url} holds objects ({}) but no {REMOTE_MARKER} marker: it is not a vmdepot remote; use an empty prefix (s3://BUCKET/PREFIX)",
                    store.label(kind, &o.name)
                ),
            ));
        }
    }
    let marker = Marker {
        format: MARKER_FORMAT.to_owned(),
        version: MARKER_VERSION,
        created_at: crate::catalog::now(),
    };
    let bytes = serde_json::to_vec(&marker).expect("a marker is serialisable");
    if let Err(e) = store.put(ObjectKind::Meta, REMOTE_MARKER, &bytes) {
        // Another host added the same prefix at once: its marker will do.
        match read_marker(store, name, url)? {
            Some(m) => return check_marker(&m, store, name, url),
            None => return Err(e),
        }
    }
    Ok(())
}

/// The prefix's marker, if it has one (hostile: bounded, must parse).
fn read_marker(store: &dyn ObjectStore, name: &str, url: &str) -> Result<Option<Marker>> {
    let label = store.label(ObjectKind::Meta, REMOTE_MARKER);
    match store.stat(ObjectKind::Meta, REMOTE_MARKER)? {
        None => return Ok(None),
        Some(n) if n > MAX_SMALL_OBJECT => {
            return Err(remote_error(
                name,
                format!(
                "{label}: {n} bytes: not a vmdepot remote's marker; {url} is not a vmdepot remote"
            ),
            ))
        }
        Some(_) => {}
    }
    let Some(bytes) = store.get(ObjectKind::Meta, REMOTE_MARKER)? else {
        return Ok(None);
    };
    parse_marker(&bytes, &label, name, url).map(Some)
}

/// A marker's bytes read (hostile: bounded, must parse).
fn parse_marker(bytes: &[u8], label: &str, name: &str, url: &str) -> Result<Marker> {
    if bytes.len() as u64 > MAX_SMALL_OBJECT {
        return Err(remote_error(
            name,
            format!(
                "{label}: {} bytes: not a vmdepot remote's marker; {url} is not a vmdepot remote",
                bytes.len()
            ),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        remote_error(
            name,
            format!("{label}: not a vmdepot remote's marker ({e}); {url} is not a vmdepot remote: use an empty prefix"),
        )
    })
}

/// Checks the marker of a configured remote being opened (one GET): every
/// command that uses a remote refuses one whose marker is gone, of
/// another format, or of a newer version than this vmdepot reads.
pub(super) fn check_opened(store: &dyn ObjectStore, name: &str, url: &str) -> Result<()> {
    let label = store.label(ObjectKind::Meta, REMOTE_MARKER);
    let Some(bytes) = store.get(ObjectKind::Meta, REMOTE_MARKER)? else {
        return Err(remote_error(
            name,
            format!("{label}: no marker: {url} is not (or no longer) a vmdepot remote; check its URL (`vmdepot remote list`), or `vmdepot remote remove {name}`"),
        ));
    };
    check_marker(&parse_marker(&bytes, &label, name, url)?, store, name, url)
}

/// Accepts a marker of this format and a version this vmdepot reads.
fn check_marker(m: &Marker, store: &dyn ObjectStore, name: &str, url: &str) -> Result<()> {
    let label = store.label(ObjectKind::Meta, REMOTE_MARKER);
    if m.format != MARKER_FORMAT {
        return Err(remote_error(
            name,
            format!(
                "{label}: the marker is of format {:?}, not {MARKER_FORMAT:?}: {url} is not a vmdepot remote; use an empty prefix",
                m.format
            ),
        ));
    }
    if m.version > MARKER_VERSION {
        return Err(remote_error(
            name,
            format!(
                "{label}: {url} is a remote of version {}, this vmdepot reads version {MARKER_VERSION}: use a newer vmdepot",
                m.version
            ),
        ));
    }
    Ok(())
}

/// Refuses an endpoint URL holding user info (`USER:PASSWORD@`): it would
/// be written to the remote's config file and shown in every listing and
/// error. The URL is not echoed, since it holds a secret.
fn check_endpoint(endpoint: &str) -> Result<()> {
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if authority.contains('@') {
        return Err(Error::Usage(
            "refused the --endpoint: it holds user info (USER:PASSWORD@HOST); give only the service's URL (http://HOST:PORT): credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the shared credentials file".into(),
        ));
    }
    Ok(())
}

/// Refuses a prefix inside another remote: one whose parent prefix (up to
/// the bucket's root) holds a remote's marker. One HEAD per level.
fn check_not_nested(loc: &S3Location, name: &str, url: &str) -> Result<()> {
    let parts: Vec<&str> = loc.prefix.split('/').filter(|p| !p.is_empty()).collect();
    for depth in 0..parts.len() {
        let mut parent = loc.clone();
        parent.prefix = parts[..depth].join("/");
        let store = S3Store::open(&parent, name)?;
        if store.stat(ObjectKind::Meta, REMOTE_MARKER)?.is_some() {
            return Err(remote_error(
                name,
                format!(
                    "{url} is inside the remote at {}: a remote's prefix holds nothing else; use a prefix outside it",
                    parent.url()
                ),
            ));
        }
    }
    Ok(())
}

/// [`Error::Remote`] of remote `name`.
fn remote_error(name: &str, message: String) -> Error {
    Error::Remote {
        remote: name.to_owned(),
        message,
    }
}
