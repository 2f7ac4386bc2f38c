//! The NoCloud seed of an instance: a small FAT volume labelled `CIDATA`
//! holding `meta-data` (instance-id, local-hostname) and `user-data`, that
//! cloud-init (or the test guest) reads on first boot. Made in pure Rust
//! ([`write_seed`]); attached read-only as the instance's second disk.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Size of the seed volume: plenty for user-data scripts and keys.
const SEED_BYTES: u64 = 2 << 20;

/// What goes into the seed.
#[derive(Clone, Debug)]
pub struct Seed {
    pub instance_id: String,
    pub hostname: String,
    /// The user-data document (a `#cloud-config`, a script, …).
    pub user_data: String,
}

impl Seed {
    /// `user_data` when given, else a `#cloud-config` that installs the SSH
    /// keys for the default user (or nothing).
    pub fn new(
        instance_id: &str,
        hostname: &str,
        user_data: Option<String>,
        ssh_keys: &[String],
    ) -> Seed {
        let user_data = user_data.unwrap_or_else(|| {
            let mut s = String::from("#cloud-config\n");
            s.push_str(&format!("hostname: {}\n", yaml_quote(hostname)));
            if !ssh_keys.is_empty() {
                s.push_str("ssh_authorized_keys:\n");
                for k in ssh_keys {
                    s.push_str(&format!("  - {}\n", yaml_quote(k.trim())));
                }
            }
            s
        });
        Seed {
            instance_id: instance_id.to_owned(),
            hostname: hostname.to_owned(),
            user_data,
        }
    }

    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.instance_id, self.hostname
        )
    }
}

/// A YAML double-quoted scalar.
fn yaml_quote(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\x{:02x}", c as u32)),
            // line and paragraph separators are line breaks to YAML 1.1
            '\u{2028}' | '\u{2029}' | '\u{feff}' => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A plain YAML scalar for meta-data: letters, digits, `.` and `-` (a
/// hostname, an instance id) and nothing else.
fn plain_scalar(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && !v.starts_with(['-', '.'])
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {v:?} cannot go into the NoCloud meta-data: use letters, digits, '.' and '-'"
        )))
    }
}

/// Writes the seed volume to `path` (a raw FAT image, a new file of `mode`).
/// The meta-data values are refused unless plain (see `plain_scalar`);
/// generated user-data quotes every value.
pub fn write_seed(path: &Path, seed: &Seed, mode: u32) -> Result<()> {
    plain_scalar("hostname", &seed.hostname)?;
    plain_scalar("instance id", &seed.instance_id)?;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .mode(mode)
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .at(path)?;
    file.set_len(SEED_BYTES).at(path)?;
    let mut label = [b' '; 11];
    label[..6].copy_from_slice(b"CIDATA");
    // A volume serial from the instance id: distinct per instance.
    let serial = u32::from_str_radix(
        seed.instance_id
            .trim_start_matches("ins-")
            .get(..8)
            .unwrap_or("0"),
        16,
    )
    .unwrap_or(0x5eed_0001);
    fatfs::format_volume(
        &file,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(serial),
    )
    .at(path)?;
    let mut disk = &file;
    std::io::Seek::rewind(&mut disk).at(path)?;
    let fs = fatfs::FileSystem::new(disk, fatfs::FsOptions::new()).at(path)?;
    {
        let root = fs.root_dir();
        for (name, body) in [
            ("meta-data", seed.meta_data()),
            ("user-data", seed.user_data.clone()),
        ] {
            let mut f = root.create_file(name).at(path)?;
            f.truncate().at(path)?;
            f.write_all(body.as_bytes()).at(path)?;
            f.flush().at(path)?;
        }
    }
    fs.unmount().at(path)?;
    file.sync_all().at(path)?;
    Ok(())
}

/// Largest user-data accepted (the seed volume is 2 MiB).
pub const MAX_USER_DATA: usize = 1 << 20;
/// Largest SSH public key file accepted.
pub const MAX_SSH_KEY: usize = 16 << 10;

/// Refuses user-data and SSH keys over their caps.
pub fn check_sizes(user_data: Option<&str>, ssh_keys: &[String]) -> crate::Result<()> {
    if user_data.is_some_and(|u| u.len() > MAX_USER_DATA) {
        return Err(crate::Error::Invalid(format!(
            "user-data is larger than {MAX_USER_DATA} bytes (1 MiB): keep it smaller, e.g. fetch big files from cloud-init"
        )));
    }
    if ssh_keys.iter().any(|k| k.len() > MAX_SSH_KEY) {
        return Err(crate::Error::Invalid(format!(
            "an SSH key is larger than {MAX_SSH_KEY} bytes: pass a public key file"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_volume_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seed.img");
        let s = Seed::new(
            "ins-0123456789abcdef",
            "web-1",
            None,
            &["ssh-ed25519 AAAA test@host".into()],
        );
        write_seed(&p, &s, 0o600).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let mut md = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut md)
            .unwrap();
        assert_eq!(
            md,
            "instance-id: ins-0123456789abcdef\nlocal-hostname: web-1\n"
        );
        let mut ud = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut ud)
            .unwrap();
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(ud.contains("  - \"ssh-ed25519 AAAA test@host\"\n"), "{ud}");
        assert!(ud.contains("hostname: \"web-1\"\n"), "{ud}");
    }

    #[test]
    fn yaml_values_are_quoted_and_meta_data_refuses_the_rest() {
        assert_eq!(yaml_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(
            yaml_quote("k\nhostname: evil\u{2028}x"),
            r#""k\x0ahostname: evil\u2028x""#
        );
        let s = Seed::new(
            "ins-0123456789abcdef",
            "web-1",
            None,
            &["ssh-ed25519 AAAA a\nruncmd: [touch, /x]".into()],
        );
        assert!(!s.user_data.contains("\nruncmd"), "{}", s.user_data);
        let d = tempfile::tempdir().unwrap();
        for bad in ["a\ninstance-id: x", "a b", "a:b", "-a", ""] {
            let s = Seed::new("ins-0123456789abcdef", bad, None, &[]);
            let e = write_seed(&d.path().join("s.img"), &s, 0o600).unwrap_err();
            assert!(e.to_string().contains("meta-data"), "{e}");
        }
    }
}
