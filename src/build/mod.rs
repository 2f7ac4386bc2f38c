//! Images built from the distribution's package mirror
//! ([`Depot::build_image`], `vmdepot image build`).
//!
//! A base build (`debian-12`, `debian-13`) makes a bootable cloud image in
//! a sparse file under the depot's `tmp/`: debootstrap from the mirror the
//! host's apt uses, then the kernel, systemd, cloud-init (NoCloud),
//! openssh-server, sudo, DHCP networking and a serial console in a chroot;
//! extlinux for BIOS and a GRUB EFI image on an EFI system partition for
//! UEFI (the layout is in docs/FORMAT.md, "Built images"). A build `--from`
//! an image installs packages into a copy of it, in place, so the depot
//! stores only the blocks that the packages changed. Either way the file is
//! imported like any other, with the recipe as tags (`build.*`,
//! [`RECIPE_TAGS`]), and removed. Downloaded packages are kept in a cache
//! shared by builds ([`BuildOptions::cache`]).
//!
//! Reproducibility: what can be fixed is (the disk and filesystem
//! identifiers come from the recipe, file times are clamped to the
//! mirror's release date, no machine id, host keys, logs or apt lists are
//! left); ext4's block allocation and inode times are not, so two builds'
//! digests differ while most of their blocks are shared (docs/BENCHMARKS.md).

mod debian;
mod host;
mod mirror;
mod sandbox;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::depot::access::{restriction_of, Op};
use crate::depot::{Depot, ImageInfo, ImageType, ImportOptions};
use crate::error::{Error, Result};
use crate::launch::firmware::FIRMWARE_TAG;
use crate::launch::instance::SSH_USER_TAG;
use crate::progress::Progress;

/// The tags a build records (its recipe), beside `os`, `release`,
/// [`SSH_USER_TAG`] and [`FIRMWARE_TAG`].
pub const RECIPE_TAGS: &[&str] = &[
    "build.os",
    "build.suite",
    "build.mirror",
    "build.security-mirror",
    "build.packages",
    "build.from",
    "build.run",
    "build.kernel",
    "build.package-set",
    "build.source-date",
    "build.seconds",
    "build.vmdepot",
];

/// The systems `image build` makes: (name, Debian suite, release).
pub const SYSTEMS: &[(&str, &str, &str)] = &[
    ("debian-12", "bookworm", "12"),
    ("debian-13", "trixie", "13"),
];

/// Default size of a base build's disk.
pub const DEFAULT_SIZE: u64 = 3 << 30;

/// What `image build` asks for.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The system: one of [`SYSTEMS`] (`debian-12`).
    pub system: String,
    /// The new image's name (default: the system's, for a base build;
    /// required with `from`).
    pub name: Option<String>,
    /// The disk's size in bytes (base builds; default 3 GiB).
    pub size: Option<u64>,
    /// Debian packages to install as well (`name` or `name=version`).
    pub packages: Vec<String>,
    /// Build on a copy of this image (one made by `image build`) instead
    /// of from nothing: only the packages and the script are added.
    pub from: Option<String>,
    /// A script run in the image (chroot, `/bin/sh`) as the last step.
    pub run: Option<PathBuf>,
    /// The image's type (default: public for a base build, custom on
    /// `from`).
    pub kind: Option<ImageType>,
    /// Free text shown with the image.
    pub description: String,
    /// A marketplace image's vendor, application and its version.
    pub vendor: String,
    /// See `vendor`.
    pub application: String,
    /// See `vendor`.
    pub app_version: String,
    /// Tags set beside the recipe.
    pub tags: Vec<(String, String)>,
    /// The mirror (default: the one the host's apt uses for the suite,
    /// else deb.debian.org). Base builds only: a build `--from` uses its
    /// image's sources.
    pub mirror: Option<String>,
    /// The security suite's mirror (default: the host's for
    /// `SUITE-security`, else deb.debian.org/debian-security).
    pub security_mirror: Option<String>,
    /// Where downloaded packages are kept between builds (default:
    /// `VMDEPOT_BUILD_CACHE`, else /var/cache/vmdepot/build).
    pub cache: Option<PathBuf>,
}

