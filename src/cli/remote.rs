//! `vmdepot remote …` ([`RemoteCmd`]: add, list, remove) and what the
//! other groups need to reach a remote: [`remote_image`] (a
//! `REMOTE:IMAGE` reference resolved under the access rules), and the
//! printing of push, pull and remote gc reports, plain or `--json`.

use std::io::Write;

use clap::Subcommand;
use vmdepot::{Depot, Op, PullReport, PushReport, Remote, RemoteGcReport, RemoteImage, RemoteInfo};

use super::output::{esc, human, print_json, Table};

/// The subcommands of `vmdepot remote`.
#[derive(Subcommand)]
pub enum RemoteCmd {
    /// Add a remote depot: an S3 bucket, or a prefix in one, that several hosts share
    ///
    /// Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), else the
    /// shared credentials file (AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials; AWS_PROFILE);
    /// nothing secret is written to the depot (an --endpoint with USER:PASSWORD@ is refused). An
    /// empty prefix gets the remote's marker object; a prefix holding other objects, or inside
    /// another remote, is refused. Local image names NAME:... are refused (NAME:IMAGE means the
    /// remote's image).
    #[command(after_long_help = "Examples:
  vmdepot remote add eu s3://images/prod --endpoint http://garage:3900 --region garage
  vmdepot remote add aws s3://my-bucket/vmdepot --region eu-west-1")]
    Add {
        /// The remote's name on this host: [a-z0-9][a-z0-9_-]{0,62}
        name: String,
        /// The bucket, or a prefix in it: s3://BUCKET[/PREFIX]
        url: String,
        /// The S3 endpoint URL (Garage, MinIO, Ceph RGW) [default: AWS S3]
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// The S3 region [default: the client's]
        #[arg(long, value_name = "REGION")]
        region: Option<String>,
    },
    /// List the remotes of this depot (JSON: name, url, endpoint, region, added_at)
    #[command(
        visible_alias = "ls",
        after_long_help = "Examples:
  vmdepot remote list
  vmdepot remote ls --json"
    )]
    List {
        /// Print a JSON array of remotes instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Forget a remote on this host (its config and index cache; nothing on the remote changes)
    #[command(
        visible_alias = "rm",
        after_long_help = "Examples:
  vmdepot remote remove eu
  vmdepot remote rm eu"
    )]
    Remove {
        /// The remote's name on this host
        name: String,
    },
}

/// Runs one `remote` subcommand.
pub fn run(depot: &Depot, cmd: RemoteCmd) -> anyhow::Result<()> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        RemoteCmd::Add {
            name,
            url,
            endpoint,
            region,
        } => {
            let r = depot.add_remote(&name, &url, endpoint.as_deref(), region.as_deref())?;
            writeln!(out, "added remote {} ({})", r.name, esc(&r.url))?;
        }
        RemoteCmd::List { json } => {
            let list = depot.remotes()?;
            if json {
                return print_json(out, &list);
            }
            print_remotes(out, &list)?;
        }
        RemoteCmd::Remove { name } => {
            let r = depot.remove_remote(&name)?;
            writeln!(
                out,
                "removed remote {} ({}) from this depot; nothing on the remote changed",
                r.name,
                esc(&r.url)
            )?;
        }
    }
    Ok(())
}

fn print_remotes(out: &mut impl Write, list: &[RemoteInfo]) -> anyhow::Result<()> {
    let mut t = Table::new(&["NAME", "URL", "ENDPOINT", "REGION", "ADDED"]);
    for r in list {
        t.row(vec![
            r.name.clone(),
            esc(&r.url).into_owned(),
            esc(r.endpoint.as_deref().unwrap_or("-")).into_owned(),
            esc(r.region.as_deref().unwrap_or("-")).into_owned(),
            r.added_at.to_string(),
        ]);
    }
    t.print(out)
}

