//! `vmdepot image …`: [`ImageCmd`], the image subcommands, and their
//! handlers. Each turns its flags into the library's options (checking the
//! combinations clap cannot), calls one [`Depot`] operation and prints the
//! result, plain or with `--json`. `image verify` prints through
//! [`super::maint`], with the other checks of stored data.

use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use vmdepot::{
    BuildOptions, CaptureOptions, CopyReport, Depot, ExportFormat, HistoryEntry, ImageInfo,
    ImageKind, ImageType, ImageUpdate, ImportOptions, Intent, Op, Progress, SourceFormat,
};

use super::maint::print_verify;
use super::output::{esc, human, print_json, show, Table};
use super::remote::{print_pull, print_push, remote_image, warn_damaged};

/// The subcommands of `vmdepot image`.
#[derive(Subcommand)]
pub enum ImageCmd {
    /// Import a disk image file (format detected from the content)
    ///
    /// Raw, qcow2, VMDK, VHD, VHDX and VDI; images that refer to other files (backing files,
    /// extents, parents) are refused, and so is a file that changes while it is imported.
    #[command(after_long_help = "Examples:
  vmdepot image import debian-12.qcow2 --name debian-12 --type public
  vmdepot image import /dev/vg/base --name base --tag os=debian --tag release=12
  vmdepot image import app.qcow2 --name app --type marketplace --vendor Acme --application shop --app-version 2.1")]
    Import(ImportArgs),
    /// Build an OS image from the distribution's packages, or add packages to a built one
    ///
    /// debian-12 (or debian-13) from the mirror the host's apt uses: kernel, systemd, cloud-init
    /// (NoCloud), openssh-server, sudo, DHCP, a serial console, the default user `debian` (its
    /// password locked; cloud-init gives it the injected keys); boots with BIOS and with UEFI.
    /// With --from, the packages are installed into a copy of that built image, so the depot
    /// stores only what they add. The recipe is kept in the image's `build.*` tags. Needs root.
    /// Downloaded packages are kept in --cache for the next build.
    #[command(after_long_help = "Examples:
  vmdepot image build debian-12
  vmdepot image build debian-12 --name debian-12-big --size 8G --package curl
  vmdepot image build debian-12 --from debian-12 --name web --package nginx-light --run setup.sh \\
      --type marketplace --vendor nginx --application nginx --app-version 1.22")]
    Build(BuildArgs),
    /// Create a custom image from an instance's disk
    ///
    /// Only what the instance changed is stored: the new image shares the rest with its parent.
    #[command(after_long_help = "Examples:
  vmdepot image create --from-instance web --name web-v2
  vmdepot image create --from-instance web --name web-live --live --description \"before the upgrade\"")]
    Create {
        /// The instance (id or name) whose disk becomes the image
        #[arg(long = "from-instance", value_name = "INSTANCE")]
        from_instance: String,
        /// The new image's name
        #[arg(long)]
        name: String,
        /// Capture a running instance: pause it while its disk is read
        #[arg(long)]
        live: bool,
        /// A free-text description of the new image
        #[arg(
            long,
            value_name = "TEXT",
            default_value = "",
            hide_default_value = true
        )]
        description: String,
        /// Print the new image as a JSON object instead of its id
        #[arg(long)]
        json: bool,
    },
    /// List images (deprecated ones only with --all), of this depot or of a remote
    #[command(
        visible_alias = "ls",
        after_long_help = "Examples:
  vmdepot image list
  vmdepot image ls --type custom --tag os=debian
  vmdepot image list --remote eu --json"
    )]
    List(ListArgs),
    /// Change an image's name, description, protection, tags or deprecation
    #[command(after_long_help = "Examples:
  vmdepot image update web-v2 --name web-v3 --description \"nginx 1.24\"
  vmdepot image update web-v2 --protect --tag stage=prod
  vmdepot image update debian-11 --deprecate")]
    Update(UpdateArgs),
    /// Share a custom image with another account (it may only launch it)
    #[command(after_long_help = "Examples:
  vmdepot image share web-v2 --with bob")]
    Share {
        /// The custom image (id or name) to share
        image: String,
        /// The account that may launch it
        #[arg(long = "with", value_name = "ACCOUNT")]
        with: String,
    },
    /// Stop sharing an image with an account
    #[command(after_long_help = "Examples:
  vmdepot image unshare web-v2 --with bob")]
    Unshare {
        /// The image (id or name) shared
        image: String,
        /// The account it is no longer shared with
        #[arg(long = "with", value_name = "ACCOUNT")]
        with: String,
    },
    /// The accounts an image is shared with
    #[command(after_long_help = "Examples:
  vmdepot image shares web-v2
  vmdepot image shares web-v2 --json")]
    Shares {
        /// The image (id or name)
        image: String,
        /// Print a JSON array of account names instead of one per line
        #[arg(long)]
        json: bool,
    },
    /// Copy an image into another depot (only the chunks it lacks travel)
    ///
    /// An interrupted copy resumes where it stopped when run again.
    #[command(after_long_help = "Examples:
  vmdepot image copy web-v2 --to-depot /srv/region2
  vmdepot image copy web-v2 --to-depot /srv/region2 --name web --json")]
    Copy {
        /// The image (id or name) to copy
        image: String,
        /// The target depot's directory (created if missing)
        #[arg(long = "to-depot", value_name = "DIR")]
        to_depot: PathBuf,
        /// The image's name in the target [default: the same]
        #[arg(long)]
        name: Option<String>,
        /// Print the copy's report as a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Lineage: parent images, source instance, copies, children
    #[command(after_long_help = "Examples:
  vmdepot image history web-v2
  vmdepot image history web-v2 --json")]
    History {
        /// The image (id or name)
        image: String,
        /// Print a JSON array of lineage entries instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one image (id or name; REMOTE:IMAGE: a remote's)
    #[command(after_long_help = "Examples:
  vmdepot image show debian-12
  vmdepot image show img-0123456789abcdef --json
  vmdepot image show eu:web-v2")]
    Show {
        /// An image's id or name, or REMOTE:IMAGE
        image: String,
        /// Print a JSON object instead of one `field value` line each
        #[arg(long)]
        json: bool,
    },
    /// Write an image to a file, a block device (in place), or `-` (raw, stdout)
    #[command(after_long_help = "Examples:
  vmdepot image export debian-12 debian-12.raw
  vmdepot image export debian-12 debian-12.qcow2 --format qcow2
  vmdepot image export debian-12 - | ssh host 'dd of=/dev/vg/lv bs=1M'")]
    Export {
        /// The image (id or name) to export
        image: String,
        /// The destination: a file, a block device, or - for stdout
        out: PathBuf,
        /// The output format: raw (sparse) or qcow2
        #[arg(long, default_value = "raw", value_parser = ExportFormat::parse)]
        format: ExportFormat,
    },
    /// Delete an image (its data is freed by `gc`)
    ///
    /// A local image is refused while it is shared or instances use it (unless --force), or
    /// while it is protected. REMOTE:IMAGE: retire its manifest on the remote (its data is freed
    /// by `gc --remote REMOTE`).
    #[command(
        visible_alias = "rm",
        after_long_help = "Examples:
  vmdepot image delete web-v2
  vmdepot image rm web-v2 --force
  vmdepot image delete eu:web-v2"
    )]
    Delete {
        /// An image's id or name, or REMOTE:IMAGE
        image: String,
        /// Delete it even if it is shared or instances use it (local images)
        #[arg(long)]
        force: bool,
    },
    /// Re-read and re-hash stored data: one image (with its digest), or all chunks
    ///
    /// REMOTE:IMAGE: every chunk it names fetched from the remote and re-hashed.
    #[command(after_long_help = "Examples:
  vmdepot image verify
  vmdepot image verify debian-12 --json
  vmdepot image verify eu:web-v2")]
    Verify {
        /// An image's id or name, or REMOTE:IMAGE [default: every chunk of the depot]
        image: Option<String>,
        /// Print the report as a JSON object instead of one line
        #[arg(long)]
        json: bool,
    },
    /// Push an image to a remote: only the chunks the remote lacks travel
    ///
    /// JSON: remote, image (id, name: as the remote calls it), chunks, chunks_present,
    /// chunks_sent, chunks_read_first (sent first: what the image's first lazily served run read,
    /// its read profile), bytes_sent, frames_whole, packs (pack objects written), already.
    #[command(after_long_help = "Examples:
  vmdepot image push web-v2 eu
  vmdepot image push web-v2 eu --name web --json")]
    Push {
        /// The local image (id or name)
        image: String,
        /// The configured remote's name (see `vmdepot remote list`)
        remote: String,
        /// The image's name on the remote [default: the same]; an image already there keeps its name
        #[arg(long)]
        name: Option<String>,
        /// Print the push's report as a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Pull REMOTE:IMAGE into this depot as an independent image
    ///
    /// Only the chunks this depot lacks travel; the content is checked against its digest before
    /// the image is available. JSON: remote, image, chunks, chunks_present, chunks_fetched,
    /// bytes_fetched, frames_whole, gets. REMOTE:IMAGE names a remote only when REMOTE is a
    /// configured remote's name (image names may hold ':' too).
    #[command(after_long_help = "Examples:
  vmdepot image pull eu:web-v2
  vmdepot image pull eu:img-0123456789abcdef --name web --json")]
    Pull {
        /// REMOTE:IMAGE (id or name)
        image: String,
        /// The image's name here [default: the same]
        #[arg(long)]
        name: Option<String>,
        /// Print the pull's report as a JSON object
        #[arg(long)]
        json: bool,
    },
}

