//! How the depot shows values to users: times as RFC 3339 ([`rfc3339`]),
//! an image's state in the cloud services' words (`shown_state`), and the
//! convention for a value that is absent: `None` (`null` in JSON), never
//! `""` (`non_empty`).

use crate::catalog;
use crate::depot::types::ImageState;

/// A catalog text that may be empty as an option: `None` for `""`.
pub(crate) fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// Unix seconds as RFC 3339 UTC (`2026-11-27T10:38:21Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The state users see of a stored one: `creating` while the import or
/// capture runs, `available`, or `deprecated`; `damaged` for a row whose
/// state is none the catalog knows (`None`).
pub(crate) fn shown_state(state: Option<catalog::ImageState>, deprecated: bool) -> ImageState {
    match state {
        Some(catalog::ImageState::Importing) => ImageState::Creating,
        Some(catalog::ImageState::Available) if deprecated => ImageState::Deprecated,
        Some(catalog::ImageState::Available) => ImageState::Available,
        Some(catalog::ImageState::Partial) => ImageState::Partial,
        None => ImageState::Damaged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn states_as_shown() {
        let shown = |s, d| shown_state(s, d).to_string();
        assert_eq!(
            shown(Some(catalog::ImageState::Importing), false),
            "creating"
        );
        assert_eq!(
            shown(Some(catalog::ImageState::Available), false),
            "available"
        );
        assert_eq!(
            shown(Some(catalog::ImageState::Available), true),
            "deprecated"
        );
        assert_eq!(shown(Some(catalog::ImageState::Partial), false), "partial");
        assert_eq!(shown(None, false), "damaged");
    }

    #[test]
    fn shown_values_serialize_as_they_display() {
        use crate::depot::types::{ImageKind, Relation, Timestamp};
        fn same<T: serde::Serialize + std::fmt::Display>(v: T) -> String {
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{v}\""));
            v.to_string()
        }
        assert_eq!(
            same(Timestamp::from_unix(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        use ImageState::*;
        for (s, text) in [
            (Creating, "creating"),
            (Available, "available"),
            (Deprecated, "deprecated"),
            (Partial, "partial"),
            (Damaged, "damaged"),
        ] {
            assert_eq!(same(s), text);
        }
        for k in [
            ImageKind::Public,
            ImageKind::Marketplace,
            ImageKind::Custom,
            ImageKind::Shared,
        ] {
            assert_eq!(same(k).parse::<ImageKind>().unwrap(), k);
        }
        assert!("private".parse::<ImageKind>().is_err());
        use Relation::*;
        let relations = [Itself, Parent, SourceInstance, CopiedFrom, Copy, Child];
        let texts: Vec<String> = relations.into_iter().map(same).collect();
        assert_eq!(
            texts,
            [
                "self",
                "parent",
                "source-instance",
                "copied-from",
                "copy",
                "child"
            ]
        );
        assert_eq!(
            std::time::SystemTime::from(Timestamp::from_unix(-1)),
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(1)
        );
        assert_eq!(non_empty(String::new()), None);
        assert_eq!(non_empty("x".into()).as_deref(), Some("x"));
    }
}
