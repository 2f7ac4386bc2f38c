//! README.md's "Using it" section, command for command. Every ```sh block
//! between "## Using it" and "## As a library" is read at test time, and
//! each of its command lines (a synopsis) becomes invocations of the real
//! binary by the rules below, run in the README's order on fresh depots
//! (`VMDEPOT_DIR`) with the tiny test guest and a real Garage cluster.
//! Each must exit 0, and where the README's comment promises something
//! cheap to check (`--json` is JSON, `or: image ls` says the same, a guest
//! stopped by its power button saw it …), that holds.
//!
//! The rules, written once; a line they do not cover fails the test:
//! - a line is `vmdepot …`; one that starts with spaces and `[--`
//!   continues the line above; ` # …` is its comment. The only comment
//!   line is `# on another host …`: the story moves to a second depot,
//!   where the `remote add`s so far are run again.
//! - The story runs twice, each time on fresh depots: [`Pass::Bare`] drops
//!   every optional `[…]` group, [`Pass::Full`] fills each in (a
//!   repeatable `[…]...` once); `…` (more of the same) is dropped.
//! - `a|b|c` of words (subcommands, flags) runs each, in order; `a|b|c` as
//!   a flag's value runs the first, and each when the command only looks
//!   (README: `image list|show|export|…`, [`LOOKS`]).
//! - `...` or `[...]`: the other flags of the command, as the first line
//!   of that command shows them (full: its optional flag groups, each
//!   value its first; bare: none).
//! - Placeholders (`IMAGE`, `N`, `T`, `K=V`, `H`, `FILE`) by [`placeholder`];
//!   an absolute path `/x/y` is `TMP/root/x/y` and `~/x` is `TMP/home/x`;
//!   a relative file is a fixture in TMP (the working directory, see
//!   [`make_fixtures`]); the bucket of `s3://…` and the `--endpoint` are
//!   the test cluster's; `--forward 8080:80` forwards a free host port;
//!   `> FILE` redirects stdout.
//! - A guest a command started is waited for (its serial console says it
//!   is ready) before the next command; `--foreground` runs until the
//!   guest is ready, then SIGTERM presses its power button; `instance
//!   console` gets a line through, then Ctrl-] detaches; `logs --follow`
//!   follows until a later command stops its guest, then must end by
//!   itself.
//! - After `image push IMG REMOTE --name N`, later `REMOTE:IMG`s are
//!   `REMOTE:N` (the name it has there).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::garage::{Garage, REGION};

/// The commands that only look (README.md: "A command that only looks —
/// …"): a flag's alternative values are each run for these.
const LOOKS: &[&str] = &[
    "image list",
    "image show",
    "image export",
    "image verify",
    "image history",
    "image shares",
    "instance list",
    "instance show",
    "instance logs",
    "instance console",
    "instance unit",
    "remote list",
    "fsck",
    "stats",
];

/// How long one command may run before the test kills it and fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// The line `instance console` sends, which the test guest echoes.
const CONSOLE_LINE: &str = "readme console check";

/// The user-data file's first line, which the test guest prints.
const USER_DATA: &str = "#!/bin/sh readme user-data 4d1";

// ---------------------------------------------------------------- parsing

/// One piece of a synopsis.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    /// `a|b|c`.
    Alt(Vec<String>),
    /// `[…]`, optional (a trailing `...`, repeatable, is filled in once).
    Group(Vec<Tok>),
    /// `...` or `[...]`: the command's other flags, as shown above.
    Inherit,
    /// `…`: more of the same.
    More,
    /// `> FILE`.
    Redirect(String),
}

/// A command line of the section, continuation lines joined.
#[derive(Debug)]
struct Synopsis {
    /// README.md's line number of its first line.
    at: usize,
    text: String,
    /// What follows `vmdepot`.
    toks: Vec<Tok>,
    /// Its comment (after ` # `), continuation lines' too.
    comment: String,
}

#[derive(Debug)]
enum Step {
    Run(Synopsis),
    /// `# on another host …`.
    OtherHost,
}

/// The section's command lines, in order.
fn steps() -> Vec<Step> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    parse_section(&readme).unwrap_or_else(|e| panic!("{}:{e}", path.display()))
}

/// The steps of the "Using it" section of `readme`; an error names the
/// line no rule covers (`LINE: what`).
fn parse_section(readme: &str) -> Result<Vec<Step>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "## Using it")
        .ok_or("0: no \"## Using it\" section")?;
    let end = lines[start..]
        .iter()
        .position(|l| *l == "## As a library")
        .map(|n| start + n)
        .ok_or("0: no \"## As a library\" after \"## Using it\"")?;
    let (mut steps, mut in_block, mut blocks) = (Vec::new(), false, 0);
    for (i, line) in lines.iter().enumerate().take(end).skip(start) {
        let at = i + 1;
        if !in_block {
            in_block = *line == "```sh";
            blocks += usize::from(in_block);
            continue;
        }
        if *line == "```" {
            in_block = false;
            continue;
        }
        let (cmd, comment) = split_comment(line);
        if let Some(rest) = cmd.strip_prefix("vmdepot ") {
            let toks = tokens(rest).map_err(|e| format!("{at}: {e}: {line}"))?;
            steps.push(Step::Run(Synopsis {
                at,
                text: line.trim_end().to_owned(),
                toks,
                comment: comment.to_owned(),
            }));
        } else if line.starts_with(' ') && line.trim_start().starts_with("[--") {
            let Some(Step::Run(s)) = steps.last_mut() else {
                return Err(format!("{at}: a continuation line without its command"));
            };
            s.toks
                .extend(tokens(cmd).map_err(|e| format!("{at}: {e}: {line}"))?);
            s.text = format!("{}\n{}", s.text, line.trim_end());
            s.comment = format!("{} {comment}", s.comment).trim().to_owned();
        } else if line.starts_with("# on another host") {
            steps.push(Step::OtherHost);
        } else if !line.trim().is_empty() {
            return Err(format!("{at}: no rule covers this line: {line}"));
        }
    }
    if in_block {
        return Err(format!("{end}: a ```sh block that does not end"));
    }
    if blocks == 0 {
        return Err(format!("{start}: no ```sh block in \"## Using it\""));
    }
    Ok(steps)
}