/// The flags of `vmdepot image import`.
#[derive(Args)]
pub struct ImportArgs {
    /// The disk image: a regular file or a block device
    file: PathBuf,
    /// The new image's name
    #[arg(long)]
    name: String,
    /// The input format: auto (from the content), raw, qcow2, vmdk, vhdx, vhd or vdi
    #[arg(long, default_value = "auto", value_parser = checked(SourceFormat::parse))]
    format: String,
    /// The image's type: public, marketplace or custom
    #[arg(long = "type", value_name = "TYPE", default_value = "custom", value_parser = ImageType::parse)]
    kind: ImageType,
    /// A free-text description of the image
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "",
        hide_default_value = true
    )]
    description: String,
    /// Read the file even if it is unchanged since an earlier import
    #[arg(long)]
    reread: bool,
    /// The vendor of a marketplace image
    #[arg(long, default_value = "", hide_default_value = true)]
    vendor: String,
    /// The application of a marketplace image
    #[arg(long, default_value = "", hide_default_value = true)]
    application: String,
    /// The application's version of a marketplace image
    #[arg(
        long = "app-version",
        value_name = "VERSION",
        default_value = "",
        hide_default_value = true
    )]
    app_version: String,
    /// A tag KEY=VALUE (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = tag)]
    tags: Vec<(String, String)>,
    /// Print the new image as a JSON object instead of its id
    #[arg(long)]
    json: bool,
}

