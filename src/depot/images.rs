//! Image metadata operations of the depot, under the access rules: list
//! and show ([`Depot::list_images`], [`Depot::image`]), update, share and
//! unshare, history (lineage) and delete. Edits write the image's next
//! manifest in the catalog transaction that makes them.

use rusqlite::Connection;
use tracing::instrument;

use crate::catalog::{self, ImageRow, ImageState, ImageType};
use crate::depot::access::{Access, Op};
use crate::depot::display::{non_empty, shown_state};
use crate::depot::open::check_account;
use crate::depot::types::{
    self, HistoryEntry, ImageInfo, ImageKind, ImageUpdate, Relation, Timestamp,
};
use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::ids::ImageId;
use crate::maint;

/// The relation of an image of this depot in `image history`.
fn entry(relation: Relation, id: String, name: String, exists: bool) -> HistoryEntry {
    HistoryEntry {
        relation,
        id,
        name,
        depot: None,
        exists,
    }
}

impl Depot {
    /// The images this account can see (its own, public and marketplace
    /// ones, and those shared with it, shown with type `shared`), running
    /// imports included, abandoned ones hidden.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let rows = catalog::list_images(&self.repo.conn)?;
        let usage = maint::usage(&self.repo)?;
        let mut out = Vec::new();
        for r in rows {
            if self.abandoned(&r) {
                continue;
            }
            if let Some(a) = self.access(&r)? {
                out.push(self.info_from_row(r, a, &usage)?);
            }
        }
        Ok(out)
    }

    /// One image by id or name (among those this account can see).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn image(&self, reference: &str) -> Result<ImageInfo> {
        let (row, access) = self.image_for(reference, Op::Show)?;
        let usage = maint::usage(&self.repo)?;
        self.info_from_row(row, access, &usage)
    }

    /// Deletes an image (its chunks are freed by the next `gc`). Refused for
    /// a protected image; for one that is shared or that instances use,
    /// unless `force`.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn delete_image(&self, reference: &str, force: bool) -> Result<ImageInfo> {
        let (row, access) = self.image_for(reference, Op::Delete)?;
        let importing = row.state == Some(ImageState::Importing);
        let partial = row.state == Some(ImageState::Partial);
        let info = self.info_from_row(row, access, &maint::usage(&self.repo)?)?;
        let what = format!("image {} ({})", info.name, info.id);
        // A damaged row may be deleted whatever its state.
        if importing && info.damage.is_none() {
            return Err(Error::ImageNotAvailable {
                image: what,
                state: info.state.to_string(),
            });
        }
        if info.protected {
            return Err(Error::Conflict(format!(
                "{what} is protected: `vmdepot image update {} --unprotect` first",
                info.id
            )));
        }
        let users = catalog::instances::count_using_image(&self.repo.conn, &info.id)?;
        if !force && !info.shared_with.is_empty() {
            return Err(Error::Conflict(format!(
                "{what} is shared with {}: unshare it first, or delete with --force",
                info.shared_with.join(", ")
            )));
        }
        if !force && users > 0 {
            return Err(Error::Conflict(format!(
                "{what} is used by {users} instance(s): delete them first, or delete with --force \
                 (they keep running from their base)"
            )));
        }
        if partial && users > 0 {
            // Its instances' disks need the remote image: no base to give them.
            return Err(Error::Conflict(format!(
                "{what} is partial and {users} instance(s) run from it lazily: delete them \
                 first, or `vmdepot image pull` it (which completes it) and then delete it \
                 with --force"
            )));
        }
        // Lazy instances read the image from the store: they get its base
        // file first and become overlays on it, which a running one cannot.
        let mut _base_lock = None;
        let mut _no_server = None;
        if catalog::instances::count_lazy_of(&self.repo.conn, &info.id)? > 0 {
            self.perms().mkdir_all(&self.root().join("bases"))?;
            _base_lock = Some(crate::image::bases::base_flock(
                &self.repo,
                &info.id,
                nix::fcntl::FlockArg::LockExclusive,
            )?);
            let running =
                catalog::instances::running_of(&self.repo.conn, &info.id, catalog::DiskMode::Lazy)?;
            if let Some((id, name, _)) = running
                .iter()
                .find(|(id, _, pid)| pid.is_some_and(|p| crate::proc::pid_alive(p, id)))
            {
                return Err(Error::Conflict(format!(
                    "{what} is read by the running instance {name} ({id}), whose disk is lazy: \
                     stop it first"
                )));
            }
            // No disk server of it may run, nor a launch start one, while
            // its lazy instances are turned into overlays.
            _no_server = Some(crate::image::serve::hold_no_server(
                &self.repo, &info.id, &what,
            )?);
            let img = catalog::find_images(&self.repo.conn, &info.id)?
                .into_iter()
                .find(|r| r.id.as_str() == info.id)
                .ok_or_else(|| Error::ImageNotFound(info.id.clone()))?;
            crate::image::bases::ensure_base(&self.repo, &img, &crate::progress::NoProgress)?;
            catalog::instances::lazy_to_overlay(&self.repo.conn, &info.id)?;
        }
        catalog::images::delete_image(&self.repo.conn, &info.id)?;
        // After the commit (a crash in between leaves an orphan gc removes).
        if let Some(id) = ImageId::parse(&info.id) {
            crate::repo::manifest::remove_all(&self.repo.root, &id)?;
            let _ = std::fs::remove_file(crate::image::profile::path(&self.repo.root, id.as_str()));
        }
        Ok(info)
    }

    /// Changes an image's name, description, protection, deprecation or
    /// tags (owner only).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn update_image(&self, reference: &str, u: &ImageUpdate) -> Result<ImageInfo> {
        let (row, _) = self.image_for(reference, Op::Update)?;
        if let Some(n) = &u.name {
            crate::image::names::check_name(n)?;
        }
        crate::catalog::images::check_caller_tags(u.tags.iter().map(|(k, _)| k))?;
        for (k, _) in &u.tags {
            if k.is_empty() || k.contains('=') {
                return Err(Error::Usage(format!(
                    "bad tag key {k:?}: use --tag KEY=VALUE"
                )));
            }
        }
        let r = catalog::write(&self.repo.conn, |tx| {
            apply_update(tx, row.id.as_str(), u)?;
            crate::repo::manifest::write_next(tx, &self.repo.root, self.repo.perms, &row.id)
        });
        match r {
            Err(Error::Sqlite(e)) if catalog::images::is_unique_violation(&e) => {
                Err(crate::image::names::name_clash(
                    &self.repo.conn,
                    self.account(),
                    u.name.as_deref().unwrap_or_default(),
                    &row.kind,
                ))
            }
            r => r,
        }?
        .committed();
        self.image(row.id.as_str())
    }

    /// Shares a custom image with another account: it sees it as type
    /// `shared` and may only launch it (owner only).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn share_image(&self, reference: &str, account: &str) -> Result<ImageInfo> {
        let (row, _) = self.available_for(reference, Op::Share)?;
        if row.image_type() != Some(ImageType::Custom) {
            return Err(Error::Invalid(format!(
                "image {} ({}) is {}: every account can already use it; only custom images are shared",
                row.name, row.id, row.kind
            )));
        }
        check_account(account)?;
        if account == self.account() {
            return Err(Error::Usage(format!(
                "share with another account than yourself ({account:?})"
            )));
        }
        catalog::write(&self.repo.conn, |tx| {
            catalog::images::share(tx, row.id.as_str(), account, catalog::now())?;
            crate::repo::manifest::write_next(tx, &self.repo.root, self.repo.perms, &row.id)
        })?
        .committed();
        self.image(row.id.as_str())
    }

    /// Stops sharing an image with an account (owner only).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn unshare_image(&self, reference: &str, account: &str) -> Result<ImageInfo> {
        check_account(account)?;
        let (row, _) = self.image_for(reference, Op::Share)?;
        let manifest = catalog::write(&self.repo.conn, |tx| {
            if !catalog::images::unshare(tx, row.id.as_str(), account)? {
                return Ok(None);
            }
            let m =
                crate::repo::manifest::write_next(tx, &self.repo.root, self.repo.perms, &row.id)?;
            Ok(Some(m))
        })?;
        let Some(manifest) = manifest else {
            return Err(Error::Invalid(format!(
                "image {} ({}) is not shared with {account:?}",
                row.name, row.id
            )));
        };
        manifest.committed();
        self.image(row.id.as_str())
    }

    /// The accounts an image is shared with (owner only).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn image_shares(&self, reference: &str) -> Result<Vec<String>> {
        let (row, _) = self.image_for(reference, Op::Share)?;
        catalog::images::shares_of(&self.repo.conn, row.id.as_str())
    }

    /// The image's lineage: itself, its parent chain, the instance it was
    /// captured from, where it was copied from, copies made of it, and
    /// images captured from it.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn image_history(&self, reference: &str) -> Result<Vec<HistoryEntry>> {
        let (row, _) = self.image_for(reference, Op::Show)?;
        let conn = &self.repo.conn;
        let mut out = vec![entry(
            Relation::Itself,
            row.id.to_string(),
            row.name.clone(),
            true,
        )];
        if let Some(i) = &row.source_instance {
            let name = catalog::instances::instance_name(conn, i)?;
            out.push(entry(
                Relation::SourceInstance,
                i.clone(),
                name.clone().unwrap_or_default(),
                name.is_some(),
            ));
        }
        if !row.copied_from.is_empty() {
            let (d, id) = row
                .copied_from
                .rsplit_once(' ')
                .unwrap_or(("", &row.copied_from));
            out.push(HistoryEntry {
                depot: non_empty(d.to_owned()),
                ..entry(
                    Relation::CopiedFrom,
                    id.to_owned(),
                    row.parent_name.clone(),
                    true,
                )
            });
        } else {
            out.extend(parent_chain(conn, &row)?);
        }
        for (depot, id) in catalog::images::copies_of(conn, row.id.as_str())? {
            out.push(HistoryEntry {
                depot: non_empty(depot),
                ..entry(Relation::Copy, id, String::new(), true)
            });
        }
        for (id, name) in catalog::images::children_of(conn, row.id.as_str())? {
            out.push(entry(Relation::Child, id, name, true));
        }
        Ok(out)
    }

    /// An image as this account sees it (`access`), with its share of the
    /// store from `usage`.
    fn info_from_row(
        &self,
        r: ImageRow,
        access: Access,
        usage: &maint::Usage,
    ) -> Result<ImageInfo> {
        let (unique, shared) = usage.per_image.get(&r.id).copied().unwrap_or((0, 0));
        let damage = r
            .damage
            .clone()
            .or_else(|| usage.damaged.get(&r.id).cloned());
        let tags = catalog::images::tags_of(&self.repo.conn, r.id.as_str())?;
        let shared_with = if access == Access::Owner {
            catalog::images::shares_of(&self.repo.conn, r.id.as_str())?
        } else {
            Vec::new()
        };
        Ok(ImageInfo {
            id: r.id.to_string(),
            state: if damage.is_some() {
                types::ImageState::Damaged
            } else {
                shown_state(r.state, r.deprecated)
            },
            kind: if access == Access::Shared {
                Some(ImageKind::Shared)
            } else {
                r.image_type().map(ImageKind::from)
            },
            name: r.name,
            owner: r.owner,
            description: non_empty(r.description),
            source_format: r.source_format,
            virtual_size: r.virtual_size,
            data_bytes: r.data_bytes,
            content_digest: r.content_digest,
            created_at: Timestamp::from_unix(r.created_at),
            unique_stored_bytes: unique,
            shared_stored_bytes: shared,
            parent: r.parent,
            parent_name: non_empty(r.parent_name),
            source_instance: r.source_instance,
            copied_from: non_empty(r.copied_from),
            protected: r.protected,
            deprecated: r.deprecated,
            tags,
            vendor: non_empty(r.vendor),
            application: non_empty(r.application),
            app_version: non_empty(r.app_version),
            shared_with,
            launch_only: !r.restricted_from.is_empty(),
            restricted_from: non_empty(r.restricted_from),
            damage,
        })
    }
}

