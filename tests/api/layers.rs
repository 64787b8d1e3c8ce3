//! The module graph runs one way. Reads `src/`, turns every `crate::…` and `super::…`
//! path into an edge between file modules, and fails on a cycle, or on an edge from a
//! lower layer to a higher one (the layers are listed in `src/lib.rs`'s module map).
//!
//! A module may use its own ancestors (the namespace it lives in: `super::X` from a
//! child of `server/`): those edges are not dependencies between modules of the layer
//! graph and are left out of the cycle check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module and its layer, from `src/lib.rs`'s map (lines of the form
/// `` //! - `name` (N): … ``, several per line allowed): a module may use modules of its
/// own layer or lower ones, never higher.
fn layers() -> BTreeMap<String, u8> {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read lib.rs");
    let mut out = BTreeMap::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//!")) {
        let mut rest = line;
        while let Some(open) = rest.find('`') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('`') else { break };
            let name = &after[..close];
            let tail = &after[close + 1..];
            rest = tail;
            let Some(num) = tail.strip_prefix(" (") else {
                continue;
            };
            let Some((n, _)) = num.split_once("):") else {
                continue;
            };
            if let Ok(n) = n.parse::<u8>() {
                out.insert(name.to_owned(), n);
            }
        }
    }
    out
}

/// The file modules under `src/` (`a::b` for `src/a/b.rs` or `src/a/b/mod.rs`), with
/// their text; `lib.rs` and `main.rs` are not modules of the graph.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            out.insert(name, std::fs::read_to_string(&path).expect("read"));
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(segments: &[&str], known: &BTreeSet<String>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|m| known.contains(m))
}

/// Paths of the form `crate::a::b` and `super::c` in `text`, as segment lists
/// (`super` resolved against `module`).
fn paths(module: &str, is_dir_module: bool, text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // Comments name modules in prose; they are not dependencies.
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    for (anchor, up) in [("crate::", None), ("super::", Some(()))] {
        let mut from = 0;
        while let Some(at) = code[from..].find(anchor) {
            let start = from + at;
            from = start + anchor.len();
            if start > 0 && (word(bytes[start - 1]) || bytes[start - 1] == b':') {
                continue; // `zonecast::crate::`, `self::super::`: not a path start here
            }
            let rest = &code[from..];
            // Segments until something that is not `ident::`; a `{…}` group gives
            // each of its first-level names.
            let mut segs: Vec<String> = Vec::new();
            let mut s = rest;
            loop {
                let end = s
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(s.len());
                if end == 0 {
                    break;
                }
                segs.push(s[..end].to_owned());
                if s[end..].starts_with("::") {
                    s = &s[end + 2..];
                } else {
                    break;
                }
            }
            let base: Vec<String> = match up {
                None => segs,
                Some(()) => {
                    let mut parent: Vec<String> = module.split("::").map(str::to_owned).collect();
                    // `super` of `a/mod.rs` is the crate root; of `a/b.rs`, `a`.
                    parent.pop();
                    if is_dir_module && parent.is_empty() {
                        parent.clear();
                    }
                    parent.into_iter().chain(segs).collect()
                }
            };
            let brace = s.starts_with('{');
            if brace {
                let group = &s[1..s.find('}').unwrap_or(s.len())];
                for name in group.split(',') {
                    let first = name.trim().split("::").next().unwrap_or("").trim();
                    if !first.is_empty() && first != "self" {
                        let mut p = base.clone();
                        p.push(first.to_owned());
                        out.push(p);
                    }
                }
            }
            out.push(base);
        }
    }
    out
}

fn is_ancestor(a: &str, b: &str) -> bool {
    b.starts_with(&format!("{a}::"))
}

#[test]
fn modules_depend_one_way_and_form_no_cycle() {
    let mods = modules();
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let layers = layers();
    let rank: BTreeMap<&str, u8> = layers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mut problems = Vec::new();
    for m in &known {
        let top = m.split("::").next().unwrap_or(m);
        if !rank.contains_key(top) {
            problems.push(format!("module {top} has no layer in lib.rs's map"));
        }
    }
    for name in rank.keys() {
        if !known.contains(*name) {
            problems.push(format!("lib.rs's map lists {name}, which is not a module"));
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &mods {
        let dir_module = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(m.replace("::", "/"))
            .is_dir();
        for p in paths(m, dir_module, text) {
            let segs: Vec<&str> = p.iter().map(String::as_str).collect();
            let Some(target) = resolve(&segs, &known) else {
                continue;
            };
            if &target == m || is_ancestor(&target, m) {
                continue;
            }
            edges.entry(m.clone()).or_default().insert(target);
        }
    }
    for (from, tos) in &edges {
        let ftop = from.split("::").next().unwrap_or(from);
        for to in tos {
            let ttop = to.split("::").next().unwrap_or(to);
            if ftop != ttop && rank.get(ftop) < rank.get(ttop) {
                problems.push(format!(
                    "{from} (layer {:?}) uses {to} (layer {:?})",
                    rank.get(ftop),
                    rank.get(ttop)
                ));
            }
        }
    }
    // Cycles among file modules.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        found: &mut Vec<String>,
    ) {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for t in edges.get(n).into_iter().flatten() {
            match state.get(t.as_str()).copied() {
                Some(1) => {
                    let at = stack.iter().position(|s| s == t).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(t.clone());
                    found.push(cycle.join(" -> "));
                }
                Some(_) => {}
                None => visit(t, edges, state, stack, found),
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for m in &known {
        if !state.contains_key(m.as_str()) {
            visit(m, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    for c in cycles {
        problems.push(format!("cycle: {c}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The test sees the graph it claims to check.
    assert!(edges.get("app").is_some_and(|t| t.len() >= 5), "{edges:?}");
    assert!(
        edges
            .get("transport::ws")
            .is_some_and(|t| t.contains("cursor"))
    );
}
