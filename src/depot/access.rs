//! Who may do what with an image: the acting account against the image's
//! owner, type and shares, and whether its content is launch-only. Enforced
//! here, in the library, so a harness using the Rust API gets the same
//! rules as the CLI. [`allowed`] is the whole rule.
//!
//! | relation of the account | sees it | launch, capture | export, copy | verify | update, delete | share |
//! |---|---|---|---|---|---|---|
//! | owner | yes | yes | yes | yes | yes | yes |
//! | owner of a launch-only image | yes | yes | no | yes | yes | no |
//! | any account, public or marketplace image | yes | yes | yes | yes | no | no |
//! | receiver of a shared custom image (type `shared`) | yes | yes | no | no | no | no |
//! | anyone else | no ("not found", as if it did not exist) | – | – | – | – | – |
//!
//! **Launch-only is a property of the content**, not of the share: an
//! instance launched (or restored) from an image shared with its account
//! carries the origin (`restricted_from` = `"<owner> <img-id>"` of the shared
//! image), and so does every image captured or backed up from it, and
//! every capture of an instance of such an image, transitively. Unsharing
//! or deleting the origin lifts nothing. The receiver can still back up and
//! restore its servers; it can never get the bytes out (export, copy to
//! another depot, share; a future push or pull is a copy).
//!
//! Names: a reference that is the name of several images the account sees
//! is an error listing them ([`Error::AmbiguousName`]), never a silent
//! pick, even when the account owns one of them. Public and marketplace
//! names are unique across owners (a partial unique index), so nobody can
//! publish under another's public name.

use crate::catalog::{self, ImageRow, ImageState, ImageType};
use crate::depot::display::shown_state;
use crate::depot::Depot;
use crate::error::{Error, Result};

/// How the acting account relates to an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Owner,
    /// A public or marketplace image of another owner.
    Everyone,
    /// A custom image another account shared with this one.
    Shared,
}

/// What the account wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// See it: list, show, history.
    Show,
    /// Launch an instance of it (and restore an instance to it).
    Launch,
    /// Export its content to a file.
    Export,
    /// Copy it to another depot, push it to a remote or pull it from one.
    Copy,
    /// Capture (or back up) an instance launched from it.
    Capture,
    /// Verify its content against its digest.
    Verify,
    /// Change its metadata (name, description, protection, tags).
    Update,
    /// Share it with an account, or stop sharing it.
    Share,
    /// Delete it.
    Delete,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Show => "show",
            Op::Launch => "launch",
            Op::Export => "export",
            Op::Copy => "copy",
            Op::Capture => "capture an instance of",
            Op::Verify => "verify",
            Op::Update => "update",
            Op::Share => "share or unshare",
            Op::Delete => "delete",
        }
    }
}

/// The rule itself (pure; unit-tested). `launch_only`: the image's content
/// came from an image shared with its owner (see the module doc).
pub fn allowed(access: Access, launch_only: bool, op: Op) -> bool {
    let by_relation = match access {
        Access::Owner => true,
        Access::Everyone => !matches!(op, Op::Update | Op::Share | Op::Delete),
        // Capturing makes a launch-only image of the receiver's own.
        Access::Shared => matches!(op, Op::Show | Op::Launch | Op::Capture),
    };
    by_relation && !(launch_only && matches!(op, Op::Export | Op::Copy | Op::Share))
}

/// The launch-only origin that an instance launched or restored by
/// `account` from an image carries, and hence every capture of it: the
/// image's own origin, or the image itself when it is another account's
/// custom image (shared with `account`); empty when the content is free.
/// Pure.
pub fn carried_restriction(
    image_id: &str,
    kind: &str,
    owner: &str,
    restricted_from: &str,
    account: &str,
) -> String {
    if !restricted_from.is_empty() {
        restricted_from.to_owned()
    } else if ImageType::parse(kind).ok() == Some(ImageType::Custom) && owner != account {
        format!("{owner} {image_id}")
    } else {
        String::new()
    }
}

/// [`carried_restriction`] of a catalog row.
pub(crate) fn restriction_of(row: &ImageRow, account: &str) -> String {
    carried_restriction(
        row.id.as_str(),
        &row.kind,
        &row.owner,
        &row.restricted_from,
        account,
    )
}

/// An image as the rules and their messages see it: a catalog row's
/// fields, or a remote manifest's (`crate::remote`).
pub(crate) struct Subject<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// Its type as recorded (public, marketplace, custom).
    pub kind: &'a str,
    pub owner: &'a str,
    /// `"<owner> <img-id>"` of the shared image whose content it holds, or
    /// empty.
    pub restricted_from: &'a str,
    pub created_at: i64,
}

