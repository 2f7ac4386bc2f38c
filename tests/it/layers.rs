//! The module direction of src/ (docs/ARCHITECTURE.md, "Layers"): every
//! file belongs to a layer, and its code names only modules of its own
//! layer or of layers below. Fails with the file, line and edge that points
//! upwards.
//!
//! What counts as naming a module: a path `crate::m…`, each item of a
//! group `crate::{m, n::x, …}` (over several lines too), and a root
//! re-export `crate::Name` (src/lib.rs `pub use m::…::Name`), which counts
//! as the module it comes from. `super::super::…` paths are refused
//! outright: they would hide the module they reach. Comments (`//`, `/* */`)
//! and string literals are not code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Layers from the bottom up; a module's layer is its top-level name under
/// `crate::`. The binary (src/main.rs, src/cli/) sits above them all.
const LAYERS: &[&[&str]] = &[
    &["error", "ids", "perms", "progress", "proc"],
    &["format"],
    &["digest"],
    &["store"],
    &["catalog"],
    &["repo"],
    &["image"],
    &["maint"],
    &["depot"],
    &["launch"],
    &["lifecycle"],
    &["build"],
    &["remote"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layer of a source file under src/ (None: the binary, or lib.rs and
/// internals.rs, which only re-export).
fn file_rank(rel: &Path) -> Option<usize> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let module = first.strip_suffix(".rs").unwrap_or(first);
    if matches!(module, "lib" | "internals" | "main" | "cli") {
        return None;
    }
    Some(rank(module).unwrap_or_else(|| {
        panic!(
            "src/{}: a module in no layer: add it to LAYERS in tests/it/layers.rs and to docs/ARCHITECTURE.md",
            rel.display()
        )
    }))
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text with comments and the contents of string and char literals
/// blanked (newlines kept, so byte offsets still give line numbers).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            // Raw strings (r"…", r#"…"#) are handled as plain ones: ours
            // hold no quote that would end them early.
            out.push(b'"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    out.push(b' ');
                    out.push(blank(b[i + 1]));
                    i += 2;
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            if i < b.len() {
                out.push(b'"');
                i += 1;
            }
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x', '\n', '\''), not a lifetime.
            let end = (i + 1..b.len().min(i + 12)).find(|&j| j > i + 1 && b[j] == b'\'');
            let end = end.unwrap_or(i);
            for &c in &b[i..=end] {
                out.push(blank(c));
            }
            i = end + 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Root re-exports of src/lib.rs: name → the module it comes from.
fn root_exports() -> HashMap<String, String> {
    let lib = code_only(&std::fs::read_to_string(src_dir().join("lib.rs")).unwrap());
    let mut out = HashMap::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let names = rest.rsplit_once("::").map(|(_, n)| n).unwrap_or(rest);
        for n in names
            .trim_matches(|c| c == '{' || c == '}' || char::is_whitespace(c))
            .split(',')
        {
            let n = n.trim();
            if !n.is_empty() {
                out.insert(n.to_owned(), module.clone());
            }
        }
    }
    assert!(
        out.len() > 20,
        "found only {} re-exports in src/lib.rs",
        out.len()
    );
    out
}

fn ident_at(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first names of the items of a `{…}` group that starts at `s[0]`,
/// and the group's length.
fn group_heads(s: &str) -> (Vec<String>, usize) {
    let (mut depth, mut heads, mut start) = (0, Vec::new(), 1);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' | ',' if depth == 1 => {
                heads.push(ident_at(&s[start..i]));
                start = i + 1;
                if c == '}' {
                    return (heads, i + 1);
                }
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
    (heads, s.len())
}

/// Every module (or root re-export) a file's code names, with the byte
/// offset of the naming path.
fn named(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("crate::") {
        let at = from + i;
        from = at + "crate::".len();
        let preceded = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if preceded {
            continue; // e.g. `$crate::`
        }
        let rest = &code[from..];
        if rest.trim_start().starts_with('{') {
            let off = rest.find('{').unwrap();
            let (heads, len) = group_heads(&rest[off..]);
            out.extend(
                heads
                    .into_iter()
                    .filter(|h| !h.is_empty() && h != "self")
                    .map(|h| (at, h)),
            );
            from += off + len;
        } else {
            out.push((at, ident_at(rest)));
        }
    }
    out
}

#[test]
fn lower_layers_never_name_higher_ones() {
    let src = src_dir();
    let exports = root_exports();
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut bad = Vec::new();
    let mut edges = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(own) = file_rank(rel) else { continue };
        let text = std::fs::read_to_string(f).unwrap();
        let code = code_only(&text);
        let line_of = |at: usize| code[..at].matches('\n').count() + 1;
        if let Some(at) = code.find("super::super::") {
            bad.push(format!(
                "src/{}:{}: a super::super:: path: name the module by crate::",
                rel.display(),
                line_of(at)
            ));
        }
        for (at, name) in named(&code) {
            let module = exports.get(&name).map(String::as_str).unwrap_or(&name);
            let Some(target) = rank(module) else {
                continue; // a macro or item defined in lib.rs itself
            };
            edges += 1;
            if target > own {
                let n = line_of(at);
                bad.push(format!(
                    "src/{}:{n}: layer {own} names crate::{name} (layer {target}): {}",
                    rel.display(),
                    text.lines().nth(n - 1).unwrap_or("").trim()
                ));
            }
        }
    }
    assert!(
        edges > 300,
        "only {edges} crate:: names found: is the scan broken?"
    );
    assert!(bad.is_empty(), "upward edges:\n{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_every_way_of_naming_a_module() {
    let code = code_only(
        "use crate::store::X;\nuse crate::{\n    launch::qemu,\n    Depot,\n};\n\
         // crate::lifecycle in a comment\nlet s = \"crate::cli\";\n/* crate::maint */ let c = '}';\n\
         fn f() -> crate::Result<()> { crate::error::x() }\n",
    );
    let names: Vec<String> = named(&code).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["store", "launch", "Depot", "Result", "error"]);
    let exports = root_exports();
    assert_eq!(exports["Depot"], "depot");
    assert_eq!(exports["Accel"], "launch");
    assert_eq!(exports["Result"], "error");
}