/// Applies the edits of `u` to image `id` (in the caller's write
/// transaction).
fn apply_update(tx: &Connection, id: &str, u: &ImageUpdate) -> Result<()> {
    if let Some(n) = &u.name {
        catalog::images::set_name(tx, id, n)?;
    }
    if let Some(d) = &u.description {
        catalog::images::set_description(tx, id, d)?;
    }
    if let Some(p) = u.protected {
        catalog::images::set_protected(tx, id, p)?;
    }
    if let Some(p) = u.deprecated {
        catalog::images::set_deprecated(tx, id, p)?;
    }
    catalog::images::set_tags(tx, id, &u.tags)
}

/// The parents of an image within this depot, nearest first (at most
/// 1000: a cycle in a damaged catalog ends there). A parent deleted since
/// shows with its name at capture, as not existing.
fn parent_chain(conn: &Connection, row: &ImageRow) -> Result<Vec<HistoryEntry>> {
    let mut out = Vec::new();
    let mut next = row.parent.clone().map(|p| (p, row.parent_name.clone()));
    while let Some((pid, pname)) = next.take() {
        if out.len() >= 1000 {
            break;
        }
        let p = catalog::find_images(conn, &pid)?.into_iter().next();
        let name = p.as_ref().map(|p| p.name.clone()).unwrap_or(pname);
        out.push(entry(Relation::Parent, pid, name, p.is_some()));
        next = p.and_then(|p| p.parent.map(|q| (q, p.parent_name)));
    }
    Ok(out)
}
