//! Opening a depot: [`Depot::open`], [`Depot::open_with`] (the account,
//! the sharing group, the modes of the root, the catalog, the space
//! reserve), the read-only open of a full filesystem, [`Depot::repair`]
//! (`fsck --repair`, which opens what `open_with` refuses), the depot
//! marker ([`MARKER`], docs/FORMAT.md), and account names
//! ([`check_account`]).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tracing::instrument;

use crate::catalog;
use crate::depot::types::{DepotOptions, Intent};
use crate::depot::Depot;
use crate::error::{Error, IoContext, Result};
use crate::maint::repair::RepairReport;
use crate::perms::{self, Perms};
use crate::repo::{ensure_reserve, fs_full, release_reserve, Repo};
use crate::store::LocalDir;

/// The file in a depot that names the group sharing it.
const GROUP_FILE: &str = "group";

/// The depot marker file (docs/FORMAT.md): written once, when the depot is
/// created (or first opened by a vmdepot that knows markers).
pub const MARKER: &str = "VMDEPOT";

/// The first line of the marker.
const MARKER_MAGIC: &str = "vmdepot-depot";

/// The depot format version the marker names.
pub const FORMAT_VERSION: u32 = 1;

impl Depot {
    /// Opens the depot at `root`, creating the directory and catalog if
    /// needed (private to the owner). Several processes may open one depot
    /// at once. Sets the process umask (see [`Depot::open_with`]).
    pub fn open(root: impl AsRef<Path>) -> Result<Depot> {
        Depot::open_with(root, &DepotOptions::default())
    }