/// `(command, comment)`: a comment starts at ` # ` (or a line's `# `).
fn split_comment(line: &str) -> (&str, &str) {
    match line.find(" # ") {
        Some(i) => (line[..i].trim(), line[i + 3..].trim()),
        None => (line.trim(), ""),
    }
}

/// The pieces of a synopsis (what follows `vmdepot`).
fn tokens(s: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut rest = s.trim_start();
    let mut redirect = false;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or("a [ without its ]")?;
            let inner = &r[..end];
            if inner.contains('[') {
                return Err("a [ inside [ ]".into());
            }
            rest = &r[end + 1..];
            rest = rest.strip_prefix("...").unwrap_or(rest);
            if inner.trim() == "..." {
                toks.push(Tok::Inherit);
            } else {
                let group = tokens(inner)?;
                if group.is_empty() {
                    return Err("an empty [ ]".into());
                }
                toks.push(Tok::Group(group));
            }
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let (w, r) = rest.split_at(end);
            rest = r;
            if redirect {
                toks.push(Tok::Redirect(w.to_owned()));
                redirect = false;
            } else if w == ">" {
                redirect = true;
            } else if w == "..." {
                toks.push(Tok::Inherit);
            } else if w == "…" {
                toks.push(Tok::More);
            } else if w.contains(']') || w.contains('…') || w.contains("...") {
                return Err(format!("no rule for {w:?}"));
            } else if w.contains('|') {
                let alts: Vec<String> = w.split('|').map(str::to_owned).collect();
                if alts.iter().any(String::is_empty) {
                    return Err(format!("an empty alternative in {w:?}"));
                }
                toks.push(Tok::Alt(alts));
            } else {
                toks.push(Tok::Word(w.to_owned()));
            }
        }
        rest = rest.trim_start();
    }
    if redirect {
        return Err("> without its file".into());
    }
    Ok(toks)
}

// -------------------------------------------------------------- expansion

/// Which of the story's two runs: optional groups dropped, or filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    Bare,
    Full,
}

/// One invocation before its placeholders are resolved: the words after
/// `vmdepot`, and where its stdout goes.
#[derive(Clone, Debug, PartialEq)]
struct Inv {
    args: Vec<String>,
    redirect: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    W(String),
    Inherit,
    Redirect(String),
}

/// The command's name: its first two words (`image list`), or the first
/// when the second is a flag or missing (`fsck`).
fn key_of(words: &[String]) -> String {
    match words {
        [a, b, ..]
            if !b.starts_with('-') && matches!(a.as_str(), "image" | "instance" | "remote") =>
        {
            format!("{a} {b}")
        }
        [a, ..] => a.clone(),
        [] => String::new(),
    }
}

/// What `...` stands for, by command name: the optional flag groups of
/// the first line of the command that shows any (none if no line does).
fn shown_flags(steps: &[Step]) -> HashMap<String, Vec<Tok>> {
    let mut shown = HashMap::new();
    for step in steps {
        let Step::Run(s) = step else { continue };
        let words = lead_words(&s.toks);
        let flags: Vec<Tok> = s
            .toks
            .iter()
            .filter(|t| matches!(t, Tok::Group(g) if matches!(&g[0], Tok::Word(w) if w.starts_with('-'))))
            .cloned()
            .collect();
        if words.is_empty() {
            continue;
        }
        let first = shown.entry(key_of(&words)).or_insert_with(Vec::new);
        if first.is_empty() {
            *first = flags;
        }
    }
    shown
}

/// Every combination of the choices `toks` offers in `pass` (see the
/// module doc); `looks`: the command only looks.
fn combos(toks: &[Tok], pass: Pass, looks: bool) -> Vec<Vec<Piece>> {
    let mut out: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut after_flag = false;
    for t in toks {
        let choices: Vec<Vec<Piece>> = match t {
            Tok::Word(w) => vec![vec![Piece::W(w.clone())]],
            Tok::Alt(alts) if after_flag && !alts[0].starts_with('-') && !looks => {
                vec![vec![Piece::W(alts[0].clone())]]
            }
            Tok::Alt(alts) => alts.iter().map(|a| vec![Piece::W(a.clone())]).collect(),
            Tok::Group(g) => match pass {
                Pass::Bare => vec![Vec::new()],
                Pass::Full => combos(g, pass, looks),
            },
            Tok::Inherit => match pass {
                Pass::Bare => vec![Vec::new()],
                Pass::Full => vec![vec![Piece::Inherit]],
            },
            Tok::More => vec![Vec::new()],
            Tok::Redirect(f) => vec![vec![Piece::Redirect(f.clone())]],
        };
        after_flag = matches!(t, Tok::Word(w) if w.starts_with('-'));
        out = out
            .iter()
            .flat_map(|head| {
                choices.iter().map(move |c| {
                    let mut v = head.clone();
                    v.extend(c.iter().cloned());
                    v
                })
            })
            .collect();
    }
    out
}