/// The remote and the image of a `REMOTE:IMAGE` reference that the
/// account may `op`; an error if REMOTE is no configured remote.
pub fn remote_image(
    depot: &Depot,
    reference: &str,
    op: Op,
) -> anyhow::Result<(Remote, RemoteImage)> {
    let Some((name, image)) = depot.remote_reference(reference) else {
        anyhow::bail!(vmdepot::Error::Usage(format!(
            "{reference:?} is not REMOTE:IMAGE of a configured remote: see `vmdepot remote list`"
        )));
    };
    let remote = depot.remote(name)?;
    let listing = remote.images()?;
    let img = remote.find(&listing, image, depot.account(), op)?;
    Ok((remote, img))
}

/// One warning line on stderr per damaged object of a remote's listing.
pub fn warn_damaged(damaged: &[String]) {
    for d in damaged {
        eprintln!("vmdepot: warning: {}", esc(d));
    }
}

/// `image push`: as JSON, or one line.
pub fn print_push(
    out: &mut impl Write,
    r: &PushReport,
    remote: &str,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(out, r);
    }
    let what = format!("{}  {} on remote {remote}", r.image.id, esc(&r.image.name));
    if r.already {
        writeln!(out, "{what}: already there")?;
        return Ok(());
    }
    writeln!(
        out,
        "{what}: {} of {} chunks sent ({}), {} already there",
        r.chunks_sent,
        r.chunks,
        human(r.bytes_sent),
        r.chunks_present
    )?;
    Ok(())
}

/// `image pull`: as JSON, or one line.
pub fn print_pull(out: &mut impl Write, r: &PullReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out, r);
    }
    writeln!(
        out,
        "{}  {}: {} of {} chunks fetched ({}), {} already here",
        r.image.id,
        esc(&r.image.name),
        r.chunks_fetched,
        r.chunks,
        human(r.bytes_fetched),
        r.chunks_present
    )?;
    Ok(())
}

/// `gc --remote`: as JSON, or a line (and one per damaged index).
pub fn print_remote_gc(out: &mut impl Write, r: &RemoteGcReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out, r);
    }
    for d in &r.damaged {
        writeln!(out, "kept (its index is damaged): {}", esc(d))?;
    }
    writeln!(
        out,
        "remote {}: {}{} packs and {} indexes retired ({}), {} packs revived, {} packs, {} indexes and {} manifests purged; {} freed",
        r.remote,
        if r.lock_broken { "stale lock broken; " } else { "" },
        r.packs_retired,
        r.indexes_retired,
        human(r.bytes_retired),
        r.packs_revived,
        r.packs_purged,
        r.indexes_purged,
        r.manifests_purged,
        human(r.bytes_freed)
    )?;
    if r.dry_run {
        writeln!(out, "(dry run: nothing changed)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    fn parses(args: &[&str]) -> bool {
        Cli::try_parse_from(std::iter::once("vmdepot").chain(args.iter().copied())).is_ok()
    }

    #[test]
    fn the_remote_commands_parse() {
        for ok in [
            &[
                "remote",
                "add",
                "r",
                "s3://b/p",
                "--endpoint",
                "http://h:3900",
                "--region",
                "garage",
            ][..],
            &["remote", "list", "--json"],
            &["remote", "remove", "r"],
            &["image", "push", "img", "r", "--name", "n", "--json"],
            &["image", "pull", "r:img", "--name", "n", "--json"],
            &["image", "list", "--remote", "r", "--json"],
            &["image", "show", "r:img", "--json"],
            &["image", "delete", "r:img"],
            &["image", "verify", "r:img", "--json"],
            &["gc", "--remote", "r", "--dry-run", "--break-lock", "--json"],
            &["instance", "run", "r:img", "--count", "2"],
        ] {
            assert!(parses(ok), "{ok:?}");
        }
        for bad in [
            &["remote", "add", "r"][..],
            &["image", "push", "img"],
            &["gc", "--break-lock"],
        ] {
            assert!(!parses(bad), "{bad:?}");
        }
    }
}
