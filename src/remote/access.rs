//! Who may do what with a remote's images: [`Remote::find`] resolves an id
//! or name in a [`Listing`] among the images an account sees, and applies
//! the local rules of [`crate::depot::access`] (the same relations, the
//! same refusal texts), with the relation taken from the manifest: its
//! owner, its type and its shares; launch-only content from its
//! `restricted_from`. An image over the import limit is refused for
//! anything but its deletion.

use super::{Listed, Listing, Remote, RemoteImage};
use crate::depot::access::{ambiguous, check, relation, Access, Op, Subject};
use crate::error::{Error, Result};
use crate::format::ManifestMeta;
use crate::image::source::{too_big, MAX_VIRTUAL_SIZE};

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
        let listed = self.find_listed(listing, reference, account, op)?;
        self.load(&listed)
    }

    /// [`Remote::find`] without loading the image's map: its listing entry.
    pub(crate) fn find_listed(
        &self,
        listing: &Listing,
        reference: &str,
        account: &str,
        op: Op,
    ) -> Result<Listed> {
        let (img, access) = self.visible(listing, reference, account)?;
        let where_ = format!(" on remote {}", self.name());
        check(&subject(&img.meta), &where_, access, account, op)?;
        if op != Op::Delete {
            self.check_size(&img.meta)?;
        }
        Ok(img.clone())
    }

    /// Refuses an image over the import limit, as import does: no local
    /// depot could hold it (only its deletion is allowed).
    pub(crate) fn check_size(&self, m: &ManifestMeta) -> Result<()> {
        if m.virtual_size <= MAX_VIRTUAL_SIZE {
            return Ok(());
        }
        let label = format!("image {} ({}) on remote {}", m.name, m.id, self.name());
        Err(too_big(std::path::Path::new(&label), m.virtual_size))
    }

    /// The one image `reference` names among those `account` sees.
    fn visible<'l>(
        &self,
        listing: &'l Listing,
        reference: &str,
        account: &str,
    ) -> Result<(&'l Listed, Access)> {
        let mut found: Vec<(&Listed, Access)> = listing
            .images
            .values()
            .filter(|i| i.id() == reference || i.name() == reference)
            .filter_map(|i| Some((i, access_of(&i.meta, account)?)))
            .collect();
        if found.len() > 1 {
            let mut subjects: Vec<_> = found.iter().map(|(i, a)| (subject(&i.meta), *a)).collect();
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