    /// Opens (or creates) the depot at `root` as [`Depot::open`] does, with
    /// an account and, for a new depot, a sharing group.
    ///
    /// Permissions: the process umask becomes 0077 (0007 for a group
    /// depot), and everything the library creates gets explicit modes
    /// (docs/ARCHITECTURE.md, "Depot permissions"). An existing depot
    /// whose root directory is more open than that is closed again (root
    /// chmod 0700, or 2770) when its owner opens it: the root's mode alone
    /// closes access to everything below it.
    #[instrument(skip_all, err(level = "debug"), fields(root = %root.as_ref().display()))]
    pub fn open_with(root: impl AsRef<Path>, opts: &DepotOptions) -> Result<Depot> {
        let account = resolve_account(opts)?;
        let root = root.as_ref().to_owned();
        if opts.existing_only && !holds_depot(&root) {
            return Err(Error::DepotNotFound { path: root });
        }
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).at(parent)?;
        }
        let stored = read_group(&root)?;
        let fresh = !root.join("catalog.db").exists();
        let full = !fresh && fs_full(&root);
        if full && opts.intent == Intent::Read && opts.group.is_none() {
            return Depot::open_read_only(root, account, stored);
        }
        if full && opts.intent == Intent::Free {
            release_reserve(&root);
        }
        let group = chosen_group(&root, opts.group.as_deref(), stored.as_deref(), fresh)?;
        let perms = perms_for(group.is_some());
        perms::apply_umask(perms);
        let new_group = group.as_deref().filter(|_| stored.is_none());
        let root = make_root(&root, new_group, perms)?;
        let marker = read_marker(&root)?;
        let existing = existing_reason(&root, marker.as_deref());
        let conn = open_catalog(&root, perms, existing.as_deref(), opts.intent, fresh)?;
        if opts.intent != Intent::Read {
            ensure_reserve(&root, perms);
        }
        if marker.is_none() {
            // A new depot, or one made before markers (migration).
            if let Err(e) = write_marker(&root, perms) {
                if existing.is_none() {
                    return Err(e);
                }
                tracing::warn!("could not write the depot marker: {e}");
            }
        }
        let repo = Repo::new(root, conn, perms);
        if let Err(e) = crate::repo::orphans::reap(&repo) {
            tracing::warn!("could not remove the ephemeral instances of owners that are gone: {e}");
        }
        Ok(Depot { repo, account })
    }

    /// [`Depot::open_with`] for [`Intent::Read`] on a full or read-only
    /// filesystem: writes nothing (no directories, modes, marker or
    /// migration), and opens the catalog read-only.
    fn open_read_only(root: PathBuf, account: String, group: Option<String>) -> Result<Depot> {
        let perms = perms_for(group.is_some());
        perms::apply_umask(perms);
        let root = fs::canonicalize(&root).at(&root)?;
        let marker = read_marker(&root)?;
        let existing = match &marker {
            Some(id) => format!(
                "the depot's marker {} (depot {id}) exists",
                root.join(MARKER).display()
            ),
            None => "the depot exists".into(),
        };
        let conn =
            catalog::open_read_only(&root.join("catalog.db"), perms.file(), Some(&existing))?;
        tracing::debug!("the depot's filesystem is full or read-only: catalog opened read-only");
        Ok(Depot {
            repo: Repo::new(root, conn, perms),
            account,
        })
    }

    /// `fsck --repair`: opens the depot even if its catalog is missing,
    /// empty or damaged (which [`Depot::open_with`] refuses), and then
    /// rebuilds the catalog from the pack files, their indexes and the
    /// image manifests (the damaged catalog's files are moved aside to
    /// `catalog.db.damaged-<unix time>`); a sound catalog is kept, and the
    /// manifests and pack indexes it lacks are written. Run it while no
    /// other vmdepot process uses the depot (docs/ARCHITECTURE.md, "A lost
    /// catalog").
    #[instrument(skip_all, err(level = "debug"), fields(root = %root.as_ref().display()))]
    pub fn repair(root: impl AsRef<Path>, opts: &DepotOptions) -> Result<RepairReport> {
        let root = root.as_ref();
        let reason = match Depot::open_with(root, opts) {
            Ok(d) => match catalog::integrity::damage(&d.repo.conn) {
                None => return crate::maint::repair::complete(&d.repo),
                Some(why) => why,
            },
            Err(e @ (Error::StoreDamaged(_) | Error::Sqlite(_))) => e.to_string(),
            Err(e) => return Err(e),
        };
        let root = fs::canonicalize(root).at(root)?;
        let mut rep = RepairReport {
            rebuilt: true,
            reason: Some(reason),
            ..Default::default()
        };
        let perms = perms_for(read_group(&root)?.is_some());
        rep.set_aside = set_catalog_aside(&root)?;
        drop(catalog::open(&root.join("catalog.db"), perms.file(), None)?);
        let depot = Depot::open_with(&root, opts)?;
        crate::maint::repair::rebuild(&depot.repo, &mut rep)?;
        rep.bases_recorded = crate::image::bases::adopt_unrecorded_bases(&depot.repo)?;
        let more = crate::maint::repair::complete(&depot.repo)?;
        rep.manifests_written += more.manifests_written;
        rep.indexes_written += more.indexes_written;
        rep.problems.extend(more.problems);
        Ok(rep)
    }
}

/// The modes of a depot shared by a group, or private to its owner.
fn perms_for(group: bool) -> Perms {
    if group {
        Perms::GROUP
    } else {
        Perms::PRIVATE
    }
}

/// The acting account of an open: `opts.account`, else the default
/// ([`default_account`]); either must be a valid name.
fn resolve_account(opts: &DepotOptions) -> Result<String> {
    if let Some(a) = &opts.account {
        check_account(a)?;
        return Ok(a.clone());
    }
    let a = default_account();
    check_account(&a).map_err(|e| {
        Error::Usage(format!(
            "{e} (from VMDEPOT_ACCOUNT or the Unix user name): pass --account NAME"
        ))
    })?;
    Ok(a)
}

/// The group of the depot at `root`: the one `stored` in it, or for a
/// `fresh` depot the one `asked` for. Asking for another group than an
/// existing depot has is a usage error.
fn chosen_group(
    root: &Path,
    asked: Option<&str>,
    stored: Option<&str>,
    fresh: bool,
) -> Result<Option<String>> {
    match (asked, stored) {
        (Some(g), Some(s)) if g == s => Ok(Some(s.to_owned())),
        (Some(g), None) if fresh => Ok(Some(g.to_owned())),
        (Some(g), _) => Err(Error::Usage(format!(
            "--group {g}: the depot {} already exists ({}); --group applies only when a depot is created",
            root.display(),
            match stored {
                Some(s) => format!("shared with group {s}"),
                None => "private".into(),
            }
        ))),
        (None, s) => Ok(s.map(str::to_owned)),
    }
}