/// The words a synopsis starts with (`vmdepot image list`), up to its
/// first option group or placeholder.
fn lead_words(toks: &[Tok]) -> Vec<String> {
    toks.iter()
        .map_while(|t| match t {
            Tok::Word(w) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

/// The invocations of one synopsis in `pass`, in order.
fn expand(s: &Synopsis, pass: Pass, shown: &HashMap<String, Vec<Tok>>) -> Result<Vec<Inv>, String> {
    let lead = lead_words(&s.toks);
    let looks = LOOKS.contains(&key_of(&lead).as_str());
    let mut invs = Vec::new();
    for pieces in combos(&s.toks, pass, looks) {
        let words: Vec<String> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::W(w) => Some(w.clone()),
                _ => None,
            })
            .collect();
        let key = key_of(&words);
        let mut inv = Inv {
            args: Vec::new(),
            redirect: None,
        };
        for p in pieces {
            match p {
                Piece::W(w) => inv.args.push(w),
                Piece::Redirect(f) => inv.redirect = Some(f),
                Piece::Inherit => {
                    let flags = shown.get(&key).ok_or_else(|| {
                        format!("no line above shows the flags of `{key}` (`...`)")
                    })?;
                    // Each value its first: the flags as a group, once.
                    let first = combos(flags, Pass::Full, false).swap_remove(0);
                    inv.args.extend(first.into_iter().filter_map(|p| match p {
                        Piece::W(w) => Some(w),
                        _ => None,
                    }));
                }
            }
        }
        invs.push(inv);
    }
    Ok(invs)
}

// ----------------------------------------------------------- placeholders

/// What the story's placeholders stand for: the placeholder, the word
/// before it (its flag), the command.
fn placeholder(p: &str, flag: &str, key: &str) -> Option<&'static str> {
    Some(match (p, flag, key) {
        ("IMAGE", _, "image verify") => "debian-12",
        ("N", "-n", _) => "5",
        ("N", "--name", "instance backup") => "web-nightly",
        ("N", "--name", "image push") => "web",
        ("N", "--name", "image pull") => "web-here",
        ("T", "--description", _) => "nginx 1.24",
        ("K=V", "--tag", _) => "stage=prod",
        ("H", "--hostname", _) => "web-host",
        ("FILE", "--user-data", _) => "user-data",
        _ => return None,
    })
}

/// A word in capitals (`N`, `FILE`, `K=V`): a placeholder.
fn is_placeholder(w: &str) -> bool {
    w.starts_with(|c: char| c.is_ascii_uppercase())
        && w.chars()
            .all(|c| c.is_ascii_uppercase() || c == '=' || c == '_')
}

/// What the story's files and services are in a test.
struct Place {
    /// The temp dir: the working directory, `/` and `~` below it.
    tmp: PathBuf,
    /// The test cluster's bucket and S3 endpoint.
    bucket: String,
    endpoint: String,
    /// A free host port for `--forward`.
    port: u16,
}

impl Place {
    /// The words of `inv` as the binary gets them; `renames` are the
    /// `REMOTE:IMAGE` references that pushes renamed.
    fn resolve(
        &self,
        args: &[String],
        renames: &[(String, String)],
    ) -> Result<Vec<String>, String> {
        let key = key_of(args);
        let mut out = Vec::new();
        for (i, a) in args.iter().enumerate() {
            let flag = if i > 0 { args[i - 1].as_str() } else { "" };
            let v = if is_placeholder(a) {
                placeholder(a, flag, &key)
                    .ok_or_else(|| {
                        format!("no rule for the placeholder {a} (after {flag:?}, in `{key}`)")
                    })?
                    .to_owned()
            } else if let Some(p) = a.strip_prefix('/') {
                self.file(&self.tmp.join("root").join(p))
            } else if let Some(p) = a.strip_prefix("~/") {
                self.file(&self.tmp.join("home").join(p))
            } else if let Some(p) = a.strip_prefix("s3://") {
                let (_, prefix) = p.split_once('/').unwrap_or((p, ""));
                format!("s3://{}/{prefix}", self.bucket)
            } else if flag == "--endpoint" {
                self.endpoint.clone()
            } else if flag == "--forward" {
                let (_, guest) = a
                    .split_once(':')
                    .ok_or_else(|| format!("--forward {a}: not HOST:GUEST"))?;
                format!("{}:{guest}", self.port)
            } else {
                a.clone()
            };
            let v = match renames.iter().find(|(old, _)| *old == v) {
                Some((_, new)) => new.clone(),
                None => v,
            };
            out.push(v);
        }
        Ok(out)
    }

    /// `p` as a string, its directory made (as on a real host).
    fn file(&self, p: &Path) -> String {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p.to_str().unwrap().to_owned()
    }
}

