//! `pil-bench`: load generator and benchmark suite for PIL nodes. See
//! docs/benchmarks.md for what it measures; tests/bench/run.sh runs it with the
//! PostgreSQL baseline.

#[path = "../bench/mod.rs"]
mod bench;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use bench::{pg::Pg, report::Results, suite::Plan};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pil-bench",
    about = "Benchmarks PIL nodes against a trivial gRPC service and PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once; the size of the run arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the suite and write the results.
    Run(RunArgs),
    /// Re-render the Markdown of saved results.
    Report {
        /// Results saved by `run --json`.
        #[arg(long)]
        json: PathBuf,
        /// The document whose results section is replaced.
        #[arg(long)]
        docs: PathBuf,
    },
    /// Serve the trivial gRPC service (the floor); used by `run`.
    #[command(hide = true)]
    FloorServe {
        #[arg(long)]
        client_ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Every benchmark briefly on a small data set (for CI: proves the harness works,
    /// measures nothing).
    #[arg(long)]
    quick: bool,
    /// Seed of the data set.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Patients in the data set [default: 200000; quick: 2000].
    #[arg(long)]
    patients: Option<u64>,
    /// Pointers per patient on average.
    #[arg(long, default_value_t = 5)]
    per_patient: u32,
    /// Holder organizations (a power of two, at least twice --per-patient).
    #[arg(long, default_value_t = 16)]
    orgs: usize,
    /// Concurrencies of the lookup runs.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Warm-up before each lookup run, in seconds [default: 5; quick: 0.5].
    #[arg(long)]
    warmup: Option<f64>,
    /// Longest measured time of each lookup run, in seconds [default: 20; quick: 1].
    #[arg(long)]
    duration: Option<f64>,
    /// Most measured requests of each lookup run [default: 1000000; quick: 20000].
    #[arg(long)]
    max_requests: Option<u64>,
    /// Organizations synced at once (one stream each).
    #[arg(long, default_value_t = 4)]
    sync_streams: usize,
    /// Pointers per sync message.
    #[arg(long, default_value_t = 2000)]
    sync_batch: usize,
    /// Pointers of the growth run (0: skip) [default: 20000000; quick: 5 × the data set].
    #[arg(long)]
    growth_pointers: Option<u64>,
    /// Concurrency of the growth comparison.
    #[arg(long, default_value_t = 16)]
    growth_concurrency: usize,
    /// Scenarios: floor, local, postgres, pg-engine, sync, footprint, events, federated,
    /// routing, growth, or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    /// PostgreSQL's socket directory (the postgres scenario runs only with it).
    #[arg(long)]
    pg_host: Option<PathBuf>,
    #[arg(long, default_value_t = 5432)]
    pg_port: u16,
    #[arg(long, default_value = "postgres")]
    pg_user: String,
    #[arg(long, default_value = "pil_bench")]
    pg_db: String,
    /// Directory of psql and pgbench (default: from PATH).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// The nodes' log filter (their log goes to a file, as in production).
    #[arg(long, default_value = "info")]
    node_log: String,
    /// Where to save the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the results as Markdown (a document with results markers gets
    /// its results section replaced).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The command that reproduces this run, for the report.
    #[arg(long)]
    command: Option<String>,
    /// Another build's `pil-test-node`, measured beside this build's (local lookups
    /// and the loading sync), e.g. the last release's.
    #[arg(long)]
    baseline_node: Option<PathBuf>,
    /// What to call that build in the report.
    #[arg(long, default_value = "baseline")]
    baseline_label: String,
}

impl RunArgs {
    fn plan(&self) -> Plan {
        let q = self.quick;
        let patients = self.patients.unwrap_or(if q { 2_000 } else { 200_000 });
        let secs = |v: Option<f64>, full: f64, quick: f64| {
            Duration::from_secs_f64(v.unwrap_or(if q { quick } else { full }))
        };
        Plan {
            quick: q,
            seed: self.seed,
            patients,
            per_patient: self.per_patient,
            orgs: self.orgs,
            concurrency: self.concurrency.clone(),
            warmup: secs(self.warmup, 5.0, 0.5),
            duration: secs(self.duration, 20.0, 1.0),
            max_requests: self
                .max_requests
                .unwrap_or(if q { 20_000 } else { 1_000_000 }),
            sync_streams: self.sync_streams,
            sync_batch: self.sync_batch,
            growth_pointers: self.growth_pointers.unwrap_or(if q {
                5 * patients * u64::from(self.per_patient)
            } else {
                20_000_000
            }),
            growth_concurrency: self.growth_concurrency,
            scenarios: self.scenarios.clone(),
            pg: self.pg_host.as_ref().map(|host| Pg {
                host: host.clone(),
                port: self.pg_port,
                user: self.pg_user.clone(),
                db: self.pg_db.clone(),
                bin_dir: self.pg_bin.clone(),
            }),
            node_log_filter: self.node_log.clone(),
            command: self
                .command
                .clone()
                .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
            baseline: self
                .baseline_node
                .clone()
                .map(|bin| (bin, self.baseline_label.clone())),
        }
    }
}

fn write_markdown(path: &PathBuf, results: &Results) -> anyhow::Result<()> {
    let section = results.markdown();
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, bench::report::splice(&doc, &section))
        .with_context(|| format!("writing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::FloorServe {
            client_ca,
            cert,
            key,
        } => runtime.block_on(bench::floor::serve(pil_node::config::TlsConfig {
            client_ca,
            cert,
            key,
        })),
        Command::Report { json, docs } => {
            let results: Results = serde_json::from_slice(&std::fs::read(&json)?)?;
            write_markdown(&docs, &results)
        }
        Command::Run(args) => {
            let plan = args.plan();
            // After every scenario, so a long run that fails late keeps what it measured.
            let save = |r: &Results| {
                if let Some(p) = &args.json
                    && let Err(e) = std::fs::write(p, serde_json::to_vec_pretty(r).unwrap())
                {
                    eprintln!("[pil-bench] cannot save {}: {e}", p.display());
                }
                if let Some(p) = &args.markdown
                    && let Err(e) = write_markdown(p, r)
                {
                    eprintln!("[pil-bench] {e}");
                }
            };
            let results = runtime.block_on(bench::suite::run(&plan, &save))?;
            save(&results);
            match &args.markdown {
                Some(p) => write_markdown(p, &results)?,
                None => println!("{}", results.markdown()),
            }
            let failed: u64 = [&results.floor, &results.local, &results.federated]
                .iter()
                .flat_map(|rs| rs.iter())
                .map(|r| r.errors)
                .sum();
            if failed > 0 {
                anyhow::bail!("{failed} requests failed during measurement");
            }
            Ok(())
        }
    }
}
