//! The names a launch gives: instance names ([`check_name`]) and guest
//! hostnames ([`check_hostname`], [`hostname_from`] an instance name).

use crate::error::{Error, Result};

fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("ins-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A valid instance name: what users type, a directory never uses it.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !is_instance_id(name);
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "bad instance name {name:?}: use 1-63 letters, digits, '-', '_' or '.' \
             (and not the form of an id, ins-…)"
        )))
    }
}

/// A hostname the guest can take (RFC 1123 labels); it goes into the
/// seed's meta-data as is.
pub(crate) fn check_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "bad --hostname {h:?}: use letters, digits and '-' in dot-separated labels of 1-63"
        )))
    }
}

/// A hostname from a name: lowercase letters, digits and '-'.
pub(crate) fn hostname_from(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let h = h.trim_matches('-').chars().take(63).collect::<String>();
    if h.is_empty() {
        "vmdepot".into()
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hostnames() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("ins-0123456789abcdef").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert_eq!(hostname_from("Web_Server.1"), "web-server-1");
        assert_eq!(hostname_from("__"), "vmdepot");
        assert!(check_hostname("web-1.example").is_ok());
        for bad in ["", "a b", "-a", "a-", "a..b", "x\ninstance-id: evil"] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
