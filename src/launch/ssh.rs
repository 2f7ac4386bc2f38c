//! Reaching a guest over SSH: the depot's own key pair (one per account,
//! injected into every instance whose user-data vmdepot makes), waiting for
//! an instance's forwarded SSH port to answer with an SSH banner, and the
//! `ssh` command line of an instance (its forward, the user its image
//! names, its host key learnt on first use and pinned in the instance's
//! directory).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::FlockArg;

use crate::depot::Depot;
use crate::error::{Error, IoContext, Result};
use crate::launch::instance::{InstanceInfo, InstanceState, SSH_USER_TAG};
use crate::launch::paths::Paths;

/// `DEPOT/keys/ACCOUNT/id_ed25519`: the private key of the account's key
/// pair (the public one beside it, `.pub`).
fn key_path(root: &Path, account: &str) -> PathBuf {
    root.join("keys").join(account).join("id_ed25519")
}

impl Depot {
    /// The account's SSH key pair, made with `ssh-keygen` (ed25519, no
    /// passphrase, mode 0600 in a 0700 directory) the first time; returns
    /// the private key's path.
    pub fn ssh_key(&self) -> Result<PathBuf> {
        let key = key_path(self.root(), self.account());
        let public = key.with_extension("pub");
        let dir = key.parent().expect("a key has a directory");
        self.perms().mkdir_all(dir)?;
        // One maker at a time: concurrent first launches get one key.
        let _lock = self
            .perms()
            .flock(&dir.join("lock"), FlockArg::LockExclusive)?;
        if key.is_file() && public.is_file() {
            return Ok(key);
        }
        // Made under a temporary name and renamed, the public key last:
        // once it is there, so is its private key.
        let tmp = dir.join(format!(".tmp-{}", crate::ids::random_hex(4)));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C"])
            .arg(format!("vmdepot {}", self.account()))
            .arg("-f")
            .arg(&tmp)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Tool {
                tool: "ssh-keygen".into(),
                detail: format!(
                    "{e}: install the Debian package openssh-client (apt-get install openssh-client)"
                ),
            })?;
        let tmp_pub = tmp.with_extension("pub");
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&tmp_pub);
            return Err(Error::Tool {
                tool: "ssh-keygen".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        // 0600 even in a group depot: ssh refuses a private key others
        // can read.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).at(&tmp)?;
        self.perms().fix(&tmp_pub)?;
        std::fs::rename(&tmp, &key).at(&key)?;
        std::fs::rename(&tmp_pub, &public).at(&public)?;
        Ok(key)
    }

    /// The account's public SSH key (made the first time: [`Depot::ssh_key`]).
    pub(crate) fn ssh_public_key(&self) -> Result<String> {
        let public = self.ssh_key()?.with_extension("pub");
        Ok(std::fs::read_to_string(&public)
            .at(&public)?
            .trim()
            .to_owned())
    }

    /// Waits until the forwarded SSH port of instance `reference` answers
    /// with an SSH banner (`SSH-…`): the guest's sshd listens. Fails with
    /// [`Error::Timeout`] at `timeout`, [`Error::GuestExited`] if QEMU is
    /// gone, and at once if the instance has no SSH forward.
    pub fn wait_for_ssh(&self, reference: &str, timeout: Duration) -> Result<InstanceInfo> {
        let deadline = Instant::now() + timeout;
        let i = self.instance(reference)?;
        let port = ssh_port(&i)?;
        let what = format!("{} ({})", i.name, i.id);
        let needle = format!("an SSH banner on port {port}");
        loop {
            if ssh_banner(port) {
                return Ok(i);
            }
            let i = self.instance(&i.id)?;
            if !matches!(i.state, InstanceState::Running | InstanceState::Paused) {
                return Err(Error::GuestExited {
                    instance: what,
                    needle,
                    last: format!("it is {}", i.state.as_str()),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    instance: what,
                    needle,
                    waited: timeout,
                    last: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The `ssh` command that logs into instance `reference` as `user`
    /// (default: the user its image names, `ssh-user` tag) through its
    /// forwarded port, with the account's key ([`Depot::ssh_key`]; ssh
    /// also tries the caller's own), the instance's host key learnt on
    /// first use and pinned (`instances/ID/known_hosts`), never a prompt
    /// about it. `batch`: no terminal, no password prompt (`-T`, BatchMode),
    /// for commands. `remote` is run by the guest's shell as ssh runs it
    /// (words joined by spaces). The command runs in the depot's directory
    /// (the key and known hosts are named relative to it).
    pub fn ssh_command(
        &self,
        reference: &str,
        user: Option<&str>,
        batch: bool,
        remote: &[String],
    ) -> Result<Command> {
        let i = self.instance(reference)?;
        if !matches!(i.state, InstanceState::Running | InstanceState::Paused) {
            return Err(Error::Conflict(format!(
                "instance {} ({}) is {}: start it first (`vmdepot instance start {}`)",
                i.name,
                i.id,
                i.state.as_str(),
                i.name
            )));
        }
        let port = ssh_port(&i)?;
        let user = match user.or(i.ssh_user.as_deref()) {
            Some(u) => u.to_owned(),
            None => {
                return Err(Error::Usage(format!(
                    "no user is known for instance {} ({}): pass --user NAME, or tag its image \
                     (`vmdepot image update {} --tag {SSH_USER_TAG}=NAME`) before the next launch",
                    i.name, i.id, i.image_name
                )))
            }
        };
        crate::depot::check_account(&user).map_err(|_| {
            Error::Usage(format!(
                "invalid SSH user {user:?}: use a Unix user name (lowercase letters, digits, _ and -)"
            ))
        })?;
        self.ssh_key()?;
        // ssh expands `%` and `${…}` in these paths and splits them at
        // spaces: they are given relative to the depot's root (the
        // command's directory), in words vmdepot makes (an account name,
        // an instance id), whatever the root's path holds.
        let rel = |p: &Path| {
            p.strip_prefix(self.root())
                .expect("under the depot")
                .to_owned()
        };
        let key = rel(&key_path(self.root(), self.account()));
        let known = rel(&Paths::new(self.root(), &i.id).dir.join("known_hosts"));
        let mut cmd = Command::new("ssh");
        cmd.current_dir(self.root());
        cmd.arg("-p").arg(port.to_string()).arg("-i").arg(&key);
        for o in [
            format!("UserKnownHostsFile={}", known.display()),
            "StrictHostKeyChecking=accept-new".to_owned(),
            "HashKnownHosts=no".to_owned(),
            format!("HostKeyAlias=vmdepot-{}", i.id),
            "LogLevel=ERROR".to_owned(),
            "ConnectTimeout=10".to_owned(),
        ] {
            cmd.arg("-o").arg(o);
        }
        if batch {
            cmd.args(["-T", "-o", "BatchMode=yes"]);
        }
        cmd.arg(format!("{user}@127.0.0.1"));
        if !remote.is_empty() {
            cmd.arg("--").args(remote);
        }
        Ok(cmd)
    }
}

/// The host port forwarded to the instance's port 22.
fn ssh_port(i: &InstanceInfo) -> Result<u16> {
    i.ssh_port.ok_or_else(|| {
        Error::Conflict(format!(
            "instance {} ({}) has no SSH forward (it was launched without one)",
            i.name, i.id
        ))
    })
}

/// Whether 127.0.0.1:`port` answers with an SSH banner. (QEMU's user-mode
/// network accepts a connection to a forward before the guest listens,
/// then closes it: only the banner says sshd is there.)
fn ssh_banner(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = [0u8; 4];
    s.read_exact(&mut got).is_ok() && &got == b"SSH-"
}

/// `words` quoted for a POSIX shell, each as one word: what `instance
/// exec` passes to ssh, so that the guest runs exactly these arguments.
pub fn shell_quote(words: &[String]) -> Vec<String> {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_words_survive_a_shell() {
        let words: Vec<String> = ["sh", "-c", "exit 7", "it's", "", "$HOME", "a\nb"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let q = shell_quote(&words);
        assert_eq!(q[0], "sh");
        assert_eq!(q[2], "'exit 7'");
        // the shell gives back each word as it was
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for w in {}; do printf '[%s]' \"$w\"; done",
                q[1..].join(" ")
            ))
            .output()
            .unwrap();
        let want: String = words[1..].iter().map(|w| format!("[{w}]")).collect();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    }
}