/// The story's files, in `tmp` (its working directory): the test guest as
/// `debian.qcow2` (and `app.qcow2`), another disk as `debian-11.vmdk`,
/// the user-data file, and an SSH key pair in `~/.ssh`.
fn make_fixtures(tmp: &Path) {
    to_qcow2(test_guest(), &tmp.join("debian.qcow2"));
    std::fs::copy(tmp.join("debian.qcow2"), tmp.join("app.qcow2")).unwrap();
    let old = tmp.join("debian-11.raw");
    synthetic_raw(&old, 8, 11);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        old.to_str().unwrap(),
        tmp.join("debian-11.vmdk").to_str().unwrap(),
    ]);
    std::fs::write(tmp.join("user-data"), format!("{USER_DATA}\necho hi\n")).unwrap();
    let ssh = tmp.join("home/.ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "readme", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen -f {}", key.display());
}

// ---------------------------------------------------------------- running

/// A command running in the background, its output read as it comes.
struct Running {
    child: Child,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
    what: String,
}

/// What a finished command said.
struct Said {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Running {
    fn spawn(mut cmd: Command, what: String) -> Running {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        let reader = |r: Option<Box<dyn Read + Send>>| {
            r.map(|mut r| {
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    let _ = r.read_to_end(&mut v);
                    v
                })
            })
        };
        let out = reader(child.stdout.take().map(|s| Box::new(s) as _));
        let err = reader(child.stderr.take().map(|s| Box::new(s) as _));
        Running {
            child,
            out,
            err,
            what,
        }
    }

    /// Waits for its end (killed and failed after `limit`).
    fn finish(mut self, limit: Duration) -> Said {
        let end = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{}: still running after {limit:?} (killed)", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            String::from_utf8_lossy(&h.map(|h| h.join().unwrap()).unwrap_or_default()).into_owned()
        };
        Said {
            status,
            stdout: text(self.out.take()),
            stderr: text(self.err.take()),
        }
    }

    /// Whether it has ended.
    fn ended(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.ended() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `instance logs … --follow`, running until its guest stops.
struct Follower {
    run: Running,
    host: usize,
    instance: String,
    /// The lines `-n` asked for.
    lines: usize,
}

/// One run of the story (a pass) on fresh depots.
struct Story<'a> {
    pass: Pass,
    t: &'a T,
    place: Place,
    /// The cluster's key, in the environment of every command.
    key_id: String,
    secret: String,
    /// 0: this host (`T::depot`); 1: another host.
    host: usize,
    /// The `remote add`s run so far (run again on another host).
    remote_adds: Vec<Vec<String>>,
    renames: Vec<(String, String)>,
    /// Per (host, instance id): the pid of its QEMU last seen running and
    /// how many boots it has had.
    boots: HashMap<(usize, String), (i64, usize)>,
    follower: Option<Follower>,
    shown: HashMap<String, Vec<Tok>>,
    /// The README line running (for messages).
    at: usize,
}

impl<'a> Story<'a> {
    fn depot(&self) -> PathBuf {
        match self.host {
            0 => self.t.depot(),
            _ => self.t.path("other-host"),
        }
    }

    /// `vmdepot ARGS` as the story's user runs it: in TMP, on this host's
    /// depot, with the cluster's credentials and region in the
    /// environment.
    fn cmd(&self, args: &[String]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(&self.place.tmp)
            .env("VMDEPOT_DIR", self.depot())
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", REGION)
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for v in [
            "VMDEPOT_ACCOUNT",
            "NOTIFY_SOCKET",
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        ] {
            c.env_remove(v);
        }
        c
    }

    fn what(&self, args: &[String]) -> String {
        format!(
            "README.md:{} ({:?} pass, host {}): vmdepot {}",
            self.at,
            self.pass,
            self.host,
            args.join(" ")
        )
    }

    /// Runs `args` to its end; asserts exit 0; returns what it said.
    fn ok(&self, args: &[String]) -> Said {
        let said = Running::spawn(self.cmd(args), self.what(args)).finish(COMMAND_LIMIT);
        self.assert_ok(args, &said);
        said
    }

    fn assert_ok(&self, args: &[String], said: &Said) {
        assert!(
            said.status.success(),
            "{} exited {:?}:\n{}",
            self.what(args),
            said.status,
            said.stderr
        );
    }

