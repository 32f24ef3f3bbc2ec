//! The shape of the product code, checked from its source: no file over 700 lines, the
//! layers of `common/src` used only downwards, and no import circles between modules
//! (a module and its children included; the crate root, which declares them all and holds
//! a binary's shared context, is left out). Paths are read as text: `crate::`, `super::`
//! and a child module's name start one, `use` statements over several lines and nested
//! braces included.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The product crates' sources, relative to the workspace.
const PRODUCT: &[&str] = &[
    "common/src",
    "agent-config/src",
    "agent-client/src",
    "agent-server/src",
];
/// Also checked for circles: the lab's library (its binaries are crates of their own).
const LAB: &str = "tests/src";
const MAX_LINES: usize = 700;
/// `common/src`'s top-level modules, lowest layer first: each may use only those before it.
const LAYERS: &[&str] = &[
    "files",
    "fault",
    "protocol",
    "kernel",
    "session",
    "engine",
    "migration",
    "housekeeping",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.ends_with("src/bin") {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Module path of a file below `src`: `migration/source` for `migration/source/mod.rs`,
/// `` for the crate root.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("/")
}

fn parent(module: &str) -> &str {
    module.rsplit_once('/').map_or("", |(p, _)| p)
}

fn join(base: &str, segment: &str) -> String {
    if base.is_empty() {
        segment.to_string()
    } else {
        format!("{base}/{segment}")
    }
}

/// The code of a file without comments and without its inline test module, a `use`
/// statement on one line however rustfmt wrapped it.
fn code(text: &str) -> Vec<String> {
    let body = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or(text);
    let mut out = Vec::new();
    let mut statement: Option<String> = None;
    for line in body.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let trimmed = line.trim();
        let starts_use = trimmed.starts_with("use ")
            || (trimmed.starts_with("pub") && trimmed.contains(" use "));
        match statement.as_mut() {
            Some(open) => open.push_str(trimmed),
            None if starts_use => statement = Some(trimmed.to_string()),
            None => {
                out.push(line.to_string());
                continue;
            }
        }
        if trimmed.ends_with(';') {
            out.extend(statement.take());
        }
    }
    out.extend(statement);
    out
}