/// Makes (or closes again) the depot's root and its directories, and
/// returns the root as an absolute path (overlays name their base by it,
/// and QEMU runs with another working directory). `new_group`: the group
/// of a new group depot, which the root takes (setgid, so that all below
/// inherit it) before the choice is recorded.
fn make_root(root: &Path, new_group: Option<&str>, perms: Perms) -> Result<PathBuf> {
    match fs::DirBuilder::new().mode(perms.dir() & 0o777).create(root) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => r.at(root)?,
    }
    if let Some(g) = new_group {
        give_root_to_group(root, g, perms)?;
    }
    // An existing depot opened by its owner: close its root again.
    let meta = fs::metadata(root).at(root)?;
    if meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o7777 != perms.dir() {
        fs::set_permissions(root, fs::Permissions::from_mode(perms.dir())).at(root)?;
    }
    LocalDir::new(root, perms).create_dir()?;
    for d in ["locks", "tmp", "manifests"] {
        perms.mkdir_all(&root.join(d))?;
    }
    fs::canonicalize(root).at(root)
}

/// A new group depot: the root takes group `g` and its mode (setgid), and
/// `DEPOT/group` records the choice.
fn give_root_to_group(root: &Path, g: &str, perms: Perms) -> Result<()> {
    let gid = nix::unistd::Group::from_name(g)
        .ok()
        .flatten()
        .ok_or_else(|| {
            Error::Usage(format!(
                "--group {g}: no such group on this host: pick an existing group (getent group)"
            ))
        })?
        .gid;
    nix::unistd::chown(root, None, Some(gid)).map_err(|e| Error::io(root, e.into()))?;
    fs::set_permissions(root, fs::Permissions::from_mode(perms.dir())).at(root)?;
    let p = root.join(GROUP_FILE);
    let mut f = perms
        .open_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .at(&p)?;
    std::io::Write::write_all(&mut f, format!("{g}\n").as_bytes()).at(&p)
}

/// Why the depot at `root` is known to exist already (its marker, its pack
/// files), if it is: then a missing or empty catalog is refused, not made.
fn existing_reason(root: &Path, marker: Option<&str>) -> Option<String> {
    match marker {
        Some(id) => Some(format!(
            "the depot's marker {} (depot {id}) exists",
            root.join(MARKER).display()
        )),
        None => pack_files_exist(root),
    }
}

/// Opens the catalog of the depot at `root`. On a full filesystem, a
/// reader of an existing depot gets it read-only, and a writer gets the
/// space reserve released first.
fn open_catalog(
    root: &Path,
    perms: Perms,
    existing: Option<&str>,
    intent: Intent,
    fresh: bool,
) -> Result<Connection> {
    let cat = root.join("catalog.db");
    match catalog::open(&cat, perms.file(), existing) {
        Err(Error::NoSpace { .. }) if intent == Intent::Read && !fresh => {
            catalog::open_read_only(&cat, perms.file(), existing)
        }
        Err(Error::NoSpace { .. }) if intent != Intent::Read && release_reserve(root) => {
            catalog::open(&cat, perms.file(), existing)
        }
        r => r,
    }
}

/// Moves a damaged catalog's files aside (`catalog.db.damaged-<unix
/// time>`, with its `-wal` and `-shm`), durably; returns where to.
fn set_catalog_aside(root: &Path) -> Result<Vec<String>> {
    let stamp = catalog::now();
    let mut moved = Vec::new();
    for ext in ["", "-wal", "-shm"] {
        let p = root.join(format!("catalog.db{ext}"));
        if p.exists() {
            let to = root.join(format!("catalog.db.damaged-{stamp}{ext}"));
            fs::rename(&p, &to).at(&p)?;
            moved.push(to.display().to_string());
        }
    }
    crate::store::sync_dir(root)?;
    Ok(moved)
}

