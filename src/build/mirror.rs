//! Which Debian mirror a build uses: the host's apt configuration
//! (`/etc/apt/sources.list.d/*.sources` in deb822 form, then the one-line
//! `/etc/apt/sources.list`), the URI of the first source whose suites list
//! the suite; the security suite separately (it often has its own host).

use std::path::Path;

/// The URI apt on this host uses for `suite` (`bookworm`,
/// `bookworm-security`), if any source lists it.
pub fn host_uri(suite: &str) -> Option<String> {
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sources"))
        .collect();
    files.sort();
    for f in files {
        if let Some(u) = std::fs::read_to_string(&f)
            .ok()
            .and_then(|t| deb822_uri(&t, suite))
            .filter(|u| usable(u, &f))
        {
            return Some(u);
        }
    }
    let list = Path::new("/etc/apt/sources.list");
    one_line_uri(&std::fs::read_to_string(list).ok()?, suite).filter(|u| usable(u, list))
}

/// Whether a host source's URI can be the build's (`mirror+file:`,
/// `cdrom:`, credentials are not: the default is used instead).
fn usable(uri: &str, file: &Path) -> bool {
    match check_uri(uri) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!("{}: not the build's mirror ({e})", file.display());
            false
        }
    }
}

/// The first `URIs:` of a deb822 stanza of type `deb` whose `Suites:`
/// list `suite`.
pub fn deb822_uri(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let (mut uri, mut suites, mut deb, mut enabled) = (None, false, true, true);
        for line in stanza.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            if line.starts_with('#') || line.starts_with(' ') {
                continue;
            }
            let words = || value.split_whitespace();
            match key.trim().to_ascii_lowercase().as_str() {
                "uris" => uri = words().next().map(str::to_owned),
                "suites" => suites = words().any(|s| s == suite),
                "types" => deb = words().any(|t| t == "deb"),
                "enabled" => enabled = value.trim() != "no",
                _ => {}
            }
        }
        if let (Some(u), true, true, true) = (uri, suites, deb, enabled) {
            return Some(u);
        }
    }
    None
}

/// The URI of the first `deb URI SUITE …` line of a one-line sources.list
/// (options in `[…]` skipped).
pub fn one_line_uri(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let (Some(uri), Some(s)) = (words.next(), words.next()) else {
            continue;
        };
        if s == suite {
            return Some(uri.to_owned());
        }
    }
    None
}

/// Refuses a mirror URI that is not plain `http(s)://host/path` (it goes
/// into the guest's sources and debootstrap's command line).
pub fn check_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))
        .ok_or_else(|| format!("mirror {uri:?} is not an http:// or https:// URL"))?;
    if rest
        .split('/')
        .next()
        .is_some_and(|host| host.contains('@'))
    {
        return Err(format!(
            "mirror {}: a user or password in the URL would be stored in the image's tags \
             and apt sources; give a mirror that needs none (or a local proxy)",
            uri.split_once('@').map(|(_, h)| h).unwrap_or(uri)
        ));
    }
    let ok = !rest.is_empty()
        && !rest.starts_with('/')
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~:/%+[]".contains(c));
    if !ok {
        return Err(format!(
            "mirror {uri:?}: only letters, digits and -._~:/%+[] may follow http(s)://"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_stanzas_by_suite() {
        let t = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                 Types: deb\nURIs: http://security.debian.org/debian-security\nSuites: bookworm-security\n\n\
                 Types: deb-src\nURIs: http://src/\nSuites: trixie\n";
        assert_eq!(
            deb822_uri(t, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(
            deb822_uri(t, "bookworm-security").as_deref(),
            Some("http://security.debian.org/debian-security")
        );
        assert_eq!(deb822_uri(t, "trixie"), None, "deb-src only");
        assert_eq!(
            deb822_uri("Enabled: no\nURIs: http://x/\nSuites: a\n", "a"),
            None
        );
    }

    #[test]
    fn one_line_sources() {
        let t = "# deb http://old/ bookworm main\ndeb [arch=amd64 signed-by=/k] http://m/debian bookworm main\n\
                 deb http://s/debian-security bookworm-security main\n";
        assert_eq!(
            one_line_uri(t, "bookworm").as_deref(),
            Some("http://m/debian")
        );
        assert_eq!(
            one_line_uri(t, "bookworm-security").as_deref(),
            Some("http://s/debian-security")
        );
        assert_eq!(one_line_uri(t, "trixie"), None);
    }

    #[test]
    fn uris_checked() {
        assert!(check_uri("http://deb.debian.org/debian").is_ok());
        assert!(check_uri("https://10.0.0.1:3142/debian/").is_ok());
        assert!(check_uri("ftp://x/").is_err());
        assert!(check_uri("http://x/ y").is_err());
        assert!(check_uri("http://x/$(reboot)").is_err());
        assert!(check_uri("http:///etc").is_err());
        let e = check_uri("http://me:secret@mirror/debian").unwrap_err();
        assert!(
            e.contains("a user or password") && !e.contains("secret"),
            "{e}"
        );
        assert!(check_uri("mirror+file:///etc/apt/mirrors/debian.list").is_err());
    }
}
