//! Each crate's modules form layers: no top-level module of a crate's `src` may reach, through `crate::`
//! paths, a module that reaches back to it. A cycle makes every module in it depend on all the others, so
//! none can be read, tested or moved alone; this test names the cycle as soon as one comes back.
//!
//! The scan is textual on purpose (no parser dependency): comments, string and char literals are blanked
//! out, then every `crate::<module>` (including `crate::{a, b::c}` groups) counts as an edge from the
//! module whose file it is in. `lib.rs` is the composition root, which wires every module together, so
//! it is not a node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Checks one crate; `known` is an edge the scan must find, so a broken scanner cannot pass.
fn assert_acyclic(krate: &str, known: (&str, &str)) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(krate).join("src");
    let graph = module_graph(&src);
    assert!(
        graph.get(known.0).is_some_and(|deps| deps.contains(known.1)),
        "the scan found no `crate::{}` in {krate}/src/{}.rs; is the scanner broken?\n{}",
        known.1,
        known.0,
        render(&graph)
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between {krate} modules: {}\n\nthe module graph:\n{}",
            cycle.join(" -> "),
            render(&graph)
        );
    }
    // Shown with `--nocapture`: the layering as it stands.
    println!("{krate}:\n{}", render(&graph));
}

#[test]
fn broker_modules_have_no_import_cycles() {
    assert_acyclic("broker", ("hub", "balance"));
}

#[test]
fn healer_modules_have_no_import_cycles() {
    assert_acyclic("healer", ("instance", "lifecycle"));
}

#[test]
fn collector_modules_have_no_import_cycles() {
    assert_acyclic("collector", ("collector", "discovery"));
}

#[test]
fn core_modules_have_no_import_cycles() {
    assert_acyclic("core", ("config", "yaml"));
}

#[test]
fn cgroup_modules_have_no_import_cycles() {
    assert_acyclic("cgroup", ("driver", "fs"));
}

#[test]
fn the_scan_ignores_comments_and_strings_and_reads_groups() {
    let text = r####"
        //! Doc text naming crate::doc_only.
        use crate::{alpha::A, beta, gamma::{self, G}};
        /* a block comment with crate::block_only /* nested crate::nested_only */ still comment */
        fn f<'a>(x: &'a str) -> char {
            let _ = "a string with crate::string_only and \" crate::escaped_only";
            let _ = r#"raw crate::raw_only"#;
            let _ = crate::delta::call(x); // trailing crate::trailing_only
            let _: $crate::macro_only;
            pub(crate) fn g() {}
            'c'
        }
    "####;
    let mut found: Vec<String> = crate_references(&strip_comments_and_literals(text)).into_iter().collect();
    found.sort();
    assert_eq!(found, ["alpha", "beta", "delta", "gamma"]);
}

#[test]
fn a_cycle_is_found_and_named() {
    let edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")];
    let mut graph = Graph::new();
    for (from, to) in edges {
        graph.entry(from.to_string()).or_default().insert(to.to_string());
    }
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    graph.entry("c".into()).or_default().remove("a");
    assert_eq!(find_cycle(&graph), None);
}

/// Edges between top-level modules: `src/x.rs`, `src/x/mod.rs` and `src/x/**` all belong to `x`.
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    for file in rust_files(src) {
        let Some(module) = top_level_module(src, &file) else { continue };
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let deps = graph.entry(module.clone()).or_default();
        for dep in crate_references(&strip_comments_and_literals(&text)) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn top_level_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(name) => Some(name.to_string()),
        None => Some(first.to_string()),
    }
}

/// The text with comments, string literals and char literals replaced by spaces (newlines kept).
fn strip_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('"' | '#')) && starts_raw_string(&chars, i) {
            // A raw string: r"…", r#"…"#, br"…"; a bare `r#ident` is an identifier and is kept.
            let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let closing: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            i += 2 + hashes;
            while i < chars.len() && !chars[i..].starts_with(&closing) {
                blank(&mut out, chars[i]);
                i += 1;
            }
            i += closing.len();
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&c) = chars.get(i) {
                    blank(&mut out, c);
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a), which stays.
            let close = if next == Some('\\') {
                // The escaped character itself may be a quote ('\''): the closing quote comes after it.
                chars.get(i + 3..).and_then(|tail| tail.iter().position(|&c| c == '\'')).map(|p| i + 3 + p)
            } else {
                (chars.get(i + 2) == Some(&'\'')).then_some(i + 2)
            };
            match close {
                Some(end) => i = end + 1,
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether the `r` at `i` opens a raw string: it starts a token, or follows the `b` of a byte string.
fn starts_raw_string(chars: &[char], i: usize) -> bool {
    let is_ident =
        |at: Option<usize>| at.and_then(|at| chars.get(at)).is_some_and(|c| c.is_alphanumeric() || *c == '_');
    let before = i.checked_sub(1);
    !is_ident(before) || (before.is_some_and(|b| chars[b] == 'b') && !is_ident(i.checked_sub(2)))
}

/// The first segment after every `crate::` that is a path of this crate (not `$crate::`, not part of a
/// longer identifier), with the first-level members of a `crate::{…}` group.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let after = after.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            found.extend(first_ident(&item));
        } else {
            found.extend(first_ident(after));
        }
    }
    found.remove("self");
    found
}

fn first_ident(text: &str) -> Option<String> {
    let ident: String = text.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!ident.is_empty()).then_some(ident)
}

/// A cycle as the path `a -> b -> … -> a`, if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'g>(
        node: &'g str,
        graph: &'g Graph,
        path: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|&n| n == node) {
            let mut cycle: Vec<String> = path[start..].iter().map(|n| n.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(module, deps)| {
            format!("  {module} -> {}", deps.iter().map(String::as_str).collect::<Vec<_>>().join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
