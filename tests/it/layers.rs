//! The module direction of src/ (docs/ARCHITECTURE.md): every file belongs
//! to a layer, and its code names only modules of its own layer or of
//! layers below. Fails with the file, line and edge that points upwards.

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
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The layer of a source file under src/ (None: the binary or lib.rs).
fn file_rank(rel: &Path) -> Option<usize> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let module = first.strip_suffix(".rs").unwrap_or(first);
    if matches!(module, "lib" | "main" | "cli") {
        return None;
    }
    Some(rank(module).unwrap_or_else(|| {
        panic!("src/{}: a module in no layer: add it to LAYERS in tests/it/layers.rs and to docs/ARCHITECTURE.md", rel.display())
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

/// The line without its `//` comment (string contents are kept: a path in
/// a string is not a dependency, but none of ours looks like `crate::x`).
fn code_of(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with("//") {
        return "";
    }
    match line.find("//") {
        Some(i) if !line[..i].contains('"') => &line[..i],
        _ => line,
    }
}

#[test]
fn lower_layers_never_name_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
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
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let Some(target) = rank(&name) else {
                    // crate::Error and other re-exports at the root.
                    continue;
                };
                edges += 1;
                if target > own {
                    bad.push(format!(
                        "src/{}:{}: layer {} names crate::{name} (layer {target}): {}",
                        rel.display(),
                        n + 1,
                        own,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        edges > 100,
        "only {edges} crate:: paths found: is the scan broken?"
    );
    assert!(bad.is_empty(), "upward edges:\n{}", bad.join("\n"));
}

#[test]
fn root_re_exports_do_not_hide_upward_edges() {
    // `use crate::{Depot, ...}` would bypass the check above: the lower
    // layers must name the module a type lives in.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let roots = [
        "Depot",
        "Instance",
        "LaunchOptions",
        "ImageInfo",
        "Launched",
    ];
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(own) = file_rank(rel) else { continue };
        if own >= rank("depot").unwrap() {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            for r in roots {
                if code.contains(&format!("crate::{r}")) {
                    bad.push(format!("src/{}:{}: {}", rel.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "lower layers naming the public face:\n{}",
        bad.join("\n")
    );
}