    /// `ok` of `vmdepot WORDS`, stdout as JSON.
    fn json(&self, words: &[&str]) -> Value {
        let args: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let out = self.ok(&args).stdout;
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}: {out}", self.what(&args)))
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::OtherHost => {
                assert!(
                    !self.remote_adds.is_empty(),
                    "another host, but no `remote add` before"
                );
                self.host = 1;
                for add in self.remote_adds.clone() {
                    self.ok(&add);
                }
            }
            Step::Run(s) => {
                self.at = s.at;
                let invs = expand(s, self.pass, &self.shown)
                    .unwrap_or_else(|e| panic!("README.md:{}: {e}: {}", s.at, s.text));
                for inv in invs {
                    let args = self
                        .place
                        .resolve(&inv.args, &self.renames)
                        .unwrap_or_else(|e| panic!("README.md:{}: {e}: {}", s.at, s.text));
                    self.run(s, &args, inv.redirect.as_deref());
                }
            }
        }
    }

    /// Runs one invocation by the rule for its kind, then lets its guests
    /// come up and checks what its line promises.
    fn run(&mut self, s: &Synopsis, args: &[String], redirect: Option<&str>) {
        let started = Instant::now();
        let key = key_of(args);
        let has = |f: &str| args.iter().any(|a| a == f);
        let said = if has("--foreground") {
            self.foreground(args)
        } else if key == "instance console" {
            self.console(args)
        } else if key == "instance logs" && has("--follow") {
            let lines = flag_value(args, "-n").map_or(1, |n| n.parse().unwrap());
            let run = Running::spawn(self.cmd(args), self.what(args));
            let host = self.host;
            self.follower = Some(Follower {
                run,
                host,
                instance: args[2].clone(),
                lines,
            });
            None
        } else {
            let mut cmd = self.cmd(args);
            if let Some(f) = redirect {
                let path = self.place.resolve(&[f.to_owned()], &[]).unwrap().remove(0);
                cmd.stdout(std::fs::File::create(&path).unwrap());
            }
            let said = Running::spawn(cmd, self.what(args)).finish(COMMAND_LIMIT);
            self.assert_ok(args, &said);
            Some(said)
        };
        if key == "remote add" {
            self.remote_adds.push(args.to_vec());
        }
        if key == "image push" {
            if let Some(new) = flag_value(args, "--name") {
                let (img, remote) = (&args[2], &args[3]);
                self.renames
                    .push((format!("{remote}:{img}"), format!("{remote}:{new}")));
            }
        }
        self.settle();
        if let Some(said) = said {
            self.check(s, args, redirect, &said);
        }
        // (shown when the test fails)
        eprintln!("{} ok in {:.1?}", self.what(args), started.elapsed());
    }

    /// Waits until every guest that runs has come up (its serial console
    /// says ready once more for each new QEMU), and ends the follower
    /// whose guest stopped.
    fn settle(&mut self) {
        if !self.depot().join("instances").exists() {
            return;
        }
        let list = self.json(&["instance", "list", "--json"]);
        for i in items(&list) {
            if i["state"] != "running" {
                continue;
            }
            let (id, pid) = (id_of(i), i["pid"].as_i64().unwrap());
            let boots = self.boots.entry((self.host, id.clone())).or_insert((0, 0));
            if boots.0 != pid {
                *boots = (pid, boots.1 + 1);
            }
            let n = boots.1;
            wait_ready(Path::new(i["serial_log"].as_str().unwrap()), n, &id);
        }
        let stopped = |f: &Follower| {
            f.host == self.host
                && !items(&list).iter().any(|i| {
                    i["name"] == f.instance.as_str()
                        && matches!(i["state"].as_str(), Some("running" | "paused"))
                })
        };
        if self.follower.as_ref().is_some_and(stopped) {
            let f = self.follower.take().unwrap();
            let what = f.run.what.clone();
            let said = f.run.finish(Duration::from_secs(20));
            assert!(
                said.status.success(),
                "{what} (its guest stopped): {:?}: {}",
                said.status,
                said.stderr
            );
            let n = said.stdout.lines().count();
            assert!(
                n >= f.lines,
                "{what}: {n} lines, fewer than -n {}: {}",
                f.lines,
                said.stdout
            );
        }
    }

    /// `… --foreground`: runs until the guest is ready, then SIGTERM (a
    /// unit's stop) presses the power button and it must exit 0.
    fn foreground(&mut self, args: &[String]) -> Option<Said> {
        let name = match key_of(args).as_str() {
            "instance run" => {
                flag_value(args, "--name").expect("a foreground run names its instance")
            }
            _ => args[2].clone(),
        };
        let mut run = Running::spawn(self.cmd(args), self.what(args));
        let end = Instant::now() + BOOT;
        let info = loop {
            assert!(
                !run.ended(),
                "{}: ended before its guest ran",
                self.what(args)
            );
            assert!(
                Instant::now() < end,
                "{}: {name} not running after {BOOT:?}",
                self.what(args)
            );
            let o = self
                .cmd(&[
                    "instance".into(),
                    "show".into(),
                    name.clone(),
                    "--json".into(),
                ])
                .output()
                .unwrap();
            if o.status.success() {
                let i: Value = serde_json::from_slice(&o.stdout).unwrap();
                if i["state"] == "running" {
                    break i;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let (id, pid) = (id_of(&info), info["pid"].as_i64().unwrap());
        let boots = self.boots.entry((self.host, id.clone())).or_insert((0, 0));
        *boots = (pid, boots.1 + 1);
        let n = boots.1;
        let log = PathBuf::from(str_at(&info, "serial_log"));
        wait_ready(&log, n, &id);
        let st = Command::new("kill")
            .args(["-TERM", &run.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let said = run.finish(Duration::from_secs(120));
        self.assert_ok(args, &said);
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            log.matches("VMDEPOT-GUEST: power button").count() >= 1,
            "{}: the guest saw no power button:\n{log}",
            self.what(args)
        );
        let shown = self.json(&["instance", "show", &name, "--json"]);
        assert_eq!(shown["state"], "stopped", "{}: {shown}", self.what(args));
        Some(said)
    }

    /// `instance console`: a line typed reaches the guest (which echoes it)
    /// and comes back; Ctrl-] detaches with exit 0.
    fn console(&mut self, args: &[String]) -> Option<Said> {
        let log = PathBuf::from(str_at(
            &self.json(&["instance", "show", &args[2], "--json"]),
            "serial_log",
        ));
        let mut cmd = self.cmd(args);
        cmd.stdin(Stdio::piped());
        let mut run = Running::spawn(cmd, self.what(args));
        let mut stdin = run.child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stdin
            .write_all(format!("{CONSOLE_LINE}\n").as_bytes())
            .unwrap();
        stdin.flush().unwrap();
        let echo = format!("VMDEPOT-ECHO: {CONSOLE_LINE}");
        wait_until(
            &format!("{}: the guest's echo", self.what(args)),
            BOOT,
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(&echo)
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        stdin.write_all(&[0x1d]).unwrap(); // Ctrl-]
        stdin.flush().unwrap();
        let said = run.finish(Duration::from_secs(20));
        self.assert_ok(args, &said);
        assert!(
            said.stdout.contains(&echo),
            "{}: no echo in: {}",
            self.what(args),
            said.stdout
        );
        Some(said)
    }

    /// What the line promises, where it is cheap to check.
    fn check(&self, s: &Synopsis, args: &[String], redirect: Option<&str>, said: &Said) {
        let what = self.what(args);
        let key = key_of(args);
        let has = |f: &str| args.iter().any(|a| a == f);
        if has("--json") {
            serde_json::from_str::<Value>(&said.stdout).unwrap_or_else(|e| {
                panic!("{what}: --json printed no JSON ({e}): {}", said.stdout)
            });
        }
        if let Some(alias) = alias(&s.comment) {
            self.check_alias(args, &key, &alias, said);
        }
        if s.comment.contains("by name or by id") {
            let name = &args[2];
            let by_name = self.json(&[&key_words(&key)[..], &[name.as_str(), "--json"]].concat());
            let id = id_of(&by_name);
            let by_id = self.json(&[&key_words(&key)[..], &[id.as_str(), "--json"]].concat());
            assert_eq!(by_id["id"], by_name["id"], "{what}: by id");
            assert_eq!(by_id["name"], by_name["name"], "{what}: by id");
        }
        match key.as_str() {
            "image export" => {
                // Whatever was imported comes back: debian-12 is the test guest.
                let out = self.place.tmp.join(&args[3]);
                match flag_value(args, "--format").as_deref() {
                    Some("qcow2") => {
                        let mut magic = [0u8; 4];
                        std::fs::File::open(&out)
                            .and_then(|mut f| f.read_exact(&mut magic))
                            .unwrap();
                        assert_eq!(&magic, b"QFI\xfb", "{what}: not a qcow2 file");
                    }
                    _ => assert!(
                        same_content(&out, test_guest()),
                        "{what}: differs from the import"
                    ),
                }
                if s.comment.contains("or - (raw to stdout)") {
                    let o = self
                        .cmd(&[&args[..3], &["-".to_owned()]].concat())
                        .output()
                        .unwrap();
                    assert!(
                        o.status.success(),
                        "{what} to -: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert!(
                        o.stdout == std::fs::read(test_guest()).unwrap(),
                        "{what} to -: differs"
                    );
                }
            }
            "gc" if !has("--dry-run") && !has("--remote") => {
                // "free what no image uses": nothing is left to free.
                let r = self.json(&["gc", "--dry-run", "--json"]);
                assert_eq!(r["chunks_removed"], 0, "{what}: then gc --dry-run: {r}");
            }
            "instance run" if !has("--foreground") => self.check_launch(args, said),
            "instance list" => {
                // True states: a running instance's QEMU lives.
                let list = self.json(&["instance", "list", "--json"]);
                for i in items(&list).iter().filter(|i| i["state"] == "running") {
                    assert!(alive(i["pid"].as_i64().unwrap()), "{what}: {i}");
                }
            }
            "instance show" if has("--json") => {
                let i: Value = serde_json::from_str(&said.stdout).unwrap();
                for k in ["ssh_port", "pid", "serial_log", "store_bytes_read"] {
                    assert!(i.get(k).is_some(), "{what}: no {k}: {i}");
                }
            }
            "instance stop" if !has("--force") && !has("--all") => {
                for name in args[2..].iter().take_while(|a| !a.starts_with('-')) {
                    let i = self.json(&["instance", "show", name, "--json"]);
                    assert_eq!(i["state"], "stopped", "{what}: {i}");
                    let log = std::fs::read_to_string(str_at(&i, "serial_log")).unwrap();
                    assert!(
                        log.contains("VMDEPOT-GUEST: power button"),
                        "{what}: {name}: {log}"
                    );
                }
            }
            "instance unit" => {
                let f = self
                    .place
                    .resolve(&[redirect.expect("unit > FILE").to_owned()], &[])
                    .unwrap();
                let unit = std::fs::read_to_string(&f[0]).unwrap();
                let id = id_of(&self.json(&["instance", "show", &args[2], "--json"]));
                assert!(unit.contains("Type=notify"), "{what}: {unit}");
                assert!(
                    unit.contains(&format!("\"start\" \"{id}\" \"--foreground\"")),
                    "{what}: {unit}"
                );
            }
            "instance delete" if !has("--all") => {
                let list = self.json(&["instance", "list", "--json"]);
                for name in args[2..].iter().take_while(|a| !a.starts_with('-')) {
                    assert!(
                        !strs_at(&list, "name").contains(name),
                        "{what}: {name} is left"
                    );
                }
            }
            "instance delete" => {
                let list = self.json(&["instance", "list", "--json"]);
                assert!(items(&list).is_empty(), "{what}: left {list}");
            }
            "image copy" => {
                let to = PathBuf::from(flag_value(args, "--to-depot").unwrap());
                let list = json_in(&to, &["image", "list", "--json"]);
                assert!(
                    strs_at(&list, "name").contains(&args[2]),
                    "{what}: not in {}: {list}",
                    to.display()
                );
            }
            "image share" => {
                // bob may launch it: he sees it, as shared.
                let bob = flag_value(args, "--with").unwrap();
                let list = self.json(&["--account", &bob, "image", "list", "--json"]);
                let it = items(&list).iter().find(|i| i["name"] == args[2].as_str());
                assert!(
                    it.is_some_and(|i| i["type"] == "shared"),
                    "{what}: {bob} sees {list}"
                );
            }
            "image delete" if args[2].contains(':') => {
                let (remote, img) = args[2].split_once(':').unwrap();
                let list = self.json(&["image", "list", "--remote", remote, "--json"]);
                assert!(
                    !strs_at(&list, "name").contains(&img.to_owned()),
                    "{what}: still listed: {list}"
                );
            }
            "remote remove" => {
                let list = self.json(&["remote", "list", "--json"]);
                assert!(
                    !strs_at(&list, "name").contains(&args[2]),
                    "{what}: still listed: {list}"
                );
            }
            _ => {}
        }
    }

    /// `# or: ALIAS`: a command that only looks says the same by its
    /// alias; another has the same help.
    fn check_alias(&self, args: &[String], key: &str, alias: &[String], said: &Said) {
        let n = key_words(key).len();
        let by_alias: Vec<String> = [alias, &args[n..]].concat();
        if LOOKS.contains(&key) {
            let again = self.ok(&by_alias);
            assert_eq!(
                steady(&again.stdout),
                steady(&said.stdout),
                "{}: differs from {by_alias:?}",
                self.what(args)
            );
        } else {
            let help = |words: &[String]| {
                let a = [words, &["--help".to_owned()]].concat();
                self.ok(&a).stdout
            };
            let (original, aliased) = (help(&args[..n]), help(alias));
            assert_eq!(aliased, original, "{}: {alias:?} --help", self.what(args));
        }
    }

    /// `instance run`: the instances it names exist and their guests read
    /// what the flags gave them.
    fn check_launch(&self, args: &[String], said: &Said) {
        let what = self.what(args);
        let count: usize = flag_value(args, "--count").map_or(1, |c| c.parse().unwrap());
        if args.iter().any(|a| a == "--json") {
            let launched: Value = serde_json::from_str(&said.stdout).unwrap();
            assert_eq!(items(&launched).len(), count, "{what}: {launched}");
        }
        let Some(name) = flag_value(args, "--name") else {
            return;
        };
        let names: Vec<String> = match count {
            1 => vec![name],
            n => (1..=n).map(|i| format!("{name}-{i}")).collect(),
        };
        for n in &names {
            let i = self.json(&["instance", "show", n, "--json"]);
            assert_eq!(i["state"], "running", "{what}: {i}");
            let log = std::fs::read_to_string(str_at(&i, "serial_log")).unwrap();
            if let Some(h) = flag_value(args, "--hostname") {
                assert!(
                    log.contains(&format!("VMDEPOT-HOSTNAME: {h}")),
                    "{what}: {log}"
                );
            }
            if args.iter().any(|a| a == "--user-data") {
                assert!(
                    log.contains(&format!("VMDEPOT-USER-DATA: {USER_DATA}")),
                    "{what}: {log}"
                );
            }
        }
    }

    /// The end of the story: no follower left waiting.
    fn end(self) {
        if let Some(f) = &self.follower {
            panic!("{}: its guest never stopped", f.run.what);
        }
    }
}

/// Output to compare across two runs: JSON without the counters a running
/// guest moves (its reads from the store and the remote); text as it is.
fn steady(out: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(out) else {
        return out.to_owned();
    };
    for i in v.as_array_mut().into_iter().flatten() {
        if let Some(o) = i.as_object_mut() {
            o.remove("store_bytes_read");
            o.remove("remote_bytes_fetched");
        }
    }
    v.to_string()
}

/// The value of `flag` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The words of a command's name.
fn key_words(key: &str) -> Vec<&str> {
    key.split(' ').collect()
}

/// The alias a comment names (`or: image ls; …` → `image ls`).
fn alias(comment: &str) -> Option<Vec<String>> {
    let rest = comment.strip_prefix("or: ")?;
    let end = rest.find([';', ',']).unwrap_or(rest.len());
    Some(rest[..end].split_whitespace().map(str::to_owned).collect())
}

/// Waits until the serial log at `log` says the guest is ready `n` times
/// (one for each boot).
fn wait_ready(log: &Path, n: usize, id: &str) {
    let end = Instant::now() + BOOT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(READY).count() >= n {
            return;
        }
        assert!(
            Instant::now() < end,
            "{id}: not ready {n} times after {BOOT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free port on 127.0.0.1 now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The whole story, in `pass`.
fn story(pass: Pass) {
    let steps = steps();
    let t = T::new();
    make_fixtures(t.dir.path());
    let g = Garage::start();
    let mut s = Story {
        pass,
        t: &t,
        place: Place {
            tmp: t.dir.path().to_owned(),
            bucket: g.bucket.clone(),
            endpoint: g.endpoint(),
            port: free_port(),
        },
        key_id: g.key_id.clone(),
        secret: g.secret.clone(),
        host: 0,
        remote_adds: Vec::new(),
        renames: Vec::new(),
        boots: HashMap::new(),
        follower: None,
        shown: shown_flags(&steps),
        at: 0,
    };
    for step in &steps {
        s.step(step);
    }
    s.end();
}

#[test]
fn readme_using_it_runs_with_every_optional_group_dropped() {
    story(Pass::Bare);
}

#[test]
fn readme_using_it_runs_with_every_optional_group_filled_in() {
    story(Pass::Full);
}

/// Every line of the section is covered by a rule, in both passes
/// (parsed, expanded, placeholders resolved; nothing run).
#[test]
fn readme_using_it_every_line_is_covered_by_a_rule() {
    let steps = steps();
    let shown = shown_flags(&steps);
    let tmp = tempfile::tempdir_in(scratch()).unwrap();
    let place = Place {
        tmp: tmp.path().to_owned(),
        bucket: "b".into(),
        endpoint: "http://127.0.0.1:1".into(),
        port: 1,
    };
    for step in &steps {
        let Step::Run(s) = step else { continue };
        for pass in [Pass::Bare, Pass::Full] {
            let invs =
                expand(s, pass, &shown).unwrap_or_else(|e| panic!("README.md:{}: {e}", s.at));
            assert!(
                !invs.is_empty(),
                "README.md:{}: nothing to run: {}",
                s.at,
                s.text
            );
            for inv in invs {
                place
                    .resolve(&inv.args, &[])
                    .unwrap_or_else(|e| panic!("README.md:{}: {e}: {}", s.at, s.text));
            }
        }
    }
}

/// The rules on lines of their own: groups, alternatives, `...`, `…`,
/// redirection, placeholders, and the lines no rule covers.
#[test]
fn readme_synopsis_rules() {
    let syn = |text: &str| {
        let (cmd, comment) = split_comment(text);
        Synopsis {
            at: 1,
            text: text.into(),
            toks: tokens(cmd.strip_prefix("vmdepot ").unwrap()).unwrap(),
            comment: comment.into(),
        }
    };
    let args = |s: &Synopsis, pass, shown: &HashMap<String, Vec<Tok>>| -> Vec<String> {
        expand(s, pass, shown)
            .unwrap()
            .iter()
            .map(|i| i.args.join(" "))
            .collect()
    };
    let none = HashMap::new();
    let import = syn("vmdepot image import f.qcow2 --name x [--type a|b|c] [--tag K=V]...  # c");
    assert_eq!(import.comment, "c");
    assert_eq!(
        args(&import, Pass::Bare, &none),
        ["image import f.qcow2 --name x"]
    );
    assert_eq!(
        args(&import, Pass::Full, &none),
        ["image import f.qcow2 --name x --type a --tag K=V"]
    );
    // a value's alternatives each, for a command that only looks
    let list = syn("vmdepot image list [--type a|b]");
    assert_eq!(
        args(&list, Pass::Full, &none),
        ["image list --type a", "image list --type b"]
    );
    // alternatives of words each, in order; `...` the flags shown above
    let stop = syn("vmdepot instance stop web [db …] [--force] [--timeout 60]");
    let shown = shown_flags(&[Step::Run(stop)]);
    let all = syn("vmdepot instance start|stop --all [...]");
    assert_eq!(
        args(&all, Pass::Bare, &shown),
        ["instance start --all", "instance stop --all"]
    );
    let e = expand(&all, Pass::Full, &shown).unwrap_err();
    assert!(e.contains("`instance start`"), "{e}");
    let flags = syn("vmdepot image update x [--protect|--unprotect]");
    assert_eq!(
        args(&flags, Pass::Full, &none),
        ["image update x --protect", "image update x --unprotect"]
    );
    let unit = syn("vmdepot instance unit web > /etc/vm.service");
    let inv = expand(&unit, Pass::Bare, &none).unwrap().remove(0);
    assert_eq!(inv.redirect.as_deref(), Some("/etc/vm.service"));
    // placeholders and paths
    let tmp = tempfile::tempdir_in(scratch()).unwrap();
    let place = Place {
        tmp: tmp.path().to_owned(),
        bucket: "b".into(),
        endpoint: "http://127.0.0.1:9".into(),
        port: 4242,
    };
    let words = |w: &str| w.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let r = place
        .resolve(
            &words("remote add eu s3://images/prod --endpoint http://garage:3900"),
            &[],
        )
        .unwrap();
    assert_eq!(r[3..], ["s3://b/prod", "--endpoint", "http://127.0.0.1:9"]);
    let r = place
        .resolve(&words("image copy x --to-depot /srv/r2"), &[])
        .unwrap();
    assert_eq!(r[4], tmp.path().join("root/srv/r2").to_str().unwrap());
    let r = place
        .resolve(&words("instance run x --forward 8080:80"), &[])
        .unwrap();
    assert_eq!(r[4], "4242:80");
    let e = place.resolve(&words("image show NEW"), &[]).unwrap_err();
    assert!(e.contains("no rule for the placeholder NEW"), "{e}");
    // lines no rule covers
    let section = |block: &str| format!("## Using it\n\n```sh\n{block}\n```\n\n## As a library\n");
    for bad in [
        "cp a b",
        "vmdepot image list [--json",
        "vmdepot image show x [-q]]",
        "# a comment line",
        "  --json",
    ] {
        let e = parse_section(&section(bad)).unwrap_err();
        assert!(e.starts_with("4: "), "{bad}: {e}");
    }
    let ok = parse_section(&section(
        "vmdepot stats\n        [--json]\n# on another host:",
    ))
    .unwrap();
    assert!(
        matches!(&ok[..], [Step::Run(s), Step::OtherHost] if s.toks.len() == 2),
        "{ok:?}"
    );
}
