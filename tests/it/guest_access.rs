//! Reaching a real guest (the Debian fixture: cloud-init, sshd) with no key
//! of one's own: the depot's key injected at launch, `instance wait` for
//! the SSH banner, `instance exec` and `instance ssh` as the user the image
//! names, its host key pinned on first use. One boot (about 40 s to SSH
//! under TCG).

use std::time::Duration;

use crate::common::*;

#[test]
fn a_debian_guest_is_reached_over_ssh_with_the_depots_key() {
    // a depot path ssh would expand or split, were it given to ssh
    let t = T::at("deb %u ${HOME} one");
    let disk = debian_guest().to_str().unwrap();
    t.ok(&[
        "image",
        "import",
        disk,
        "--name",
        "debian-12",
        "--tag",
        "ssh-user=debian",
        "-q",
    ]);
    // Before it runs: refused, saying what to do.
    t.ok(&[
        "instance",
        "run",
        "debian-12",
        "--name",
        "web",
        "--hostname",
        "web-one",
        "--memory",
        "1024M",
        "--cpus",
        "2",
        "-q",
    ]);
    let key = t.depot().join("keys").join(whoami()).join("id_ed25519");
    assert_eq!(mode(&key), 0o600);
    assert!(key.with_extension("pub").is_file());
    t.ok(&["instance", "wait", "web", "--timeout", "300"]);
    // The command's words reach the guest as they are; its status comes back.
    let o = t.run(&["instance", "exec", "web", "--", "hostname"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "web-one");
    let o = t.run(&[
        "instance",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo \"a  b\"; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "a  b\n");
    // `ssh` runs its command through the guest's shell, as ssh does
    let o = t.run(&["instance", "ssh", "web", "--", "id -un | tr a-z A-Z"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "DEBIAN");
    // The host key was learnt once and is pinned: a changed one is refused.
    let known = t
        .depot()
        .join("instances")
        .join(str_at(&show(&t, "web"), "id"))
        .join("known_hosts");
    let pinned = std::fs::read_to_string(&known).unwrap();
    assert!(pinned.contains("vmdepot-ins-"), "{pinned}");
    let forged = pinned
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(' ').collect();
            // an ed25519 key of another host
            if f.len() >= 3 && f[1] == "ssh-ed25519" {
                f[2] = "AAAAC3NzaC1lZDI1NTE5AAAAIEXyFxh4sEA9r/9fAt2/k/2H6bJt4WM5cQ7Ndi4aFYGX";
            }
            f.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&known, forged + "\n").unwrap();
    let o = t.run(&["instance", "exec", "web", "--", "true"]);
    assert_eq!(
        o.status.code(),
        Some(255),
        "a changed host key must be refused"
    );
    std::fs::write(&known, pinned).unwrap();
    t.ok(&["instance", "exec", "web", "--", "true"]);
    // Errors are one line with the fix.
    t.refuses(
        &[
            "instance", "exec", "web", "--user", "Bad User", "--", "true",
        ],
        2,
        "invalid SSH user",
    );
    t.ok(&["instance", "stop", "web", "--force", "-q"]);
    t.refuses(
        &["instance", "exec", "web", "--", "true"],
        1,
        "start it first",
    );
    t.refuses(
        &["instance", "wait", "web", "--timeout", "1"],
        1,
        "QEMU exited",
    );
    t.ok(&["instance", "delete", "web"]);
}

#[test]
fn wait_on_the_serial_console_and_no_user_known() {
    let t = depot_with_guest();
    t.ok(&["instance", "run", "tiny", "--name", "a", "-q"]);
    let line = t.ok(&[
        "instance",
        "wait",
        "a",
        "--serial",
        READY,
        "--timeout",
        "120",
    ]);
    assert!(line.contains(READY), "{line}");
    // the tiny guest has no sshd: a timeout, exit 1, one line
    let err = t.refuses(&["instance", "wait", "a", "--timeout", "2"], 1, "timed out");
    assert!(err.contains("SSH banner"), "{err}");
    // its image names no user
    t.refuses(&["instance", "ssh", "a"], 2, "ssh-user=NAME");
    let _ = Duration::ZERO;
    t.ok(&["instance", "delete", "a", "--force"]);
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}
