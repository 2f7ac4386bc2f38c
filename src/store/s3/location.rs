//! Where a remote depot lives and how its objects are named there:
//! [`S3Location`] (bucket, prefix, endpoint, region; parsed from
//! `s3://BUCKET[/PREFIX]`) and [`Keys`], the one mapping between an
//! object's kind and name and its key in the bucket, both ways (a listing's
//! keys are parsed back with the same rules, so a foreign or hostile key
//! never becomes a name).
//!
//! Layout under `PREFIX/` (docs/FORMAT.md, "Remote depots"): packs at
//! `packs/XX/NAME.pack`, their indexes at `packs/XX/NAME.idx` (`XX`: the
//! name's first two hex digits), manifests at `manifests/NAME`, meta
//! objects (`VMDEPOT`, `gc.lock`) at the prefix's root, and the tombstone of
//! a retired object at `trash/<its key>`.

use crate::error::{Error, Result};
use crate::store::{valid_pack_name, ObjectKind};

/// Where a remote depot's objects are: a bucket, a key prefix in it, and
/// the S3 service (`endpoint`: none for AWS itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket's name.
    pub bucket: String,
    /// The prefix of every key: `""` or `a/b` (no slash at either end).
    pub prefix: String,
    /// The S3 API's URL (`http://127.0.0.1:3900`); `None`: AWS_ENDPOINT_URL,
    /// else AWS S3 itself.
    pub endpoint: Option<String>,
    /// The S3 region; `None`: AWS_REGION or AWS_DEFAULT_REGION, else
    /// `us-east-1`.
    pub region: Option<String>,
}

/// The region when neither the location nor the environment names one.
pub(super) const DEFAULT_REGION: &str = "us-east-1";
/// The longest bucket name S3 allows.
const MAX_BUCKET: usize = 63;
/// The longest prefix accepted (S3 keys are at most 1024 bytes).
const MAX_PREFIX: usize = 512;
/// The longest manifest or meta object name accepted.
const MAX_NAME: usize = 128;
/// Meta names that would shadow a directory of the layout.
const RESERVED: [&str; 3] = ["packs", "manifests", "trash"];

impl S3Location {
    /// Parses `s3://BUCKET[/PREFIX]` (no endpoint or region: set them
    /// after). Refuses an empty bucket, `.` or `..` segments, empty
    /// segments and characters outside `[A-Za-z0-9._-]` in the prefix.
    pub fn parse_url(url: &str) -> Result<S3Location> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad_url(url, "it does not start with s3://"))?;
        let rest = rest.trim_end_matches('/');
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let loc = S3Location {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: None,
            region: None,
        };
        loc.check().map_err(|why| bad_url(url, &why))?;
        Ok(loc)
    }

    /// The location as `s3://BUCKET[/PREFIX]`.
    pub fn url(&self) -> String {
        match self.prefix.as_str() {
            "" => format!("s3://{}", self.bucket),
            p => format!("s3://{}/{p}", self.bucket),
        }
    }

    /// The location with the endpoint and region the environment gives
    /// where it has none: `AWS_ENDPOINT_URL`; `AWS_REGION`, else
    /// `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub(super) fn resolved(&self) -> S3Location {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = (self.region.clone())
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        S3Location {
            endpoint: self.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL")),
            region: Some(region),
            ..self.clone()
        }
    }

    /// Checks every field (a location read back from a config file is
    /// checked as a typed one is); `remote` names the remote in the error.
    pub(super) fn validate(&self, remote: &str) -> Result<()> {
        self.check().map_err(|why| Error::Remote {
            remote: remote.to_owned(),
            message: format!("refused the location {}: {why}", self.url()),
        })
    }

    fn check(&self) -> std::result::Result<(), String> {
        check_bucket(&self.bucket)?;
        check_prefix(&self.prefix)?;
        for (what, v) in [("endpoint", &self.endpoint), ("region", &self.region)] {
            if let Some(v) = v {
                check_setting(what, v)?;
            }
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "the endpoint {e:?} is not an http:// or https:// URL"
                ));
            }
        }
        Ok(())
    }
}

fn bad_url(url: &str, why: &str) -> Error {
    Error::Usage(format!(
        "refused the remote URL {:?}: {why}; the form is s3://BUCKET or s3://BUCKET/PREFIX",
        crate::error::one_line(url)
    ))
}