impl BuildOptions {
    /// A base build of `system` with everything else default.
    pub fn new(system: impl Into<String>) -> BuildOptions {
        BuildOptions {
            system: system.into(),
            name: None,
            size: None,
            packages: Vec::new(),
            from: None,
            run: None,
            kind: None,
            description: String::new(),
            vendor: String::new(),
            application: String::new(),
            app_version: String::new(),
            tags: Vec::new(),
            mirror: None,
            security_mirror: None,
            cache: None,
        }
    }
}

/// What a build needs to know, checked before anything is made.
pub(crate) struct Plan {
    pub system: &'static str,
    pub suite: &'static str,
    pub mirror: String,
    pub security: String,
    pub packages: Vec<String>,
    pub size: u64,
    pub script: Option<(PathBuf, Vec<u8>)>,
    pub debs: PathBuf,
}

impl Depot {
    /// Builds an image from the distribution's packages (see the module
    /// page of `image build`): from nothing, or on a copy of `opts.from`.
    /// Needs root (loop devices, mounts, chroot). The new image's tags
    /// hold its recipe ([`RECIPE_TAGS`]). A failure or a signal leaves
    /// nothing behind but the build's log, which the error names.
    pub fn build_image(&self, opts: &BuildOptions, progress: &dyn Progress) -> Result<ImageInfo> {
        let t0 = Instant::now();
        let (system, suite, release) = SYSTEMS
            .iter()
            .find(|(s, _, _)| *s == opts.system)
            .copied()
            .ok_or_else(|| {
                let known: Vec<&str> = SYSTEMS.iter().map(|s| s.0).collect();
                Error::Usage(format!(
                    "image build: unknown system {:?}: one of {}",
                    opts.system,
                    known.join(", ")
                ))
            })?;
        let base = match &opts.from {
            Some(f) => Some(self.available_for(f, Op::Export)?.0),
            None => None,
        };
        let name = match (&opts.name, &base) {
            (Some(n), _) => n.clone(),
            (None, None) => system.to_owned(),
            (None, Some(_)) => {
                return Err(Error::Usage(
                    "image build --from needs --name for the new image".into(),
                ))
            }
        };
        self.check_local_name(&name)?;
        if base.is_some() && opts.size.is_some() {
            return Err(Error::Usage(
                "image build --from keeps its image's size: leave --size out".into(),
            ));
        }
        let kind = opts.kind.unwrap_or(match base {
            Some(_) => ImageType::Custom,
            None => ImageType::Public,
        });
        check_marketplace(kind, opts)?;
        crate::image::names::check_name_free(
            &self.repo.conn,
            self.account(),
            &name,
            kind.as_str(),
        )?;
        for p in &opts.packages {
            check_package(p)?;
        }
        crate::catalog::images::check_caller_tags(opts.tags.iter().map(|(k, _)| k))?;
        let script = match &opts.run {
            Some(p) => Some((p.clone(), read_script(p)?)),
            None => None,
        };
        let mirror = match &opts.mirror {
            Some(m) => m.clone(),
            None => {
                mirror::host_uri(suite).unwrap_or_else(|| "http://deb.debian.org/debian".into())
            }
        };
        if base.is_some() && (opts.mirror.is_some() || opts.security_mirror.is_some()) {
            return Err(Error::Usage(
                "image build --from uses its image's apt sources (its build.mirror tags): leave --mirror and --security-mirror out".into(),
            ));
        }
        let security = match &opts.security_mirror {
            Some(m) => m.clone(),
            None => mirror::host_uri(&format!("{suite}-security"))
                .unwrap_or_else(|| "http://deb.debian.org/debian-security".into()),
        };
        for m in [&mirror, &security] {
            mirror::check_uri(m).map_err(Error::Usage)?;
        }
        let size = opts.size.unwrap_or(DEFAULT_SIZE);
        if !(1 << 30..=1 << 40).contains(&size) || size % (1 << 20) != 0 {
            return Err(Error::Usage(format!(
                "image build: --size {size}: from 1G to 1T, a whole number of MiB"
            )));
        }
        if nix::unistd::geteuid().as_raw() != 0 {
            return Err(Error::NotPermitted(
                "image build needs root (it uses loop devices, mounts and a chroot): run it as root"
                    .into(),
            ));
        }
        if let Some(b) = &base {
            let tags = self.image_tags(b)?;
            if tags.get("build.suite").map(String::as_str) != Some(suite) {
                return Err(Error::Usage(format!(
                    "image {} ({}) was not built by `vmdepot image build {system}`: --from takes an image that it built (tag build.suite={suite})",
                    b.name, b.id
                )));
            }
        }
        let cache = opts
            .cache
            .clone()
            .or_else(|| std::env::var_os("VMDEPOT_BUILD_CACHE").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/cache/vmdepot/build"));
        // (a bind mount's source, named in the log: absolute)
        let cache = std::path::absolute(&cache).map_err(|e| Error::io(&cache, e))?;
        let plan = Plan {
            system,
            suite,
            mirror,
            security,
            packages: opts.packages.clone(),
            size,
            script,
            debs: cache.join(suite),
        };

        let mut work = host::Work::create(&self.root().join("tmp"))?;
        work.lock_cache(&plan.debs)?;
        let built = match &base {
            None => debian::build_base(&mut work, &plan, progress)?,
            Some(b) => {
                let disk = work.dir.join("disk.raw");
                work.catch_signals(false)?;
                progress.begin(&format!("copying {}", b.name), 0);
                // (into the depot's tmp/: the internal export; a user's
                // export into the depot is refused)
                crate::image::export::export_with_mode(
                    &self.repo,
                    b,
                    &disk,
                    crate::ExportFormat::Raw,
                    self.perms().file(),
                    progress,
                )?;
                progress.end();
                work.catch_signals(true)?;
                let label = PathBuf::from(format!("image {} ({})", b.name, b.id));
                debian::build_on(&mut work, &plan, disk, label, progress)?
            }
        };

        let mut io = ImportOptions::new(name);
        io.kind = kind;
        io.description = opts.description.clone();
        io.vendor = opts.vendor.clone();
        io.application = opts.application.clone();
        io.app_version = opts.app_version.clone();
        // The base's tags, then the recipe over them, then the caller's.
        let mut tags = match &base {
            Some(b) => self.image_tags(b)?,
            None => Default::default(),
        };
        tags.remove("build.run");
        let mut packages: Vec<&str> = match &base {
            Some(_) => tags
                .get("build.packages")
                .map(|p| p.split_whitespace().collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        packages.extend(plan.packages.iter().map(String::as_str));
        let packages = packages.join(" ");
        let from = base.as_ref().map(|b| format!("{} ({})", b.name, b.id));
        let run = plan.script.as_ref().map(|(p, body)| {
            let file = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let hash = blake3::hash(body).to_hex();
            format!("{} blake3:{hash}", file.unwrap_or_default())
        });
        for (k, v) in [
            ("os", Some("debian".to_owned())),
            ("release", Some(release.to_owned())),
            (SSH_USER_TAG, Some("debian".to_owned())),
            (FIRMWARE_TAG, Some("bios,uefi".to_owned())),
            ("build.os", Some(system.to_owned())),
            ("build.suite", Some(suite.to_owned())),
            // (a build --from keeps its image's sources, and their tags)
            (
                "build.mirror",
                match &base {
                    None => Some(plan.mirror.clone()),
                    Some(_) => tags.get("build.mirror").cloned(),
                },
            ),
            (
                "build.security-mirror",
                match &base {
                    None => Some(plan.security.clone()),
                    Some(_) => tags.get("build.security-mirror").cloned(),
                },
            ),
            ("build.packages", Some(packages).filter(|p| !p.is_empty())),
            ("build.from", from),
            ("build.run", run),
            ("build.kernel", Some(built.kernel.clone())),
            ("build.package-set", Some(built.package_set.clone())),
            ("build.source-date", Some(built.source_date.to_string())),
            ("build.seconds", Some(t0.elapsed().as_secs().to_string())),
            ("build.vmdepot", Some(env!("CARGO_PKG_VERSION").to_owned())),
        ] {
            match v {
                Some(v) => tags.insert(k.to_owned(), v),
                None => tags.remove(k),
            };
        }
        tags.extend(opts.tags.iter().cloned());
        if let Some(b) = &base {
            io.parent = Some((b.id.to_string(), b.name.clone()));
            io.restricted_from = restriction_of(b, self.account());
        }
        let tags: Vec<(String, String)> = tags.into_iter().collect();
        io.tags = tags;
        work.catch_signals(false)?;
        // (not `Depot::import`: that refuses the recipe's tags)
        let id =
            crate::image::import::import(&self.repo, self.account(), &built.disk, &io, progress)?;
        work.keep_log = false;
        self.image(id.as_str())
    }

    fn image_tags(
        &self,
        row: &crate::catalog::ImageRow,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        crate::catalog::images::tags_of(&self.repo.conn, row.id.as_str())
    }
}

/// Marketplace fields only on (and required by) a marketplace image, as
/// for `image import`.
fn check_marketplace(kind: ImageType, o: &BuildOptions) -> Result<()> {
    let market = kind == ImageType::Marketplace;
    let any = !(o.vendor.is_empty() && o.application.is_empty() && o.app_version.is_empty());
    if !market && any {
        return Err(Error::Usage(
            "--vendor, --application and --app-version are for --type marketplace".into(),
        ));
    }
    if market && (o.vendor.is_empty() || o.application.is_empty()) {
        return Err(Error::Usage(
            "a marketplace image needs --vendor and --application (and --app-version)".into(),
        ));
    }
    Ok(())
}

/// A Debian package name (policy 5.6.1: lower-case letters, digits, `+`,
/// `-`, `.`; two characters or more, starting alphanumeric), optionally
/// `=VERSION` (digits, letters, `.+~:-`). Nothing else reaches apt's
/// command line.
pub fn check_package(p: &str) -> Result<()> {
    let (name, version) = match p.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (p, None),
    };
    let name_ok = name.len() >= 2
        && name.len() <= 100
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.len() <= 100
            && v.starts_with(|c: char| c.is_ascii_digit())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c))
    });
    if name_ok && version_ok {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "--package {p:?} is not a Debian package name (lower-case letters, digits, + - .; optionally =VERSION)"
    )))
}

/// The `--run` script: a regular file of at most 1 MiB.
fn read_script(p: &Path) -> Result<Vec<u8>> {
    use crate::error::IoContext;
    let m = std::fs::metadata(p).at(p)?;
    if !m.is_file() || m.len() > 1 << 20 {
        return Err(Error::refused(
            p,
            "a --run script is a regular file of at most 1 MiB",
        ));
    }
    std::fs::read(p).at(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names() {
        for ok in [
            "nginx-light",
            "g++",
            "libc6",
            "python3.11",
            "nginx=1.22.1-9",
            "a0=2:1.0~rc1+b1",
        ] {
            check_package(ok).unwrap();
        }
        for bad in [
            "",
            "x",
            "-oDebug=1",
            "Nginx",
            "a b",
            "a;b",
            "pkg=",
            "pkg=x1",
            "pkg/bookworm",
            "pkg=1 2",
        ] {
            let e = check_package(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("not a Debian package name"), "{e}");
        }
    }
}