impl<'a> Subject<'a> {
    /// The subject of a catalog row.
    fn of(row: &'a ImageRow) -> Subject<'a> {
        Subject {
            id: row.id.as_str(),
            name: &row.name,
            kind: &row.kind,
            owner: &row.owner,
            restricted_from: &row.restricted_from,
            created_at: row.created_at,
        }
    }
}

/// How `account` relates to an image of `owner` and type `kind`; `shared`
/// tells whether the image is shared with the account (asked only for
/// another owner's custom image). `None`: it may not even see it.
pub(crate) fn relation(
    account: &str,
    owner: &str,
    kind: &str,
    shared: impl FnOnce() -> Result<bool>,
) -> Result<Option<Access>> {
    if owner == account {
        return Ok(Some(Access::Owner));
    }
    if matches!(
        ImageType::parse(kind).ok(),
        Some(ImageType::Public | ImageType::Marketplace)
    ) {
        return Ok(Some(Access::Everyone));
    }
    Ok(shared()?.then_some(Access::Shared))
}

/// The error for a reference that names several images the account sees:
/// all of them, oldest first (use the id).
pub(crate) fn ambiguous(reference: &str, found: &mut [(Subject, Access)]) -> Error {
    found.sort_by_key(|(s, _)| (s.created_at, s.id.to_owned()));
    let list: Vec<String> = found
        .iter()
        .map(|(s, a)| {
            let kind = if *a == Access::Shared {
                "shared"
            } else {
                s.kind
            };
            let whose = if *a == Access::Owner {
                "yours".to_owned()
            } else {
                format!("owner {}", s.owner)
            };
            format!("{} ({kind}, {whose})", s.id)
        })
        .collect();
    Error::AmbiguousName {
        name: reference.to_owned(),
        matches: list.join(", "),
    }
}

/// Whether `account`, related to the image by `access`, may do `op` with
/// it; the refusal names the rule. `where_` names where the image is
/// (empty for this depot, `" on remote NAME"` for a remote's).
pub(crate) fn check(
    s: &Subject,
    where_: &str,
    access: Access,
    account: &str,
    op: Op,
) -> Result<()> {
    let launch_only = !s.restricted_from.is_empty();
    if allowed(access, launch_only, op) {
        return Ok(());
    }
    let rule = match access {
        Access::Shared => format!(
            "it is shared with you by {}: a shared image can only be launched \
             (and captured, as a launch-only image)",
            s.owner
        ),
        _ if launch_only => {
            let (owner, origin) = s
                .restricted_from
                .rsplit_once(' ')
                .unwrap_or(("another account", s.restricted_from));
            format!(
                "it is launch-only: it holds the content of image {origin} that {owner} \
                 shared with you; it can be launched, captured and backed up, never \
                 exported, copied or shared"
            )
        }
        _ => format!(
            "it is a {} image owned by {}: only its owner may {} it",
            s.kind,
            s.owner,
            op.verb()
        ),
    };
    Err(Error::NotPermitted(format!(
        "image {} ({}){where_}: you ({account}) may not {} it: {rule}",
        s.name,
        s.id,
        op.verb()
    )))
}

impl Depot {
    /// How this account relates to `row`; `None`: it may not even see it.
    pub(crate) fn access(&self, row: &ImageRow) -> Result<Option<Access>> {
        relation(self.account(), &row.owner, &row.kind, || {
            catalog::images::is_shared_with(&self.repo.conn, row.id.as_str(), self.account())
        })
    }

    /// Whether `row` is the row of an import that died (hidden from
    /// everyone until gc removes it).
    pub(crate) fn abandoned(&self, row: &ImageRow) -> bool {
        row.state == Some(ImageState::Importing) && !self.repo.import_alive(&row.id)
    }

    /// Finds an image by id or name among those this account can see,
    /// hiding imports that died. A name that several of them have is an
    /// error listing them all (use the id), whoever owns them.
    pub(crate) fn find_visible(&self, reference: &str) -> Result<(ImageRow, Access)> {
        let mut found: Vec<(ImageRow, Access)> = Vec::new();
        for row in catalog::find_images(&self.repo.conn, reference)? {
            if self.abandoned(&row) {
                continue;
            }
            if let Some(a) = self.access(&row)? {
                found.push((row, a));
            }
        }
        if found.len() > 1 {
            let mut subjects: Vec<_> = found.iter().map(|(r, a)| (Subject::of(r), *a)).collect();
            return Err(ambiguous(reference, &mut subjects));
        }
        found
            .pop()
            .ok_or_else(|| Error::ImageNotFound(reference.to_owned()))
    }