/// The depot id from the marker, if there is a marker.
fn read_marker(root: &Path) -> Result<Option<String>> {
    let p = root.join(MARKER);
    let text = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p, e)),
    };
    let bad = |why: &str| {
        Error::StoreDamaged(format!(
            "{}: not a vmdepot depot marker ({why}); it should hold `{MARKER_MAGIC}`, `format=N` and `id=<32 hex>` lines",
            p.display()
        ))
    };
    let text = std::str::from_utf8(&text).map_err(|_| bad("not UTF-8"))?;
    let mut lines = text.split_terminator('\n');
    if lines.next() != Some(MARKER_MAGIC) {
        return Err(bad("bad first line"));
    }
    let format: u32 = lines
        .next()
        .and_then(|l| l.strip_prefix("format="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("bad format line"))?;
    if format > FORMAT_VERSION {
        return Err(Error::Invalid(format!(
            "{}: the depot has format {format}, this vmdepot knows format {FORMAT_VERSION} at most: use a newer vmdepot",
            p.display()
        )));
    }
    let id = lines
        .next()
        .and_then(|l| l.strip_prefix("id="))
        .filter(|id| crate::store::valid_pack_name(id))
        .ok_or_else(|| bad("bad id line"))?;
    Ok(Some(id.to_owned()))
}

/// Writes the marker with a fresh depot id, atomically and durably: a
/// fsynced temporary hard-linked to the name (a concurrent first open that
/// won keeps its own), then the directory fsynced.
fn write_marker(root: &Path, perms: Perms) -> Result<()> {
    use std::io::Write;
    let id = crate::ids::random_hex(16);
    let text = format!("{MARKER_MAGIC}\nformat={FORMAT_VERSION}\nid={id}\n");
    let tmp = root.join(format!("{MARKER}.tmp-{}", crate::ids::random_hex(8)));
    let r = (|| {
        let mut f = perms
            .open_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(text.as_bytes()).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        let m = root.join(MARKER);
        match fs::hard_link(&tmp, &m) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::io(&m, e)),
            _ => Ok(()),
        }
    })();
    let _ = fs::remove_file(&tmp);
    r?;
    crate::store::sync_dir(root)
}

/// Where the depot directory at `root` holds packs, if it does.
fn pack_files_exist(root: &Path) -> Option<String> {
    use crate::store::{ObjectKind, ObjectStore};
    // Listing creates nothing: the modes do not matter here.
    let store = LocalDir::new(root, Perms::PRIVATE);
    let packs = store.list(ObjectKind::Pack).ok()?;
    (!packs.is_empty()).then(|| format!("pack files exist in {}", store.dir().display()))
}

/// The acting account: `VMDEPOT_ACCOUNT`, else the Unix user's name.
fn default_account() -> String {
    if let Ok(a) = std::env::var("VMDEPOT_ACCOUNT") {
        if !a.is_empty() {
            return a;
        }
    }
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// The group recorded in a depot (`DEPOT/group`), if any.
pub(super) fn read_group(root: &Path) -> Result<Option<String>> {
    let p = root.join(GROUP_FILE);
    match fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&p, e)),
    }
}

/// Checks an account name: the rules of a Unix user name (`useradd`'s
/// default): 1 to 32 characters, a lowercase letter or `_` first, then
/// lowercase letters, digits, `_` or `-`, optionally ending in `$`.
/// Anything else (empty, upper case, spaces, `/`, control characters) is an
/// [`Error::Usage`].
pub fn check_account(a: &str) -> Result<()> {
    let b = a.as_bytes();
    let body = b.strip_suffix(b"$").unwrap_or(b);
    let ok = !body.is_empty()
        && b.len() <= 32
        && (body[0].is_ascii_lowercase() || body[0] == b'_')
        && body
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "invalid account name {a:?}: use 1-32 characters, a lowercase letter or '_' first, \
             then lowercase letters, digits, '_' or '-' (a Unix user name)"
        )))
    }
}

/// Whether `root` holds a depot (or what is left of one: its marker or
/// packs without a catalog, which the open then refuses).
fn holds_depot(root: &Path) -> bool {
    ["catalog.db", MARKER, "packs"]
        .iter()
        .any(|f| root.join(f).symlink_metadata().is_ok())
}
