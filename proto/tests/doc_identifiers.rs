//! Every patient identifier the README and the guides show is one the API accepts, so
//! a reader who copies an example gets an answer instead of INVALID_ARGUMENT.

use std::path::{Path, PathBuf};

use pil_proto::ident::{PatientId, SYSTEM_DNR, SYSTEM_FHN, SYSTEM_FNR};

fn workspace() -> PathBuf {
    // Read at run time: cargo may reuse a test binary across checkouts.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo");
    Path::new(&manifest)
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Files a reader copies examples from.
fn documents() -> Vec<PathBuf> {
    let root = workspace();
    let mut out = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("docs/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "md" || e == "py" || e == "sh")
            {
                out.push(path);
            }
        }
    }
    out
}

/// Runs of exactly 11 digits, not part of a longer number.
fn eleven_digit_numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            if run.len() == 11 {
                out.push(run.clone());
            }
            run.clear();
        }
    }
    out
}

fn accepted(value: &str) -> bool {
    [SYSTEM_FNR, SYSTEM_DNR, SYSTEM_FHN]
        .iter()
        .any(|system| PatientId::parse(system, value, true).is_ok())
}

#[test]
fn every_identifier_in_the_readme_and_docs_is_valid() {
    let mut bad = Vec::new();
    let mut seen = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        for number in eleven_digit_numbers(&text) {
            seen += 1;
            if !accepted(&number) {
                bad.push(format!("{}: {number}", doc.display()));
            }
        }
    }
    assert!(seen > 0, "the docs show no identifier at all");
    assert!(
        bad.is_empty(),
        "identifiers the API refuses:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_scan_finds_numbers_and_only_whole_ones() {
    assert_eq!(
        eleven_digit_numbers("--patient 41810912345, 123456789012 and 1234567890"),
        ["41810912345"]
    );
    assert!(!accepted("41810912345"));
}