/// The flags of `vmdepot image build`.
#[derive(Args)]
pub struct BuildArgs {
    /// The system: debian-12 or debian-13
    system: String,
    /// The new image's name [default: the system's; required with --from]
    #[arg(long)]
    name: Option<String>,
    /// The disk's size (e.g. 4G) [default: 3G]; an image built --from keeps its base's
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// A Debian package to install as well: NAME or NAME=VERSION (repeatable)
    #[arg(long = "package", value_name = "PKG", value_parser = checked(vmdepot::check_package))]
    packages: Vec<String>,
    /// Build on a copy of this image (one that `image build` made): only the packages and the
    /// script are added
    #[arg(long, value_name = "IMAGE")]
    from: Option<String>,
    /// A script run in the image (chroot, /bin/sh -e) as the last step
    #[arg(long, value_name = "SCRIPT")]
    run: Option<PathBuf>,
    /// The image's type: public, marketplace or custom [default: public; custom with --from]
    #[arg(long = "type", value_name = "TYPE", value_parser = ImageType::parse)]
    kind: Option<ImageType>,
    /// A free-text description of the image
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "",
        hide_default_value = true
    )]
    description: String,
    /// The vendor of a marketplace image
    #[arg(long, default_value = "", hide_default_value = true)]
    vendor: String,
    /// The application of a marketplace image
    #[arg(long, default_value = "", hide_default_value = true)]
    application: String,
    /// The application's version of a marketplace image
    #[arg(
        long = "app-version",
        value_name = "VERSION",
        default_value = "",
        hide_default_value = true
    )]
    app_version: String,
    /// A tag KEY=VALUE (repeatable), beside the recipe's
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = tag)]
    tags: Vec<(String, String)>,
    /// The Debian mirror [default: the one the host's apt uses, else deb.debian.org]
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
    /// The mirror of the security suite [default: the host apt's for SUITE-security, else
    /// deb.debian.org/debian-security]
    #[arg(long, value_name = "URL")]
    security_mirror: Option<String>,
    /// Where downloaded packages are kept [default: /var/cache/vmdepot/build]
    #[arg(long, value_name = "DIR", env = "VMDEPOT_BUILD_CACHE")]
    cache: Option<PathBuf>,
    /// Print the new image as a JSON object instead of its id
    #[arg(long)]
    json: bool,
}