fn check_bucket(b: &str) -> std::result::Result<(), String> {
    if b.is_empty() {
        return Err("the bucket name is empty".into());
    }
    let ok = b.len() <= MAX_BUCKET
        && b.bytes()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
        && !b.starts_with(['.', '-'])
        && !b.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the bucket name {:?} is not 1 to {MAX_BUCKET} of [a-z0-9._-]",
            crate::error::one_line(b)
        ))
    }
}

fn check_prefix(p: &str) -> std::result::Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if p.len() > MAX_PREFIX {
        return Err(format!("the prefix is longer than {MAX_PREFIX} bytes"));
    }
    for seg in p.split('/') {
        let ok = !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !ok {
            return Err(format!(
                "the prefix {:?} has a segment {:?} that is empty, . or .., or not of [A-Za-z0-9._-]",
                crate::error::one_line(p),
                crate::error::one_line(seg)
            ));
        }
    }
    Ok(())
}

fn check_setting(what: &str, v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || v.len() > 1024 || v.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "the {what} {:?} is empty, too long or has spaces or control characters",
            crate::error::one_line(v)
        ));
    }
    Ok(())
}

/// The keys of one remote's objects: the prefix, and the rules that map
/// kinds and names to keys and back.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    /// `""` or `a/b`.
    prefix: String,
}

/// The directory a kind's objects are listed from, under a root (the
/// prefix, or its `trash`): `None` for meta objects, which sit at the root.
fn kind_dir(kind: ObjectKind) -> Option<&'static str> {
    match kind {
        ObjectKind::Pack | ObjectKind::PackIndex => Some("packs"),
        ObjectKind::Manifest => Some("manifests"),
        ObjectKind::Meta => None,
    }
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The key of an object, relative to the prefix; a name that does not
    /// follow its kind's rules is refused (never made into a key).
    pub(super) fn relative(kind: ObjectKind, name: &str) -> std::result::Result<String, String> {
        check_name(kind, name)?;
        Ok(match kind {
            ObjectKind::Pack => format!("packs/{}/{name}.pack", &name[..2]),
            ObjectKind::PackIndex => format!("packs/{}/{name}.idx", &name[..2]),
            ObjectKind::Manifest => format!("manifests/{name}"),
            ObjectKind::Meta => name.to_owned(),
        })
    }

    /// The full key of an object (`trash`: of its tombstone).
    pub(super) fn key(
        &self,
        kind: ObjectKind,
        name: &str,
        trash: bool,
    ) -> std::result::Result<String, String> {
        Ok(self.root(trash) + &Keys::relative(kind, name)?)
    }

    /// The root of the objects (`trash`: of the tombstones), with a
    /// trailing slash; `""` for the bucket's root.
    pub(super) fn root(&self, trash: bool) -> String {
        let trash = if trash { "trash" } else { "" };
        let parts: Vec<&str> = [self.prefix.as_str(), trash]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        match parts.is_empty() {
            true => String::new(),
            false => parts.join("/") + "/",
        }
    }

    /// What a kind's objects are listed by (`trash`: its tombstones): the
    /// key prefix, and whether the listing stops at the first `/` (meta
    /// objects: the root's own objects only).
    pub(super) fn listing(&self, kind: ObjectKind, trash: bool) -> (String, bool) {
        match kind_dir(kind) {
            Some(dir) => (format!("{}{dir}/", self.root(trash)), false),
            None => (self.root(trash), true),
        }
    }

    /// The name of the object of `kind` at `key` (a listing's key, from a
    /// root of [`Keys::root`]), if the key is exactly one that
    /// [`Keys::key`] makes: anything else (a foreign object, a
    /// hostile key) is `None`.
    pub(super) fn parse(&self, kind: ObjectKind, key: &str, trash: bool) -> Option<String> {
        let rel = key.strip_prefix(&self.root(trash))?;
        Keys::parse_relative(kind, rel)
    }

    /// Whether `key` is one [`Keys::key`] makes, of any kind, live or a
    /// tombstone; of meta objects, only those named in `metas`.
    pub(super) fn owns(&self, key: &str, metas: &[&str]) -> bool {
        ObjectKind::ALL.into_iter().any(|k| {
            [false, true].into_iter().any(|trash| {
                self.parse(k, key, trash)
                    .is_some_and(|n| k != ObjectKind::Meta || metas.contains(&n.as_str()))
            })
        })
    }

    /// [`Keys::parse`] of a key relative to the root.
    pub(super) fn parse_relative(kind: ObjectKind, rel: &str) -> Option<String> {
        let name = match kind {
            ObjectKind::Pack => rel
                .strip_prefix("packs/")?
                .get(3..)?
                .strip_suffix(".pack")?,
            ObjectKind::PackIndex => rel.strip_prefix("packs/")?.get(3..)?.strip_suffix(".idx")?,
            ObjectKind::Manifest => rel.strip_prefix("manifests/")?,
            ObjectKind::Meta => rel,
        };
        // Made again from the name: the key must be exactly this one.
        (Keys::relative(kind, name).ok()? == rel).then(|| name.to_owned())
    }
}

