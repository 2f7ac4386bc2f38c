//! [`S3Credentials`]: the S3 access key a remote is reached with, found the
//! way S3 tools find it: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
//! (with `AWS_SESSION_TOKEN` when set) from the environment, else the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//! `~/.aws/credentials`; profile `AWS_PROFILE`, else `default`). Nothing
//! here is ever logged or printed: its `Debug` hides the secret.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// An S3 access key (its `Debug` shows the key id only).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key id (`AWS_ACCESS_KEY_ID`).
    pub key_id: String,
    /// The secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret: String,
    /// The session token of temporary credentials (`AWS_SESSION_TOKEN`).
    pub token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The largest shared credentials file read.
const MAX_FILE: u64 = 1 << 20;

impl S3Credentials {
    /// The credentials of the process's environment, else of the shared
    /// file; an error naming both ways when neither has them (`remote`
    /// names the remote in it).
    pub fn load(remote: &str) -> Result<S3Credentials> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(c) = from_vars(&env).map_err(|m| remote_err(remote, m))? {
            return Ok(c);
        }
        let file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
        let found = match &file {
            Some(path) => read_file(path, &profile).map_err(|m| remote_err(remote, m))?,
            None => None,
        };
        found.ok_or_else(|| {
            let where_ = file.map_or("~/.aws/credentials".into(), |p| p.display().to_string());
            remote_err(
                remote,
                format!(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put aws_access_key_id and aws_secret_access_key in profile [{profile}] of {where_} (AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE choose the file and profile)"
                ),
            )
        })
    }
}

fn remote_err(remote: &str, message: String) -> Error {
    Error::Remote {
        remote: remote.to_owned(),
        message,
    }
}

/// The credentials of the environment (`Ok(None)`: it names none).
fn from_vars(
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<Option<S3Credentials>, String> {
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(key_id), Some(secret)) => Ok(Some(S3Credentials {
            key_id,
            secret,
            token: env("AWS_SESSION_TOKEN"),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both, or neither to use the shared credentials file".into()),
        (None, Some(_)) => Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both, or neither to use the shared credentials file".into()),
    }
}

/// The profile's credentials in a shared credentials file (`Ok(None)`: no
/// such file, or no such profile in it).
fn read_file(
    path: &std::path::Path,
    profile: &str,
) -> std::result::Result<Option<S3Credentials>, String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "reading the credentials file {}: {e}",
                path.display()
            ))
        }
    };
    let mut text = String::new();
    file.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the credentials file {}: {e}", path.display()))?;
    parse_profile(&text, profile).map_err(|why| {
        format!(
            "the credentials file {}: profile [{profile}]: {why}",
            path.display()
        )
    })
}

/// The credentials of `profile` in the text of a shared credentials file
/// (INI: `[profile]` sections of `key = value` lines, `#` and `;`
/// comments). `Ok(None)`: no such section; an error if the section lacks
/// the key id or the secret.
fn parse_profile(text: &str, profile: &str) -> std::result::Result<Option<S3Credentials>, String> {
    let mut in_profile = false;
    let mut seen = false;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            seen |= in_profile;
            continue;
        }
        let Some((k, v)) = line.split_once('=').filter(|_| in_profile) else {
            continue;
        };
        let v = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => key_id = v,
            "aws_secret_access_key" => secret = v,
            "aws_session_token" => token = v,
            _ => {}
        }
    }
    if !seen {
        return Ok(None);
    }
    match (key_id, secret) {
        (Some(key_id), Some(secret)) => Ok(Some(S3Credentials {
            key_id,
            secret,
            token,
        })),
        _ => Err("it needs both aws_access_key_id and aws_secret_access_key".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_needs_both_keys() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = from_vars(&vars(&[
            ("AWS_ACCESS_KEY_ID", "GK1"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str(), c.token),
            ("GK1", "s", None)
        );
        let c = from_vars(&vars(&[
            ("AWS_ACCESS_KEY_ID", "GK1"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_SESSION_TOKEN", "t"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("t"));
        assert_eq!(from_vars(&vars(&[])).unwrap(), None);
        let e = from_vars(&vars(&[("AWS_ACCESS_KEY_ID", "GK1")])).unwrap_err();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not"), "{e}");
    }

    #[test]
    fn shared_file_profiles() {
        let text = "\
# comment
[default]
aws_access_key_id = AKDEFAULT
aws_secret_access_key=secret0

; another
[ci]
AWS_ACCESS_KEY_ID = AKCI
aws_secret_access_key = secret1
aws_session_token = tok
region = garage

[half]
aws_access_key_id = AKHALF
";
        let d = parse_profile(text, "default").unwrap().unwrap();
        assert_eq!(
            (d.key_id.as_str(), d.secret.as_str()),
            ("AKDEFAULT", "secret0")
        );
        let ci = parse_profile(text, "ci").unwrap().unwrap();
        assert_eq!(ci.token.as_deref(), Some("tok"));
        assert_eq!(ci.secret, "secret1");
        assert_eq!(parse_profile(text, "nope").unwrap(), None);
        assert!(parse_profile(text, "half").unwrap_err().contains("both"));
        assert_eq!(parse_profile("", "default").unwrap(), None);
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = S3Credentials {
            key_id: "GK1".into(),
            secret: "hunter2".into(),
            token: Some("tok".into()),
        };
        let d = format!("{c:?}");
        assert!(
            d.contains("GK1") && !d.contains("hunter2") && !d.contains("tok"),
            "{d}"
        );
    }

    #[test]
    fn missing_file_is_no_credentials() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_file(&dir.path().join("none"), "default").unwrap(),
            None
        );
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id=a\naws_secret_access_key=b\n",
        )
        .unwrap();
        assert_eq!(read_file(&f, "default").unwrap().unwrap().key_id, "a");
    }
}