impl BuildArgs {
    fn into_options(self) -> (BuildOptions, bool) {
        let mut o = BuildOptions::new(self.system);
        o.name = self.name;
        o.size = self.size;
        o.packages = self.packages;
        o.from = self.from;
        o.run = self.run;
        o.kind = self.kind;
        o.description = self.description;
        o.vendor = self.vendor;
        o.application = self.application;
        o.app_version = self.app_version;
        o.tags = self.tags;
        o.mirror = self.mirror;
        o.security_mirror = self.security_mirror;
        o.cache = self.cache;
        (o, self.json)
    }
}

/// `--size`: a number with a unit K, M, G or T (binary), in bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    vmdepot::parse_memory(s)
        .map(|mib| mib << 20)
        .map_err(|_| format!("bad size {s:?}: use a size like 4G or 8192M"))
}

/// The flags of `vmdepot image list`.
#[derive(Args)]
pub struct ListArgs {
    /// Only images of this type: public, marketplace, custom or shared
    #[arg(long = "type", value_name = "TYPE", value_parser = str::parse::<ImageKind>)]
    kind: Option<ImageKind>,
    /// Only images with this tag KEY=VALUE (repeatable: all must match)
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = tag)]
    tags: Vec<(String, String)>,
    /// Include deprecated images
    #[arg(long)]
    all: bool,
    /// List this remote's images instead (damaged manifests are named on stderr)
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
    /// Print a JSON array of images instead of a table
    #[arg(long)]
    json: bool,
}

/// The flags of `vmdepot image update`.
#[derive(Args)]
pub struct UpdateArgs {
    /// The image (id or name) to change
    image: String,
    /// Rename the image
    #[arg(long)]
    name: Option<String>,
    /// Replace the image's description
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Refuse the image's deletion until --unprotect
    #[arg(long, conflicts_with = "unprotect")]
    protect: bool,
    /// Allow the image's deletion again
    #[arg(long)]
    unprotect: bool,
    /// Set a tag KEY=VALUE (KEY= removes it; repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = tag_or_removal)]
    tags: Vec<(String, String)>,
    /// Hide the image from default listings (it can still be launched)
    #[arg(long, conflicts_with = "undeprecate")]
    deprecate: bool,
    /// List the image by default again
    #[arg(long)]
    undeprecate: bool,
    /// Print the updated image as a JSON object instead of `field value` lines
    #[arg(long)]
    json: bool,
}

