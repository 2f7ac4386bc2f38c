//! The `vmdepot` command line: [`Cli`] (the global flags) and [`run`],
//! which opens the depot with the [`Intent`] of the command and hands it to
//! its group, one file each: `image.rs` (`image …`), `instance.rs`
//! (`instance …`), `maint.rs` (`gc`, `fsck`, `stats`), `remote.rs`
//! (`remote …`, and the `REMOTE:IMAGE` references of the others). Beside them:
//! `output.rs` (JSON, fields, escaping, sizes), `progress.rs` (progress
//! bars or lines), `terminal.rs` (foreground runs, the serial console) and
//! `input.rs` (key and user-data files).

mod image;
mod input;
mod instance;
mod maint;
pub mod output;
mod progress;
mod remote;
mod terminal;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vmdepot::{Depot, DepotOptions, Intent};

use maint::MaintCmd;
use progress::CliProgress;

/// The exit codes, as `--help` lists them (and README.md): a macro, for
/// `concat!`.
macro_rules! exit_codes {
    () => {
        "Exit codes: 0 success; 1 error (a name taken; an image protected, shared or in use; an \
instance running); 2 usage (a bad flag or value, a name matching several images too); 3 not \
found (an image, instance, remote, or no depot for a command that only looks); 4 refused or \
bad input; 5 damaged store (fsck found damage); 6 no space; 7 not permitted for this account; \
8 a remote failed (credentials, bucket, endpoint, network, throttling: the message names the \
remote, the object and the status)"
    };
}

/// The heading of the global flags in every command's help.
const GLOBAL: &str = "Global options";

/// The command line: global flags and one command.
#[derive(Parser)]
#[command(
    name = "vmdepot",
    version,
    about = "Local machine-image depot for a hypervisor host",
    long_about = None,
    after_help = exit_codes!(),
    after_long_help = concat!(
        "Examples:
  vmdepot image import debian-12.qcow2 --name debian-12
  vmdepot instance run debian-12 --name web --forward 8080:80
  vmdepot --depot /srv/depot --group vmusers image list

",
        exit_codes!()
    )
)]
pub struct Cli {
    /// The depot directory [default: $VMDEPOT_DIR, else /var/lib/vmdepot or a per-user one]
    ///
    /// Without --depot and $VMDEPOT_DIR: /var/lib/vmdepot for root, else $XDG_DATA_HOME/vmdepot
    /// (~/.local/share/vmdepot). The first command that writes (import, instance run, remote add)
    /// creates the depot; a command that only looks (list, show, logs, export, verify, fsck,
    /// stats) creates none: where there is none it exits 3.
    #[arg(long, global = true, value_name = "DIR", help_heading = GLOBAL)]
    depot: Option<PathBuf>,
    /// Act as this account [default: $VMDEPOT_ACCOUNT, else the Unix user]
    ///
    /// An account name is a Unix user name: 1-32 characters, a lowercase letter or `_` first,
    /// then lowercase letters, digits, `_` or `-`, optionally a final `$`.
    #[arg(long, global = true, value_name = "NAME", help_heading = GLOBAL)]
    account: Option<String>,
    /// Create the depot shared by this Unix group instead of private to you
    ///
    /// Only when the command creates the depot: directories 2770 (setgid), files 0660, group
    /// GROUP, kept in DEPOT/group (later commands need no --group). Else the depot is private:
    /// directories 0700, files 0600.
    #[arg(long, global = true, value_name = "GROUP", help_heading = GLOBAL)]
    group: Option<String>,
    /// Print no progress bars or lines
    #[arg(long, short, global = true, help_heading = GLOBAL)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage images
    #[command(
        subcommand,
        after_long_help = "Examples:
  vmdepot image import debian-12.qcow2 --name debian-12
  vmdepot image ls --type custom
  vmdepot image export debian-12 out.qcow2 --format qcow2"
    )]
    Image(image::ImageCmd),
    /// Run and manage instances (QEMU virtual machines) of images
    #[command(
        subcommand,
        after_long_help = "Examples:
  vmdepot instance run debian-12 --name web --forward 8080:80
  vmdepot instance ls
  vmdepot instance stop web db"
    )]
    Instance(instance::InstanceCmd),
    /// Remote depots on S3-compatible object storage, shared by several hosts
    #[command(
        subcommand,
        after_long_help = "Examples:
  vmdepot remote add eu s3://images/prod --endpoint http://garage:3900 --region garage
  vmdepot image push web-v2 eu
  vmdepot image pull eu:web-v2"
    )]
    Remote(remote::RemoteCmd),
    #[command(flatten)]
    Maint(MaintCmd),
    /// The lazy disk server of one image (started by vmdepot itself)
    #[command(hide = true)]
    DiskServer {
        /// The image id
        image: String,
    },
}

