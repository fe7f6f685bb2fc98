//! The boundaries the code map in docs/ARCHITECTURE.md promises, checked on the
//! sources, so a change that crosses one fails here instead of in review.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn crate_dir() -> PathBuf {
    // Read at run time: cargo may reuse a test binary across checkouts.
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("source dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn rocksdb_is_named_only_by_its_engine() {
    let src = crate_dir().join("src");
    let mut offenders = Vec::new();
    for file in rust_files(&src) {
        if file.starts_with(src.join("store/rocks")) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        if text.contains("rocksdb::") || text.contains("use rocksdb") {
            offenders.push(file.display().to_string());
        }
    }
    assert!(
        offenders.is_empty(),
        "RocksDB outside store/rocks/: {offenders:?}"
    );
}

#[test]
fn the_client_never_depends_on_the_node() {
    let client = crate_dir().join("../pil-client");
    let manifest = std::fs::read_to_string(client.join("Cargo.toml")).expect("manifest");
    let manifest: toml::Table = manifest.parse().expect("TOML");
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) {
            assert!(
                !deps.contains_key("pil-node"),
                "pil-client [{section}] names pil-node"
            );
        }
    }
    for file in rust_files(&client.join("src")) {
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(
            !text.contains("pil_node"),
            "{} uses pil_node",
            file.display()
        );
    }
}

#[test]
fn only_the_binary_edge_uses_anyhow() {
    let src = crate_dir().join("src");
    for file in rust_files(&src) {
        let name = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if name == "cli.rs" || name.starts_with("bin/") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(
            !text.contains("anyhow"),
            "{name} uses anyhow; libraries use typed errors"
        );
    }
}

/// Blocking belongs to the engines: outside `store/`, the only work sent to the
/// blocking pool is a sync's validation and sealing, which is CPU, not storage.
#[test]
fn only_the_store_blocks() {
    let src = crate_dir().join("src");
    for file in rust_files(&src) {
        if file.starts_with(src.join("store")) || file == src.join("sync.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(
            !text.contains("spawn_blocking"),
            "{} blocks outside the store",
            file.display()
        );
    }
}

/// Which top-level modules each top-level module of a crate names (`crate::x`),
/// tests left out.
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let rel = file
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let test_module = file.file_name().is_some_and(|n| n == "tests.rs");
        if top == "lib" || top == "bin" || top == "main" || top == "tests" || test_module {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let uses = graph.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                uses.extend(group_heads(group));
            } else {
                uses.insert(leading_ident(rest));
            }
        }
        uses.remove(&top);
        uses.remove("");
    }
    graph
}

fn leading_ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first path segment of each item in `a::b, c, d::{e, f}}`, up to the group's end.
fn group_heads(group: &str) -> Vec<String> {
    let (mut depth, mut start, mut heads) = (0usize, true, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && !c.is_whitespace() => {
                heads.push(leading_ident(&group[i..]));
                start = false;
            }
            _ => {}
        }
    }
    heads
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if graph.contains_key(next)
                && let Some(cycle) = visit(next, graph, done, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

/// Modules depend on each other in one direction: the code map's layers hold only
/// while no module reaches back up.
#[test]
fn no_module_cycles_in_the_node_or_the_client() {
    for krate in [
        crate_dir().join("src"),
        crate_dir().join("../pil-client/src"),
    ] {
        let graph = module_imports(&krate);
        assert!(graph.len() > 5, "read the modules of {}", krate.display());
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "modules of {} import each other in a circle: {}",
                krate.display(),
                cycle.join(" -> ")
            );
        }
    }
}

/// The check above finds cycles it should: a made-up graph with one.
#[test]
fn the_cycle_check_sees_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(
        group_heads(" audit::{AuditLog, x}, config::NodeConfig,\n store::Op };"),
        ["audit", "config", "store"]
    );
}

/// The domain core decides without the wire: gRPC and protobuf types stay in
/// `service/` (and the store's own encodings).
#[test]
fn the_domain_core_names_no_wire_types() {
    let src = crate_dir().join("src");
    for name in ["lookup.rs", "registry.rs", "audit/query.rs"] {
        let text = std::fs::read_to_string(src.join(name)).expect("readable");
        for wire in ["tonic", "prost", "v1::", "pil_proto::v1"] {
            assert!(!text.contains(wire), "{name} names {wire}");
        }
    }
}