impl ImageCmd {
    /// Whether the command only looks (see `Cmd::looks_only`).
    pub fn looks_only(&self) -> bool {
        self.intent() == Intent::Read
    }

    /// What the command does with the depot: the read-only commands work
    /// on a full filesystem without writing; delete releases the space
    /// reserve.
    pub fn intent(&self) -> Intent {
        match self {
            ImageCmd::List(_)
            | ImageCmd::Show { .. }
            | ImageCmd::Export { .. }
            | ImageCmd::Verify { .. }
            | ImageCmd::History { .. }
            | ImageCmd::Shares { .. } => Intent::Read,
            ImageCmd::Delete { .. } => Intent::Free,
            _ => Intent::Write,
        }
    }
}

/// Runs one `image` subcommand on `depot`.
pub fn run(depot: &Depot, cmd: ImageCmd, progress: &dyn Progress) -> anyhow::Result<()> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        ImageCmd::Import(a) => import(depot, a, progress, out),
        ImageCmd::Build(a) => {
            let (opts, json) = a.into_options();
            let info = depot.build_image(&opts, progress)?;
            print_new(out, &info, json)
        }
        ImageCmd::Create {
            from_instance,
            name,
            live,
            description,
            json,
        } => {
            depot.check_local_name(&name)?;
            let mut opts = CaptureOptions::new(name);
            opts.live = live;
            opts.description = description;
            let info = depot.capture(&from_instance, &opts, progress)?;
            print_new(out, &info, json)
        }
        ImageCmd::List(a) => list(depot, a, out),
        ImageCmd::Update(a) => update(depot, a, out),
        ImageCmd::Share { image, with } => {
            let i = depot.share_image(&image, &with)?;
            let with = esc(&i.shared_with.join(", ")).into_owned();
            writeln!(out, "{} ({}) is shared with {with}", esc(&i.name), i.id)?;
            Ok(())
        }
        ImageCmd::Unshare { image, with } => {
            let i = depot.unshare_image(&image, &with)?;
            let (name, with) = (esc(&i.name), esc(&with));
            writeln!(out, "{name} ({}) is no longer shared with {with}", i.id)?;
            Ok(())
        }
        ImageCmd::Shares { image, json } => {
            let accounts = depot.image_shares(&image)?;
            if json {
                return print_json(out, &accounts);
            }
            for a in accounts {
                writeln!(out, "{}", esc(&a))?;
            }
            Ok(())
        }
        ImageCmd::Copy {
            image,
            to_depot,
            name,
            json,
        } => {
            let r = depot.copy_image(&image, &to_depot, name.as_deref(), progress)?;
            if json {
                return print_json(out, &r);
            }
            print_copy(out, &r, &to_depot)
        }
        ImageCmd::History { image, json } => {
            let h = depot.image_history(&image)?;
            if json {
                return print_json(out, &h);
            }
            print_history(out, &h)
        }
        ImageCmd::Show { image, json } => match depot.remote_reference(&image) {
            Some((remote, image)) => {
                let info = depot.remote(remote)?.show(image, depot.account())?;
                show(out, &info, json)
            }
            None => show(out, &depot.image(&image)?, json),
        },
        ImageCmd::Export {
            image,
            out: path,
            format,
        } => export(depot, &image, &path, format, progress, out),
        ImageCmd::Delete { image, force } => {
            if let Some((remote, image)) = depot.remote_reference(&image) {
                return delete_remote(depot, remote, image, out);
            }
            let i = depot.delete_image(&image, force)?;
            let name = esc(&i.name);
            writeln!(
                out,
                "deleted {name} ({}); run `vmdepot gc` to free its data",
                i.id
            )?;
            Ok(())
        }
        ImageCmd::Verify { image, json } => {
            let report = match image.as_deref() {
                Some(r) if depot.remote_reference(r).is_some() => {
                    let (remote, img) = remote_image(depot, r, Op::Verify)?;
                    remote.verify_image(&img, progress)?
                }
                image => depot.verify(image, progress)?,
            };
            print_verify(out, &report, json)
        }
        ImageCmd::Push {
            image,
            remote,
            name,
            json,
        } => {
            let r = depot.remote(&remote)?;
            let report = depot.push_image(&r, &image, name.as_deref(), progress)?;
            print_push(out, &report, &remote, json)
        }
        ImageCmd::Pull { image, name, json } => {
            let (remote, img) = remote_image(depot, &image, Op::Copy)?;
            let report = depot.pull_image(&remote, &img, name.as_deref(), progress)?;
            print_pull(out, &report, json)
        }
    }
}

