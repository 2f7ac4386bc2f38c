//! Output of the CLI: [`print_json`] (`--json`), [`print_fields`] (the
//! plain form of `show`), [`show`] (one of the two), [`human`] (binary
//! sizes), [`error_line`] and [`exit_code`] (a failure's line on stderr and
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

/// One `key value` line per field (the plain form of `show`), values
/// escaped ([`esc`]; lists and maps as JSON, which escapes on its own).
pub fn print_fields<T: serde::Serialize>(out: &mut impl Write, v: &T) -> anyhow::Result<()> {
    let v = serde_json::to_value(v)?;
    for (k, v) in v.as_object().into_iter().flatten() {
        let v = match v {
            serde_json::Value::String(s) => esc(s).into_owned(),
            serde_json::Value::Null => "-".into(),
            other => escape(&other.to_string(), false).into_owned(),
        };
        writeln!(out, "{k:<20} {v}")?;
    }
    Ok(())
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
