//! Who may do what with a remote's images: [`Remote::find`] resolves an id
//! or name in a [`Listing`] among the images an account sees, and applies
//! the local rules of [`crate::depot::access`] (the same relations, the
//! same refusal texts), with the relation taken from the manifest: its
//! owner, its type and its shares; launch-only content from its
//! `restricted_from`.

use super::{Listing, Remote, RemoteImage};
use crate::depot::access::{ambiguous, check, relation, Access, Op, Subject};
use crate::error::{Error, Result};
use crate::format::ManifestMeta;

/// The rules' view of a manifest's metadata.
pub(crate) fn subject(m: &ManifestMeta) -> Subject<'_> {
    Subject {
        id: &m.id,
        name: &m.name,
        kind: &m.kind,
        owner: &m.owner,
        restricted_from: &m.restricted_from,
        created_at: m.created_at,
    }
}

/// How `account` relates to a remote image (`None`: it may not see it).
pub(crate) fn access_of(m: &ManifestMeta, account: &str) -> Option<Access> {
    let shared = || Ok(m.shares.iter().any(|s| s.account == account));
    relation(account, &m.owner, &m.kind, shared).unwrap_or(None)
}

impl Remote {
    /// The image `reference` (an id or a name) of `listing`, if `account`
    /// sees it and may do `op` with it. A name that several visible images
    /// have is an error listing them (use the id); an image the account
    /// does not see is not found (`REMOTE:IMAGE`).
    pub fn find(
        &self,
        listing: &Listing,
        reference: &str,
        account: &str,
        op: Op,
    ) -> Result<RemoteImage> {
        let (img, access) = self.visible(listing, reference, account)?;
        let where_ = format!(" on remote {}", self.name());
        check(&subject(&img.manifest.meta), &where_, access, account, op)?;
        Ok(img.clone())
    }

    /// The one image `reference` names among those `account` sees.
    fn visible<'l>(
        &self,
        listing: &'l Listing,
        reference: &str,
        account: &str,
    ) -> Result<(&'l RemoteImage, Access)> {
        let mut found: Vec<(&RemoteImage, Access)> = listing
            .images
            .values()
            .filter(|i| i.id() == reference || i.name() == reference)
            .filter_map(|i| Some((i, access_of(&i.manifest.meta, account)?)))
            .collect();
        if found.len() > 1 {
            let mut subjects: Vec<_> = found
                .iter()
                .map(|(i, a)| (subject(&i.manifest.meta), *a))
                .collect();
            return Err(ambiguous(reference, &mut subjects));
        }
        found.pop().ok_or_else(|| self.missing(listing, reference))
    }

    /// Why `reference` is not in `listing`: an image id whose every
    /// manifest version is damaged names that damage, else not found.
    fn missing(&self, listing: &Listing, reference: &str) -> Error {
        let object = format!("{reference}.");
        let damage = (crate::ids::ImageId::parse(reference).is_some())
            .then(|| listing.damaged.iter().find(|d| d.contains(&object)))
            .flatten();
        match damage {
            Some(line) => Error::StoreDamaged(
                line.strip_prefix("store damaged: ")
                    .unwrap_or(line)
                    .to_owned(),
            ),
            None => self.not_found(reference),
        }
    }
}