/// `image delete REMOTE:IMAGE`.
fn delete_remote(
    depot: &Depot,
    remote: &str,
    image: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let i = depot.delete_remote_image(&depot.remote(remote)?, image)?;
    let what = match i.name.is_empty() {
        true => format!("damaged image {}", i.id),
        false => format!("{} ({})", esc(&i.name), i.id),
    };
    writeln!(
        out,
        "deleted {what} from remote {remote}; run `vmdepot gc --remote {remote}` to free its data"
    )?;
    Ok(())
}

/// `image import`.
fn import(
    depot: &Depot,
    a: ImportArgs,
    progress: &dyn Progress,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (file, json) = (a.file.clone(), a.json);
    let opts = a.into_options()?;
    depot.check_local_name(&opts.name)?;
    let info = depot.import(&file, &opts, progress)?;
    print_new(out, &info, json)
}

impl ImportArgs {
    /// The library's options; marketplace fields only on (and required
    /// by) a marketplace image.
    fn into_options(self) -> anyhow::Result<ImportOptions> {
        let format = SourceFormat::parse(&self.format)?;
        self.check_marketplace(self.kind)?;
        let mut opts = ImportOptions::new(self.name);
        opts.kind = self.kind;
        opts.description = self.description;
        opts.format = format;
        opts.reread = self.reread;
        opts.vendor = self.vendor;
        opts.application = self.application;
        opts.app_version = self.app_version;
        opts.tags = self.tags;
        Ok(opts)
    }

    fn check_marketplace(&self, kind: ImageType) -> anyhow::Result<()> {
        let market = kind == ImageType::Marketplace;
        let any =
            !(self.vendor.is_empty() && self.application.is_empty() && self.app_version.is_empty());
        if !market && any {
            anyhow::bail!(vmdepot::Error::Usage(
                "--vendor, --application and --app-version are for --type marketplace".into()
            ));
        }
        if market && (self.vendor.is_empty() || self.application.is_empty()) {
            anyhow::bail!(vmdepot::Error::Usage(
                "a marketplace image needs --vendor and --application (and --app-version)".into()
            ));
        }
        Ok(())
    }
}

/// A new image: as JSON, or its id alone.
fn print_new(out: &mut impl Write, info: &ImageInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out, info);
    }
    writeln!(out, "{}", info.id)?;
    Ok(())
}