/// `text` cut at its commas outside braces.
fn top_level_items(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

/// Lower-case path segments starting at `rest` (`a::b::{c, d::e}` gives `a/b/c`,
/// `a/b/d/e`), each a candidate module path.
fn paths(rest: &str) -> Vec<Vec<String>> {
    let mut segments = Vec::new();
    let mut rest = rest;
    loop {
        if let Some(inner) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = inner
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(inner.len(), |(i, _)| i);
            return top_level_items(&inner[..end])
                .into_iter()
                .filter(|item| !item.trim().is_empty())
                .flat_map(|item| paths(item.trim()))
                .map(|tail| segments.iter().cloned().chain(tail).collect())
                .collect();
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        segments.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    vec![segments]
}

/// The modules of `modules` that `line` of module `here` refers to.
fn references(line: &str, here: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let resolve = |base: &str, segments: &[String], found: &mut BTreeSet<String>| {
        let mut best = None;
        let mut path = base.to_string();
        for segment in segments {
            path = join(&path, segment);
            if modules.contains(&path) {
                best = Some(path.clone());
            }
        }
        match best {
            Some(module) => found.insert(module),
            None if !base.is_empty() || segments.is_empty() => found.insert(base.to_string()),
            None => false,
        };
    };
    let bytes = line.as_bytes();
    for (at, _) in line.match_indices("::") {
        // The path's first segment ends at `at`.
        let start = line[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        if start > 0 && bytes[start - 1] == b':' {
            continue; // not the first segment of its path
        }
        let first = &line[start..at];
        for segments in paths(&line[at + 2..]) {
            match first {
                "crate" => resolve("", &segments, &mut found),
                "super" => {
                    // `super::super::...`: one level up per `super`.
                    let ups = segments.iter().take_while(|s| *s == "super").count();
                    let base = (0..ups).fold(parent(here), |m, _| parent(m));
                    resolve(base, &segments[ups..], &mut found)
                }
                "self" => resolve(here, &segments, &mut found),
                name if modules.contains(&join(here, name)) => {
                    resolve(&join(here, name), &segments, &mut found)
                }
                _ => {}
            }
        }
    }
    found.remove(here);
    found
}

/// Module path -> the modules it refers to.
type Uses = BTreeMap<String, BTreeSet<String>>;

fn read_crate(src: &Path) -> Uses {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut uses = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let name = module.rsplit('/').next().unwrap_or_default();
        if name == "tests" || name == "crash" {
            continue; // test-only modules
        }
        let text = fs::read_to_string(file).unwrap();
        let refs = code(&text)
            .iter()
            .flat_map(|line| references(line, &module, &modules))
            .filter(|m| !m.is_empty() || module.is_empty())
            .collect();
        uses.insert(module, refs);
    }
    uses
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(uses: &Uses) -> Vec<Vec<String>> {
    struct State<'a> {
        uses: &'a Uses,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        let uses = s.uses;
        for w in uses.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                if uses.contains_key(w) {
                    visit(s, w);
                    let low = s.low[v].min(s.low[w]);
                    s.low.insert(v, low);
                }
            } else if s.stack.contains(&w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        uses,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in uses.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}

#[test]
fn no_product_file_is_over_700_lines() {
    let mut long = Vec::new();
    for dir in PRODUCT {
        let mut files = Vec::new();
        rust_files(&workspace().join(dir), &mut files);
        for file in files {
            let lines = fs::read_to_string(&file).unwrap().lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:#?}");
}

/// Each use of a module in a later layer than the user's (or in none).
fn upward_uses(uses: &Uses) -> Vec<String> {
    let layer = |module: &str| {
        let top = module.split('/').next().unwrap_or_default();
        LAYERS.iter().position(|l| *l == top)
    };
    let mut upwards = Vec::new();
    for (module, used) in uses {
        if module.is_empty() {
            continue; // lib.rs declares them all
        }
        let Some(own) = layer(module) else {
            upwards.push(format!("{module} is in no layer of {LAYERS:?}"));
            continue;
        };
        for used in used {
            if layer(used).is_none_or(|theirs| theirs > own) {
                upwards.push(format!("{module} uses {used}"));
            }
        }
    }
    upwards
}

#[test]
fn common_layers_are_used_only_downwards() {
    let upwards = upward_uses(&read_crate(&workspace().join("common/src")));
    assert!(
        upwards.is_empty(),
        "a layer uses a higher one: {upwards:#?}"
    );
}

#[test]
fn no_import_circles() {
    let mut found = Vec::new();
    for dir in PRODUCT.iter().chain([&LAB]) {
        found.extend(
            circles(&read_crate(&workspace().join(dir)))
                .into_iter()
                .map(|c| format!("{dir}: {c:?}")),
        );
    }
    assert!(found.is_empty(), "import circles: {found:#?}");
}

#[test]
fn the_checks_see_a_circle_and_an_upward_use() {
    let modules: BTreeSet<String> = ["kernel", "kernel/nft", "kernel/nft/rules", "migration"]
        .map(String::from)
        .into();
    let refs = references(
        "use crate::{kernel::nft::Firewall, migration};",
        "kernel/nft/rules",
        &modules,
    );
    assert_eq!(refs, ["kernel/nft", "migration"].map(String::from).into());
    assert_eq!(
        references(
            "use super::rules::RuleKind;",
            "kernel/nft/firewall",
            &modules
        ),
        ["kernel/nft/rules".to_string()].into()
    );
    let uses: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, u)| (m.to_string(), u.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(circles(&uses), vec![vec!["a", "b", "c"]]);

    // A wrapped `use` with nested braces, and `super::super`.
    let text =
        "use crate::{\n    kernel::{nft::Firewall, routing},\n    migration,\n};\nfn f() {}\n";
    let modules: BTreeSet<String> = ["kernel", "kernel/nft", "kernel/routing", "migration"]
        .map(String::from)
        .into();
    let refs: BTreeSet<String> = code(text)
        .iter()
        .flat_map(|line| references(line, "engine/podman", &modules))
        .collect();
    assert_eq!(
        refs,
        ["kernel/nft", "kernel/routing", "migration"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        references("use super::super::migration::x;", "a/b", &modules),
        ["migration".to_string()].into()
    );
    let upward: BTreeMap<String, BTreeSet<String>> = [
        ("kernel/nft".to_string(), ["migration".to_string()].into()),
        ("migration".to_string(), ["kernel/nft".to_string()].into()),
    ]
    .into();
    assert_eq!(upward_uses(&upward), vec!["kernel/nft uses migration"]);
}