    /// The image, if this account may do `op` with it; a refusal names the
    /// rule.
    pub(crate) fn image_for(&self, reference: &str, op: Op) -> Result<(ImageRow, Access)> {
        let (row, access) = self.find_visible(reference)?;
        check(&Subject::of(&row), "", access, self.account(), op)?;
        Ok((row, access))
    }

    /// Like [`Depot::image_for`], and the image must be available.
    pub(crate) fn available_for(&self, reference: &str, op: Op) -> Result<(ImageRow, Access)> {
        self.usable_for(reference, op, false)
    }

    /// [`Depot::available_for`], or a partial image too when `partial_ok`
    /// (a lazy launch: its disk server fetches what it lacks). A partial
    /// image refused says how to complete it.
    pub(crate) fn usable_for(
        &self,
        reference: &str,
        op: Op,
        partial_ok: bool,
    ) -> Result<(ImageRow, Access)> {
        let (row, access) = self.image_for(reference, op)?;
        row.check_sound()?;
        if row.state == Some(ImageState::Partial) && !partial_ok {
            // by the remote image's id: the local name may have changed
            let origin = row.copied_from.strip_prefix("remote:").unwrap_or("");
            let (remote, id) = origin.split_once(' ').unwrap_or(("REMOTE", "IMAGE"));
            return Err(Error::ImageNotAvailable {
                image: format!("{} ({})", row.name, row.id),
                state: format!(
                    "partial (only what its lazy instances read is here: `vmdepot image pull \
                     {remote}:{id}` fetches the rest)"
                ),
            });
        }
        if row.state == Some(ImageState::Partial) {
            return Ok((row, access));
        }
        if row.state != Some(ImageState::Available) {
            return Err(Error::ImageNotAvailable {
                image: format!("{} ({})", row.name, row.id),
                state: shown_state(row.state, row.deprecated).to_string(),
            });
        }
        Ok((row, access))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules() {
        use Access::*;
        use Op::*;
        let all = [
            Show, Launch, Export, Copy, Capture, Verify, Update, Share, Delete,
        ];
        for op in all {
            assert!(allowed(Owner, false, op));
        }
        for op in [Show, Launch, Export, Copy, Capture, Verify] {
            assert!(allowed(Everyone, false, op), "{op:?}");
        }
        for op in [Update, Share, Delete] {
            assert!(!allowed(Everyone, false, op), "{op:?}");
        }
        for op in all {
            assert_eq!(
                allowed(Shared, false, op),
                matches!(op, Show | Launch | Capture),
                "{op:?}"
            );
        }
    }

    #[test]
    fn launch_only_content_never_leaves() {
        use Access::*;
        use Op::*;
        let all = [
            Show, Launch, Export, Copy, Capture, Verify, Update, Share, Delete,
        ];
        for access in [Owner, Everyone, Shared] {
            for op in [Export, Copy, Share] {
                assert!(!allowed(access, true, op), "{access:?} {op:?}");
            }
        }
        // its owner keeps everything else: launch, capture (backups),
        // verify, rename, protect, delete (backup --keep prunes)
        for op in all {
            assert_eq!(
                allowed(Owner, true, op),
                !matches!(op, Export | Copy | Share),
                "{op:?}"
            );
        }
        // never more than without the restriction
        for access in [Owner, Everyone, Shared] {
            for op in all {
                assert!(!allowed(access, true, op) || allowed(access, false, op));
            }
        }
    }

    #[test]
    fn restriction_is_carried_and_inherited() {
        let id = "img-0123456789abcdef";
        // another account's custom image (shared with bob): its content
        assert_eq!(
            carried_restriction(id, "custom", "alice", "", "bob"),
            format!("alice {id}")
        );
        // a launch-only image keeps its first origin, whoever launches it
        let origin = "alice img-fedcba9876543210";
        assert_eq!(
            carried_restriction(id, "custom", "bob", origin, "bob"),
            origin
        );
        assert_eq!(
            carried_restriction(id, "custom", "alice", origin, "bob"),
            origin
        );
        // free content: one's own custom image, anyone's public one
        assert_eq!(carried_restriction(id, "custom", "bob", "", "bob"), "");
        for kind in ["public", "marketplace"] {
            assert_eq!(carried_restriction(id, kind, "alice", "", "bob"), "");
        }
    }
}
