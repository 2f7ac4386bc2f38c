//! Listing a prefix of the bucket ([`Inner::list_prefix`]) so that a key
//! the S3 client cannot parse (a `..` segment, a control character:
//! written by something other than vmdepot, or hostile) is skipped with a
//! warning instead of failing the whole listing, and with it every command
//! on the remote. `object_store` refuses a whole page of ListObjectsV2 for
//! one such key, so that page is asked again with half as many keys until
//! the bad key is alone, then listing goes on after it (`start-after`).

use std::borrow::Cow;

use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::ObjectMeta;

use super::Inner;
use crate::error::{Error, Result};

/// The keys asked per page (S3's own default and largest).
const PAGE: usize = 1000;

/// Where the next page starts.
enum Start {
    /// The continuation token of the page before.
    Token(String),
    /// After this key (none: at the prefix's start).
    After(Option<String>),
}

/// The key a listing failed to parse, from its error.
pub(super) fn unparsable_key(e: &object_store::Error) -> Option<&str> {
    use object_store::path::Error as P;
    match e {
        object_store::Error::InvalidPath {
            source:
                P::BadSegment { path, .. } | P::EmptySegment { path } | P::NonUnicode { path, .. },
        } => Some(path),
        _ => None,
    }
}

/// The `start-after` that steps over `key` (and, for a common prefix of
/// a delimited listing, over every key under it).
fn past(key: &str) -> String {
    match key.ends_with('/') {
        true => format!("{key}{}", char::MAX),
        false => key.to_owned(),
    }
}

impl Inner {
    /// Every object under `prefix` (`delimited`: only those not under a
    /// further `/`), skipping keys the client cannot parse (see the
    /// module doc).
    pub(super) async fn list_prefix(
        &self,
        prefix: &str,
        delimited: bool,
    ) -> Result<Vec<ObjectMeta>> {
        let mut objects = Vec::new();
        let (mut from, mut max) = (Start::After(None), PAGE);
        loop {
            let opts = PaginatedListOptions {
                offset: match &from {
                    Start::After(key) => key.clone(),
                    Start::Token(_) => None,
                },
                page_token: match &from {
                    Start::Token(t) => Some(t.clone()),
                    Start::After(_) => None,
                },
                delimiter: delimited.then_some(Cow::Borrowed("/")),
                max_keys: Some(max),
                ..Default::default()
            };
            let asked = Some(prefix).filter(|p| !p.is_empty());
            match self.s3.list_paginated(asked, opts).await {
                Ok(page) => {
                    objects.extend(page.result.objects);
                    match page.page_token {
                        Some(t) => from = Start::Token(t),
                        None => return Ok(objects),
                    }
                }
                Err(e) => match unparsable_key(&e) {
                    None => return Err(self.fail("listing", prefix, &e)),
                    Some(_) if max > 1 => max /= 2,
                    Some(key) => {
                        from = Start::After(Some(self.step_over(key, &from)?));
                        max = PAGE;
                    }
                },
            }
        }
    }

    /// The `start-after` past an unparsable `key`, warned about; an error
    /// if the listing would not move on (a server that lists out of order).
    fn step_over(&self, key: &str, from: &Start) -> Result<String> {
        let next = past(key);
        if let Start::After(Some(after)) = from {
            if next.as_str() <= after.as_str() {
                return Err(Error::Remote {
                    remote: self.remote.clone(),
                    message: format!(
                        "listing {}: the server lists {key:?} again after it; see the S3 service's logs",
                        self.url(key)
                    ),
                });
            }
        }
        tracing::warn!(
            "remote {}: skipped {}: a key vmdepot never writes (a `..` segment or a control character); delete it from the bucket",
            self.remote,
            crate::error::one_line(&format!("{:?}", self.url(key)))
        );
        Ok(next)
    }
}
