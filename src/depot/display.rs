//! How the depot shows values to users: times as RFC 3339 ([`rfc3339`]),
//! an image's state in the cloud services' words (`shown_state`), and the
//! JSON convention for a value that is absent: `null`, never `""`
//! ([`empty_as_null`]).

use crate::catalog::ImageState;

/// Serializes an empty string as `null` (`#[serde(serialize_with)]`): in
/// every `--json` output a value that is absent is `null`.
pub fn empty_as_null<S: serde::Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        "" => ser.serialize_none(),
        s => ser.serialize_str(s),
    }
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

/// The state users see: `creating` while the import or capture runs,
/// `available`, or `deprecated`; `damaged` for a row whose state is none
/// the catalog knows (`None`).
pub(crate) fn shown_state(state: Option<ImageState>, deprecated: bool) -> String {
    match state {
        Some(ImageState::Importing) => "creating",
        Some(ImageState::Available) if deprecated => "deprecated",
        Some(ImageState::Available) => "available",
        Some(ImageState::Partial) => "partial",
        None => "damaged",
    }
    .into()
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
        assert_eq!(shown_state(Some(ImageState::Importing), false), "creating");
        assert_eq!(shown_state(Some(ImageState::Available), false), "available");
        assert_eq!(shown_state(Some(ImageState::Available), true), "deprecated");
        assert_eq!(shown_state(None, false), "damaged");
    }
}
