//! The boundaries the code map in docs/ARCHITECTURE.md promises, checked on the
//! sources, so a change that crosses one fails here instead of in review.

use std::path::{Path, PathBuf};

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