/// Whether `name` may be an object of `kind` (the rules in the module doc).
fn check_name(kind: ObjectKind, name: &str) -> std::result::Result<(), String> {
    let ok = match kind {
        ObjectKind::Pack | ObjectKind::PackIndex => valid_pack_name(name),
        ObjectKind::Manifest => safe_name(
            name,
            |c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'),
        ),
        ObjectKind::Meta => {
            safe_name(name, |c| {
                c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')
            }) && !RESERVED.contains(&name)
        }
    };
    if ok {
        return Ok(());
    }
    let rule = match kind {
        ObjectKind::Pack | ObjectKind::PackIndex => "32 lowercase hex digits".to_owned(),
        ObjectKind::Manifest => format!("1 to {MAX_NAME} of [a-z0-9.-], not starting with ."),
        ObjectKind::Meta => format!(
            "1 to {MAX_NAME} of [A-Za-z0-9._-], not starting with ., not packs, manifests or trash"
        ),
    };
    Err(format!(
        "the {kind:?} name {:?} is not {rule}",
        crate::error::one_line(name)
    ))
}

fn safe_name(name: &str, allowed: impl Fn(u8) -> bool) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name.contains("..")
        && name.bytes().all(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACK: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn parse_url_takes_bucket_and_prefix() {
        let l = S3Location::parse_url("s3://depot").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("depot", ""));
        let l = S3Location::parse_url("s3://depot/site-a/v1/").unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("depot", "site-a/v1")
        );
        assert_eq!(l.url(), "s3://depot/site-a/v1");
        assert_eq!(l.endpoint, None);
    }

    #[test]
    fn parse_url_refuses_hostile_input() {
        for url in [
            "s3://",
            "s3:///prefix",
            "http://bucket",
            "bucket/prefix",
            "s3://bucket/../x",
            "s3://bucket/a/./b",
            "s3://bucket/a//b",
            "s3://bucket/a\nb",
            "s3://bu\u{7}cket",
            "s3://Bucket",
            "s3://bucket/a b",
            "s3://..",
            "s3://b/ü",
        ] {
            let e = S3Location::parse_url(url).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("refused the remote URL"), "{url}: {msg}");
            assert_eq!(msg.lines().count(), 1, "{url}: {msg}");
            assert_eq!(e.exit_code(), 2, "{url}");
        }
        let long = format!("s3://{}", "a".repeat(64));
        assert!(S3Location::parse_url(&long).is_err());
    }

    #[test]
    fn validate_checks_endpoint_and_region() {
        let mut l = S3Location::parse_url("s3://b/p").unwrap();
        l.endpoint = Some("http://127.0.0.1:3900".into());
        l.region = Some("garage".into());
        l.validate("r").unwrap();
        l.endpoint = Some("ftp://x".into());
        let msg = l.validate("r").unwrap_err().to_string();
        assert!(
            msg.contains("remote r: refused the location s3://b/p"),
            "{msg}"
        );
        l.endpoint = None;
        l.region = Some("eu\nwest".into());
        assert!(l.validate("r").is_err());
        l.region = None;
        l.prefix = "/a".into();
        assert!(l.validate("r").is_err());
    }

    #[test]
    fn keys_follow_the_layout() {
        let k = Keys::new("site/a");
        let key = |kind, name, trash| k.key(kind, name, trash).unwrap();
        assert_eq!(
            key(ObjectKind::Pack, PACK, false),
            format!("site/a/packs/01/{PACK}.pack")
        );
        assert_eq!(
            key(ObjectKind::PackIndex, PACK, false),
            format!("site/a/packs/01/{PACK}.idx")
        );
        assert_eq!(
            key(
                ObjectKind::Manifest,
                "img-0123456789abcdef.3.manifest",
                true
            ),
            "site/a/trash/manifests/img-0123456789abcdef.3.manifest"
        );
        assert_eq!(key(ObjectKind::Meta, "VMDEPOT", false), "site/a/VMDEPOT");
        assert_eq!(
            key(ObjectKind::Meta, "gc.lock", true),
            "site/a/trash/gc.lock"
        );
        assert_eq!(k.root(false), "site/a/");
        assert_eq!(k.root(true), "site/a/trash/");
        assert_eq!(
            k.listing(ObjectKind::Pack, true),
            ("site/a/trash/packs/".into(), false)
        );
        assert_eq!(k.listing(ObjectKind::Meta, false), ("site/a/".into(), true));
        let top = Keys::new("");
        assert_eq!(top.root(false), "");
        assert_eq!(top.root(true), "trash/");
        assert_eq!(
            top.key(ObjectKind::Meta, "VMDEPOT", false).unwrap(),
            "VMDEPOT"
        );
        assert_eq!(
            top.listing(ObjectKind::Manifest, false),
            ("manifests/".into(), false)
        );
    }

    #[test]
    fn names_are_refused_unless_safe() {
        let k = Keys::new("");
        for (kind, name) in [
            (ObjectKind::Pack, "0123456789ABCDEF0123456789abcdef"),
            (ObjectKind::Pack, "../3456789abcdef0123456789abcdef"),
            (ObjectKind::PackIndex, "abc"),
            (ObjectKind::Manifest, "../x"),
            (ObjectKind::Manifest, "a/b"),
            (ObjectKind::Manifest, "IMG-1.0.manifest"),
            (ObjectKind::Manifest, ".hidden"),
            (ObjectKind::Manifest, ""),
            (ObjectKind::Meta, "trash"),
            (ObjectKind::Meta, "packs"),
            (ObjectKind::Meta, "a\u{0}b"),
            (ObjectKind::Meta, "a..b"),
        ] {
            let e = k.key(kind, name, false).unwrap_err();
            assert!(e.contains("name"), "{kind:?} {name:?}: {e}");
        }
        let long = "a".repeat(MAX_NAME + 1);
        assert!(k.key(ObjectKind::Manifest, &long, false).is_err());
    }

    #[test]
    fn listing_keys_parse_back_only_when_exact() {
        let k = Keys::new("p");
        let pack = format!("p/packs/01/{PACK}.pack");
        assert_eq!(
            k.parse(ObjectKind::Pack, &pack, false).as_deref(),
            Some(PACK)
        );
        assert_eq!(k.parse(ObjectKind::PackIndex, &pack, false), None);
        // The directory must be the name's first two digits.
        assert_eq!(
            k.parse(ObjectKind::Pack, &format!("p/packs/02/{PACK}.pack"), false),
            None
        );
        assert_eq!(k.parse(ObjectKind::Pack, &pack, true), None);
        let tomb = format!("p/trash/packs/01/{PACK}.idx");
        assert_eq!(
            k.parse(ObjectKind::PackIndex, &tomb, true).as_deref(),
            Some(PACK)
        );
        assert_eq!(
            k.parse(ObjectKind::Meta, "p/VMDEPOT", false).as_deref(),
            Some("VMDEPOT")
        );
        assert_eq!(k.parse(ObjectKind::Meta, "p/x/VMDEPOT", false), None);
        assert_eq!(
            k.parse(ObjectKind::Manifest, "p/manifests/a/b", false),
            None
        );
        assert_eq!(
            k.parse(ObjectKind::Manifest, "q/manifests/img-1.0.manifest", false),
            None
        );
        assert_eq!(
            k.parse(ObjectKind::Manifest, "p/manifests/img-1.0.manifest", false)
                .as_deref(),
            Some("img-1.0.manifest")
        );
    }
}
