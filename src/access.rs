//! Who may do what with an image: the acting account against the image's
//! owner, type and shares. Enforced here, in the library, so a harness using
//! the Rust API gets the same rules as the CLI.
//!
//! | relation of the account | sees it | launch | export, copy, capture, verify | update, share, delete |
//! |---|---|---|---|---|
//! | owner | yes | yes | yes | yes |
//! | any account, public or marketplace image | yes | yes | yes | no |
//! | receiver of a shared custom image (type `shared`) | yes | yes | no | no |
//! | anyone else | no ("not found", as if it did not exist) | – | – | – |

use rusqlite::params;

use crate::catalog::{self, ImageRow};
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
    Show,
    Launch,
    Export,
    Copy,
    Capture,
    Verify,
    Update,
    Share,
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

/// The rule itself (pure; unit-tested).
pub fn allowed(access: Access, op: Op) -> bool {
    match access {
        Access::Owner => true,
        Access::Everyone => !matches!(op, Op::Update | Op::Share | Op::Delete),
        Access::Shared => matches!(op, Op::Show | Op::Launch),
    }
}

impl Depot {
    /// How this account relates to `row`; `None`: it may not even see it.
    pub(crate) fn access(&self, row: &ImageRow) -> Result<Option<Access>> {
        if row.owner == self.account() {
            return Ok(Some(Access::Owner));
        }
        if row.kind == "public" || row.kind == "marketplace" {
            return Ok(Some(Access::Everyone));
        }
        let shared: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM image_shares WHERE image = ?1 AND account = ?2)",
            params![row.id.as_str(), self.account()],
            |r| r.get(0),
        )?;
        Ok(shared.then_some(Access::Shared))
    }

    /// Finds an image by id or name among those this account can see (its
    /// own name first), hiding imports that died.
    pub(crate) fn find_visible(&self, reference: &str) -> Result<(ImageRow, Access)> {
        let mut best: Option<(ImageRow, Access)> = None;
        for row in catalog::find_images(&self.conn, reference)? {
            if row.state == "importing" && !self.import_alive(&row.id) {
                continue;
            }
            let Some(a) = self.access(&row)? else {
                continue;
            };
            let rank = |a: Access| match a {
                Access::Owner => 0,
                Access::Shared => 1,
                Access::Everyone => 2,
            };
            if best.as_ref().is_none_or(|(_, b)| rank(a) < rank(*b)) {
                best = Some((row, a));
            }
        }
        best.ok_or_else(|| Error::ImageNotFound(reference.to_owned()))
    }

    /// The image, if this account may do `op` with it; a refusal names the
    /// rule.
    pub(crate) fn image_for(&self, reference: &str, op: Op) -> Result<(ImageRow, Access)> {
        let (row, access) = self.find_visible(reference)?;
        if !allowed(access, op) {
            let what = format!("image {} ({})", row.name, row.id);
            let rule = match access {
                Access::Shared => format!(
                    "it is shared with you by {}: a shared image can only be launched",
                    row.owner
                ),
                _ => format!(
                    "it is a {} image owned by {}: only its owner may {} it",
                    row.kind,
                    row.owner,
                    op.verb()
                ),
            };
            return Err(Error::NotPermitted(format!(
                "{what}: you ({}) may not {} it: {rule}",
                self.account(),
                op.verb()
            )));
        }
        Ok((row, access))
    }

    /// Like [`Depot::image_for`], and the image must be available.
    pub(crate) fn available_for(&self, reference: &str, op: Op) -> Result<(ImageRow, Access)> {
        let (row, access) = self.image_for(reference, op)?;
        row.check_sound()?;
        if row.state != "available" {
            return Err(Error::ImageNotAvailable {
                image: format!("{} ({})", row.name, row.id),
                state: crate::depot::shown_state(&row.state, row.deprecated),
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
            assert!(allowed(Owner, op));
        }
        for op in [Show, Launch, Export, Copy, Capture, Verify] {
            assert!(allowed(Everyone, op), "{op:?}");
        }
        for op in [Update, Share, Delete] {
            assert!(!allowed(Everyone, op), "{op:?}");
        }
        for op in all {
            assert_eq!(allowed(Shared, op), matches!(op, Show | Launch), "{op:?}");
        }
    }
}
