//! Output of the CLI: [`print_json`] (`--json`), [`print_fields`] (the
//! plain form of `show`), [`show`] (one of the two), [`Table`] (columns as
//! wide as their longest cell), [`human`] and [`sized`] (binary sizes), [`error_line`] and [`exit_code`] (a failure's line on stderr and
//! its exit code) and [`esc`], which every catalog string printed outside JSON goes
//! through so that it cannot forge output lines or drive the terminal.

use std::borrow::Cow;
use std::io::Write;

/// `v` as pretty JSON and a newline.
pub fn print_json<T: serde::Serialize>(out: &mut impl Write, v: &T) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// One `key value` line per field (the plain form of `show`), in the
/// struct's order, for people: sizes in binary units with their bytes,
/// times with how long ago, lists and tags as text, `-` for what is absent;
/// strings escaped ([`esc`]).
pub fn print_fields<T: serde::Serialize>(out: &mut impl Write, v: &T) -> anyhow::Result<()> {
    let v = serde_json::to_value(v)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (k, v) in v.as_object().into_iter().flatten() {
        writeln!(out, "{k:<20} {}", field_text(k, v, now))?;
    }
    Ok(())
}

/// The text of one field of `show` (`now`: Unix seconds, for "ago").
fn field_text(key: &str, v: &serde_json::Value, now: i64) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) if key.ends_with("_at") => match unix_of_rfc3339(s) {
            Some(t) => format!(
                "{} ({})",
                s.replacen('T', " ", 1).replacen('Z', " UTC", 1),
                ago(now - t)
            ),
            None => esc(s).into_owned(),
        },
        Value::String(s) => esc(s).into_owned(),
        Value::Number(n) => match n.as_u64() {
            Some(b) if key == "memory_mib" => format!("{b} MiB"),
            Some(b) if key.ends_with("_size") || key.contains("bytes") => sized(b),
            _ => n.to_string(),
        },
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                // a port forward
                Value::Object(o) if o.contains_key("host") && o.contains_key("guest") => format!(
                    "{}:{}->{}",
                    o.get("addr").and_then(Value::as_str).unwrap_or("127.0.0.1"),
                    o["host"],
                    o["guest"]
                ),
                x => field_text("", x, now),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(o) if o.is_empty() => "-".into(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), field_text("", v, now)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `b` bytes for people: `512 bytes`, or `2.0 GiB (2147483648 bytes)`.
pub fn sized(b: u64) -> String {
    if b < 1024 {
        format!("{b} bytes")
    } else {
        format!("{} ({b} bytes)", human(b))
    }
}