/// `image list`: the images of the type, with all the tags, asked for.
fn list(depot: &Depot, a: ListArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let want = a.tags;
    let all = match &a.remote {
        Some(remote) => {
            let (list, damaged) = depot.remote(remote)?.list_images(depot.account())?;
            warn_damaged(&damaged);
            list
        }
        None => depot.list_images()?,
    };
    let list: Vec<_> = all
        .into_iter()
        .filter(|i| a.all || !i.deprecated)
        .filter(|i| a.kind.is_none_or(|k| i.kind == Some(k)))
        .filter(|i| want.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
        .collect();
    if a.json {
        return print_json(out, &list);
    }
    print_image_table(out, &list)
}

fn print_image_table(out: &mut impl Write, list: &[ImageInfo]) -> anyhow::Result<()> {
    let mut t = Table::new(&["ID", "NAME", "TYPE", "STATE", ">SIZE", ">STORED", "CREATED"]);
    for i in list {
        t.row(vec![
            i.id.clone(),
            esc(&i.name).into_owned(),
            i.kind.map_or("-".into(), |k| k.to_string()),
            i.state.to_string(),
            human(i.virtual_size),
            human(i.unique_stored_bytes + i.shared_stored_bytes),
            i.created_at.to_string(),
        ]);
    }
    t.print(out)
}

/// `image update`.
fn update(depot: &Depot, a: UpdateArgs, out: &mut impl Write) -> anyhow::Result<()> {
    if let Some(n) = &a.name {
        depot.check_local_name(n)?;
    }
    let u = ImageUpdate {
        name: a.name,
        description: a.description,
        protected: (a.protect || a.unprotect).then_some(a.protect),
        deprecated: (a.deprecate || a.undeprecate).then_some(a.deprecate),
        tags: a.tags,
    };
    let info = depot.update_image(&a.image, &u)?;
    show(out, &info, a.json)
}

fn print_copy(out: &mut impl Write, r: &CopyReport, to_depot: &Path) -> anyhow::Result<()> {
    writeln!(
        out,
        "{}  {} in {}: {} of {} chunks sent ({}), {} already there",
        r.image.id,
        esc(&r.image.name),
        esc(&to_depot.display().to_string()),
        r.chunks_sent,
        r.chunks,
        human(r.bytes_sent),
        r.chunks_present
    )?;
    Ok(())
}

fn print_history(out: &mut impl Write, history: &[HistoryEntry]) -> anyhow::Result<()> {
    let mut t = Table::new(&["RELATION", "ID", "NAME", "DEPOT", "EXISTS"]);
    for e in history {
        let depot = match &e.depot {
            None => "-".into(),
            Some(d) => esc(d).into_owned(),
        };
        t.row(vec![
            e.relation.to_string(),
            esc(&e.id).into_owned(),
            esc(&e.name).into_owned(),
            depot,
            if e.exists { "yes" } else { "no (deleted)" }.into(),
        ]);
    }
    t.print(out)
}

/// `image export`: to a file or device, or the raw image to stdout (`-`).
fn export(
    depot: &Depot,
    image: &str,
    path: &Path,
    format: ExportFormat,
    progress: &dyn Progress,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if path.as_os_str() != "-" {
        depot.export(image, path, format, progress)?;
        return Ok(());
    }
    if format != ExportFormat::Raw {
        anyhow::bail!(vmdepot::Error::Usage(
            "`-` streams the raw image to stdout: qcow2 needs a file (give a path)".into()
        ));
    }
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    depot.export_to(image, &mut w, progress)?;
    Ok(())
}

/// A clap value parser that checks a value with the library's `parse`
/// (its error is clap's usage error, exit code 2) and keeps the text.
fn checked<T: 'static>(
    parse: fn(&str) -> vmdepot::Result<T>,
) -> impl Fn(&str) -> vmdepot::Result<String> + Clone + Send + Sync + 'static {
    move |s| parse(s).map(|_| s.to_owned())
}

/// A `--tag KEY=VALUE` argument (a value is required).
fn tag(t: &str) -> Result<(String, String), String> {
    match tag_or_removal(t)? {
        (k, v) if v.is_empty() => Err(format!("--tag {k}= has no value: use KEY=VALUE")),
        kv => Ok(kv),
    }
}

/// A `--tag KEY=VALUE` argument of `image update` (`KEY=`: remove it).
fn tag_or_removal(t: &str) -> Result<(String, String), String> {
    match t.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("use KEY=VALUE".into()),
    }
}
