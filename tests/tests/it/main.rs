//! The integration tests that run real nodes, one module per theme, in one test
//! executable: one link of the node and RocksDB instead of one per theme.

mod access;
mod audit;
mod cli;
mod console;
mod dashboard;
mod durability;
mod events;
mod events_across_regions;
mod faults;
mod federation;
mod fuzz;
mod high_availability;
mod metrics;
mod operations;
mod privacy;
mod registry;
mod rekeying;
mod rotation;
mod routing;
mod sync;
mod trust;
mod validation;
mod witness;

/// `pil --profile <profile> <args>`: the real command line, as a user runs it.
fn pil(profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pil-test-cli"))
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .expect("run pil")
}