/// A duration in the past, roughly: `12 s ago`, `5 min ago`, `3 h ago`,
/// `4 days ago` (`in the future` for a clock that went back).
fn ago(secs: i64) -> String {
    match secs {
        s if s < 0 => "in the future".into(),
        s if s < 120 => format!("{s} s ago"),
        s if s < 2 * 3600 => format!("{} min ago", s / 60),
        s if s < 2 * 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (as the library writes times) as Unix seconds.
fn unix_of_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// A table for people: a header and rows of cells, each column as wide as
/// its longest cell (cells are escaped by the caller), two spaces apart;
/// columns marked right-aligned (sizes, numbers) are padded on the left.
pub struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table of these columns; a name starting with `>` is right-aligned
    /// (the `>` is not shown).
    pub fn new(columns: &[&'static str]) -> Table {
        Table {
            header: columns.iter().map(|c| c.trim_start_matches('>')).collect(),
            right: columns.iter().map(|c| c.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    /// Writes the header and the rows; the last column is not padded.
    pub fn print(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let width = |c: &str| c.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let last = r.len() - 1;
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                let pad = " ".repeat(widths[i] - width(c));
                match (self.right[i], i == last) {
                    (true, _) => line.push_str(&format!("{pad}{c}")),
                    (false, false) => line.push_str(&format!("{c}{pad}")),
                    (false, true) => line.push_str(c),
                }
                if i != last {
                    line.push_str("  ");
                }
            }
            writeln!(out, "{line}")?;
        }
        Ok(())
    }
}

/// `v` as JSON with `--json`, else as fields ([`print_fields`]).
pub fn show<T: serde::Serialize>(out: &mut impl Write, v: &T, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(out, v)
    } else {
        print_fields(out, v)
    }
}

/// A catalog string (name, description, tag, vendor field, account, error
/// message) made safe for a terminal, as `ls -b` does: control characters
/// as escapes (`\n`, `\t`, `\r`, `\x1b`, `\u{85}`), Unicode line
/// separators and bidirectional controls as `\u{…}`, and `\` as `\\`; so
/// a description cannot forge output lines or drive the terminal. Every
/// catalog string the CLI prints outside JSON goes through it.
pub fn esc(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

/// [`esc`]; `backslash: false` leaves `\` alone (for JSON text, whose own
/// escapes use it).
fn escape(s: &str, backslash: bool) -> Cow<'_, str> {
    let special = |c: char| {
        (backslash && c == '\\')
            || c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(special) {
        return Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !special(c) => o.push(c),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x80 => o.push_str(&format!("\\x{:02x}", c as u32)),
            c => o.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(o)
}

/// A failure as the one line it prints on stderr: `vmdepot: …` (escaped,
/// with its causes).
pub fn error_line(e: &anyhow::Error) -> String {
    format!("vmdepot: {}", esc(&format!("{e:#}")))
}

/// A usage error as clap renders it (`error: …`, indented details, tips,
/// `Usage: …`, `For more information, try '--help'.`) on one line:
/// `vmdepot: … (usage: …; see --help)`.
pub fn usage_line(rendered: &str) -> String {
    let mut what = Vec::new();
    let mut usage = None;
    for l in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = l.strip_prefix("Usage: ") {
            usage = Some(u);
        } else if !l.starts_with("For more information") {
            what.push(l.strip_prefix("error: ").unwrap_or(l));
        }
    }
    let what = what.join(" ");
    let line = match usage {
        Some(u) => format!("{what} (usage: {u}; see --help)"),
        None => format!("{what} (see --help)"),
    };
    format!("vmdepot: {}", esc(&line))
}

/// The exit code of a failure: the library error's
/// ([`vmdepot::Error::exit_code`]), else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.downcast_ref::<vmdepot::Error>()
        .map(|e| e.exit_code())
        .unwrap_or(1)
}

/// `b` bytes in binary units: `512 B`, `1.5 KiB` … `PiB`.
pub fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_for_people() {
        let v = serde_json::json!({
            "name": "web\x1b",
            "virtual_size": 2147483648u64,
            "data_bytes": 512,
            "memory_mib": 512,
            "cpus": 2,
            "created_at": "2026-12-02T07:00:00Z",
            "parent": null,
            "tags": {"os": "debian", "release": "12"},
            "shared_with": [],
            "forwards": [{"addr": "127.0.0.1", "host": 2222, "guest": 22}],
            "protected": true,
        });
        let now = unix_of_rfc3339("2026-12-02T07:05:00Z").unwrap();
        let text: Vec<String> = v
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| field_text(k, v, now))
            .collect();
        assert_eq!(
            text,
            [
                "web\\x1b",
                "2.0 GiB (2147483648 bytes)",
                "512 bytes",
                "512 MiB",
                "2",
                "2026-12-02 07:00:00 UTC (5 min ago)",
                "-",
                "os=debian, release=12",
                "-",
                "127.0.0.1:2222->22",
                "yes",
            ]
        );
        assert_eq!(unix_of_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_of_rfc3339("2000-03-01T00:00:01Z"), Some(951_868_801));
        assert_eq!(unix_of_rfc3339("yesterday"), None);
    }

    #[test]
    fn table_columns_fit_their_longest_cell() {
        let mut t = Table::new(&["ID", "NAME", ">SIZE", "CREATED"]);
        t.row(vec![
            "a".into(),
            "a-name-much-longer-than-25-chars-x".into(),
            "1 B".into(),
            "now".into(),
        ]);
        t.row(vec![
            "bb".into(),
            "é".into(),
            "10.0 MiB".into(),
            "then".into(),
        ]);
        let mut out = Vec::new();
        t.print(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID  NAME                                    SIZE  CREATED\n\
             a   a-name-much-longer-than-25-chars-x       1 B  now\n\
             bb  é                                   10.0 MiB  then\n"
        );
    }

    #[test]
    fn esc_shows_control_characters_as_escapes() {
        assert_eq!(esc("plain name-1.2 é"), "plain name-1.2 é");
        assert!(matches!(esc("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            esc("x\nowner              alice\x1b[31m"),
            "x\\nowner              alice\\x1b[31m"
        );
        assert_eq!(esc("a\tb\rc\\d\x7f\0"), "a\\tb\\rc\\\\d\\x7f\\x00");
        assert_eq!(
            esc("\u{9b}2J \u{202e}abc \u{2028}"),
            "\\u{9b}2J \\u{202e}abc \\u{2028}"
        );
        // JSON text keeps its own backslash escapes
        assert_eq!(escape(r#"{"k":"a\u001b"}"#, false), r#"{"k":"a\u001b"}"#);
        assert_eq!(escape("[\"\u{9b}\"]", false), "[\"\\u{9b}\"]");
    }
}