impl Cli {
    /// How to open the depot for a command of this intent. A command
    /// that only looks creates no depot (unless --group asks for one).
    fn options(&self, intent: Intent) -> DepotOptions {
        DepotOptions {
            account: self.account.clone(),
            group: self.group.clone(),
            intent,
            existing_only: self.cmd.looks_only() && self.group.is_none(),
        }
    }
}

impl Cmd {
    /// Whether the command only looks at the depot (list, show, logs,
    /// export, verify, fsck, stats, `gc --dry-run` …): then a missing depot
    /// is an error (exit 3), not created.
    fn looks_only(&self) -> bool {
        match self {
            Cmd::Image(c) => c.looks_only(),
            Cmd::Instance(c) => c.looks_only(),
            Cmd::Remote(c) => matches!(c, remote::RemoteCmd::List { .. }),
            Cmd::Maint(c) => c.intent() == Intent::Read,
            Cmd::DiskServer { .. } => true,
        }
    }

    /// What the command does with the depot (see [`Intent`]).
    fn intent(&self) -> Intent {
        match self {
            Cmd::Image(c) => c.intent(),
            Cmd::Instance(_) | Cmd::Remote(_) | Cmd::DiskServer { .. } => Intent::Write,
            Cmd::Maint(c) => c.intent(),
        }
    }
}

/// Runs the command; returns the exit code of a command that ran (5: fsck
/// found damage; QEMU's for a foreground instance).
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let dir = cli.depot.clone().unwrap_or_else(Depot::default_dir);
    if let Cmd::Maint(MaintCmd::Fsck {
        json, repair: true, ..
    }) = cli.cmd
    {
        return maint::repair(&dir, &cli.options(Intent::Write), json);
    }
    let depot = Depot::open_with(&dir, &cli.options(cli.cmd.intent()))?;
    let progress = CliProgress::new(cli.quiet);
    match cli.cmd {
        Cmd::Image(cmd) => image::run(&depot, cmd, &progress).map(|()| 0),
        Cmd::Instance(cmd) => instance::run(&depot, cmd, &progress),
        Cmd::Remote(cmd) => remote::run(&depot, cmd).map(|()| 0),
        Cmd::Maint(cmd) => maint::run(&depot, cmd, &progress),
        Cmd::DiskServer { image } => vmdepot::serve_lazy_disks(&depot, &image)
            .map(|()| 0)
            .map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every argument of every (sub)command has help, every command
    /// examples in its long help (the integration tests check the same
    /// through the binary's output).
    #[test]
    fn every_argument_has_help_and_every_command_examples() {
        let mut cli = Cli::command();
        cli.build();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "vmdepot", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        if cmd.is_hide_set() || cmd.get_name() == "help" {
            return;
        }
        for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                missing.push(format!("{path}: {} has no help", a.get_id()));
            }
        }
        let examples = cmd.get_after_long_help().map(|h| h.to_string());
        if !examples.is_some_and(|h| h.starts_with("Examples:\n  vmdepot ")) {
            missing.push(format!("{path}: no examples"));
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
}
