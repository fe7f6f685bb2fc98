//! The benchmark suite: which scenarios run, in which order, on which data.
//!
//! Lookup runs are interleaved per concurrency (floor, PIL, PostgreSQL, then the next
//! concurrency) so that the ratios compare runs made minutes apart, not an hour apart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use pil_tests::World;

use super::{
    data::DataSet,
    floor::{FloorProc, tls_of},
    load::{self, LoadResult, LoadSpec},
    node::{self, NodeProc, SyncKind, SyncResult, lookup_clients, node_config, sibling},
    pg::Pg,
    proc::{self, ByName, Cpu, Pids, This},
    report::{DataInfo, Family, Footprint, GrowthPoint, Machine, Results, SyncProbe},
};

/// Regions of the federated scenario; the first is the one clients ask.
pub const REGIONS: [&str; 3] = ["helse-vest", "helse-midt", "helse-nord"];

/// What to run, and how big.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub seed: u64,
    pub patients: u64,
    pub per_patient: u32,
    pub orgs: usize,
    pub concurrency: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_requests: u64,
    pub sync_streams: usize,
    pub sync_batch: usize,
    pub growth_pointers: u64,
    pub growth_concurrency: usize,
    pub scenarios: Vec<String>,
    pub pg: Option<Pg>,
    pub node_log_filter: String,
    pub command: String,
    /// Another build's node, measured beside this one: `(binary, label)`.
    pub baseline: Option<(PathBuf, String)>,
}

impl Plan {
    fn wants(&self, s: &str) -> bool {
        self.scenarios.iter().any(|x| x == s || x == "all")
    }

    fn spec(&self, concurrency: usize) -> LoadSpec {
        LoadSpec {
            concurrency,
            warmup: self.warmup,
            duration: self.duration,
            max_requests: self.max_requests,
            seed: self.seed ^ concurrency as u64,
        }
    }

    fn idle_limit(&self) -> Duration {
        Duration::from_secs(if self.quick { 10 } else { 600 })
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[pil-bench] {}", msg.as_ref());
}

fn describe(what: &str, r: &LoadResult) {
    say(format!(
        "{what} c={}: {:.0}/s p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, {} errors{}",
        r.concurrency,
        r.throughput,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.errors,
        r.first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    ));
}

/// Runs the lookup load against `addr` with `regions` regions expected in each answer.
async fn lookups(
    world: &World,
    addr: std::net::SocketAddr,
    data: &Arc<DataSet>,
    spec: &LoadSpec,
    regions: usize,
    server: &Pids,
    database: Option<&dyn Cpu>,
) -> anyhow::Result<LoadResult> {
    let clients = lookup_clients(world, addr, spec.concurrency).await?;
    let data = data.clone();
    Ok(load::run(
        spec,
        &clients,
        move |c, r| node::lookup_once(c, data.clone(), r, regions),
        server,
        database,
        &This,
    )
    .await)
}

/// Sizes of the column families of a stopped node's data directory.
fn families(dir: &Path) -> Vec<Family> {
    let opts = rocksdb::Options::default();
    let Ok(names) = rocksdb::DB::list_cf(&opts, dir) else {
        return Vec::new();
    };
    let Ok(db) = rocksdb::DB::open_cf_for_read_only(&opts, dir, &names, false) else {
        return Vec::new();
    };
    names
        .iter()
        .filter_map(|name| {
            let cf = db.cf_handle(name)?;
            let int = |p: &str| db.property_int_value_cf(&cf, p).ok().flatten().unwrap_or(0);
            Some(Family {
                name: name.clone(),
                sst_bytes: int("rocksdb.total-sst-files-size"),
                keys: int("rocksdb.estimate-num-keys"),
            })
        })
        .collect()
}

/// A loaded node: stopped (flushing its memtables), measured on disk, restarted (timing
/// the start), and left to finish its compactions.
fn restart_measured(
    bin: &Path,
    running: NodeProc,
    config: &pil_node::config::NodeConfig,
    dir: &Path,
    name: &str,
    pointers: u64,
    idle_limit: Duration,
) -> anyhow::Result<(NodeProc, Footprint)> {
    let waited = proc::wait_idle(running.pid(), 0.05, idle_limit);
    let data_dir = running.data_dir.clone();
    running.stop()?;
    let disk = proc::disk_use(&data_dir);
    let families = families(&data_dir);
    let node = NodeProc::start(bin, config, dir, name)?;
    proc::wait_idle(node.pid(), 0.05, idle_limit);
    let (rss, _) = proc::memory(node.pid()).unwrap_or_default();
    let footprint = Footprint {
        pointers,
        disk,
        families,
        rss_idle: rss,
        startup_ms: node.startup.as_secs_f64() * 1000.0,
        compaction_wait_s: waited.as_secs_f64(),
        ..Default::default()
    };
    Ok((node, footprint))
}

/// Loads every organization of `data` into the node at `addr`.
async fn load_all(
    world: &World,
    node: &NodeProc,
    data: &Arc<DataSet>,
    plan: &Plan,
    name: &str,
) -> anyhow::Result<SyncResult> {
    let orgs: Vec<usize> = (0..data.orgs.len()).collect();
    let mut r = node::sync_orgs(
        world,
        node.addr,
        data.clone(),
        &orgs,
        0,
        SyncKind::Merge,
        plan.sync_streams,
        plan.sync_batch,
        &Pids(vec![node.pid()]),
    )
    .await?;
    r.name = name.into();
    say(format!(
        "{name}: {} pointers in {:.1} s = {:.0}/s",
        r.sent, r.seconds, r.per_second
    ));
    Ok(r)
}

pub fn machine(command: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let date = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute] UTC"
        ))
        .unwrap_or_default();
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: memory_kib / (1024.0 * 1024.0),
        kernel,
        date,
        build: if cfg!(debug_assertions) {
            "debug (dependencies at opt-level 1)".into()
        } else {
            "release".into()
        },
        command: command.to_string(),
    }
}

/// Runs the plan; `save` is called with the results after every scenario, so a long
/// run that fails late keeps what it measured.
pub async fn run(plan: &Plan, save: &dyn Fn(&Results)) -> anyhow::Result<Results> {
    let bin = sibling("pil-test-node")?;
    let world = World::new();
    let data = Arc::new(DataSet::new(
        plan.seed,
        plan.patients,
        plan.per_patient,
        plan.orgs,
    ));
    let total = data.total_pointers();
    let mut results = Results {
        machine: machine(&plan.command),
        quick: plan.quick,
        data: DataInfo {
            seed: plan.seed,
            patients: plan.patients,
            pointers: total,
            organizations: plan.orgs,
        },
        warmup_s: plan.warmup.as_secs_f64(),
        duration_s: plan.duration.as_secs_f64(),
        max_requests: plan.max_requests,
        node_log_filter: plan.node_log_filter.clone(),
        ..Default::default()
    };
    say(format!(
        "data set: {total} pointers, {} patients; work dir {}",
        plan.patients,
        world.path().display()
    ));
    let samples = if plan.quick { 20 } else { 500 };
    let (latencies, cpu_us) = proc::sync_latencies(world.path(), samples)?;
    let (mean_ms, p50_ms, p99_ms, _, max_ms) = load::summarize(latencies);
    results.disk_sync = Some(SyncProbe {
        samples,
        mean_ms,
        p50_ms,
        p99_ms,
        max_ms,
        cpu_us,
    });
    say(format!(
        "disk: durable 4 KiB append p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms, CPU {:.0} µs",
        cpu_us.unwrap_or(f64::NAN)
    ));
    let token_check = node::token_check_cost(&world, if plan.quick { 200 } else { 5000 })?;
    say(format!(
        "token and DPoP proof check: {:.0} µs at the median",
        token_check.p50_us
    ));
    results.token_check = Some(token_check);
    let sync_cost = super::sync_cost::sync_cost(&data, world.path(), plan.sync_batch).await?;
    say(format!(
        "synced pointer, stage by stage: encode {:.1} µs, decode {:.1} µs, prepare {:.1} µs, \
         store {:.1} µs (insert) / {:.1} µs (update)",
        sync_cost.encode_us,
        sync_cost.decode_us,
        sync_cost.prepare_us,
        sync_cost.insert_us,
        sync_cost.update_us
    ));
    results.sync_cost = Some(sync_cost);

    // PostgreSQL first: loaded once, idle while the others run.
    let pg_work = world.path().join("pg");
    std::fs::create_dir_all(&pg_work)?;
    let pg = match (&plan.pg, plan.wants("postgres")) {
        (Some(pg), true) => {
            say("loading PostgreSQL");
            let l = pg.load(&data).context("loading PostgreSQL")?;
            say(format!("PostgreSQL: {} rows in {:.1} s", l.rows, l.seconds));
            results.postgres_load = Some(l);
            Some(pg)
        }
        (None, true) if plan.scenarios.iter().any(|s| s == "postgres") => {
            anyhow::bail!("the postgres scenario needs --pg-host (tests/bench/run.sh sets it)")
        }
        _ => None,
    };

    // The main node: load (the insert-mode sync benchmark), footprint, restart.
    let main_dir = world.path().join("main");
    let config = node_config(
        &world,
        None,
        main_dir.join("data"),
        &plan.node_log_filter,
        &data,
        "127.0.0.1:0".parse()?,
    );
    let needs_main = ["local", "sync", "footprint", "growth"]
        .iter()
        .any(|s| plan.wants(s));
    let mut main = None;
    if needs_main {
        let node = NodeProc::start(&bin, &config, &main_dir, "node")?;
        let load = load_all(&world, &node, &data, plan, "merge, empty node (inserts)").await?;
        results.sync.push(load);
        let (node, mut footprint) = restart_measured(
            &bin,
            node,
            &config,
            &main_dir,
            "node",
            total,
            plan.idle_limit(),
        )?;
        say(format!(
            "footprint: {} table bytes ({:.0}/pointer), start-up {:.0} ms",
            footprint.disk.sst,
            footprint.disk.sst as f64 / total.max(1) as f64,
            footprint.startup_ms
        ));
        node.truncate_log();
        footprint.rss_loaded = footprint.rss_idle;
        results.footprint = Some(footprint);
        save(&results);
        main = Some(node);
    }

    // Another build's node, loaded the same way and asked the same lookups right after
    // this one's: a before/after comparison measured side by side.
    let baseline_dir = world.path().join("baseline");
    let mut baseline = None;
    if let (Some((baseline_bin, label)), true) = (&plan.baseline, needs_main) {
        let config = node_config(
            &world,
            None,
            baseline_dir.join("data"),
            &plan.node_log_filter,
            &data,
            "127.0.0.1:0".parse()?,
        );
        let node = NodeProc::start(baseline_bin, &config, &baseline_dir, "baseline")?;
        let mut load = load_all(&world, &node, &data, plan, "merge, empty node (inserts)").await?;
        load.name = format!("{label}: {}", load.name);
        results.baseline_label = Some(label.clone());
        results.baseline_sync.push(load);
        node.truncate_log();
        baseline = Some(node);
    }

    // The same node on the PostgreSQL engine, in a database of the baseline's server:
    // loaded the same way, and asked the same lookups right after the RocksDB node.
    let engine_dir = world.path().join("pg-engine");
    let mut engine = None;
    if let (Some(pg), true) = (&plan.pg, plan.wants("pg-engine")) {
        let node = start_on_postgres(plan, pg, &world, &data, &bin, &engine_dir).await?;
        let database = ByName("postgres");
        let before = database.cpu_seconds();
        let mut load = load_all(&world, &node, &data, plan, "merge, empty node (inserts)").await?;
        load.database_cpu_us = per_pointer(before, database.cpu_seconds(), load.sent);
        results.pg_engine_sync.push(load);
        node.truncate_log();
        engine = Some(node);
    } else if plan.scenarios.iter().any(|s| s == "pg-engine") {
        anyhow::bail!("the pg-engine scenario needs --pg-host (tests/bench/run.sh sets it)");
    }

    // Lookups: floor, local and PostgreSQL per concurrency.
    let floor = if plan.wants("floor") {
        Some(FloorProc::start(&tls_of(world.path()))?)
    } else {
        None
    };
    for &c in &plan.concurrency {
        let spec = plan.spec(c);
        if let Some(f) = &floor {
            let r = lookups(&world, f.addr, &data, &spec, 1, &Pids(vec![f.pid()]), None).await?;
            describe("floor", &r);
            results.floor.push(r);
        }
        if let (Some(node), true) = (&main, plan.wants("local")) {
            let r = lookups(
                &world,
                node.addr,
                &data,
                &spec,
                1,
                &Pids(vec![node.pid()]),
                None,
            )
            .await?;
            describe("local", &r);
            results.local.push(r);
            node.truncate_log();
        }
        if let Some(node) = &engine {
            let pids = Pids(vec![node.pid()]);
            let database = ByName("postgres");
            let r = lookups(&world, node.addr, &data, &spec, 1, &pids, Some(&database)).await?;
            describe("postgres engine", &r);
            results.pg_engine.push(r);
            node.truncate_log();
        }
        if let Some(node) = &baseline {
            let r = lookups(
                &world,
                node.addr,
                &data,
                &spec,
                1,
                &Pids(vec![node.pid()]),
                None,
            )
            .await?;
            describe("baseline", &r);
            results.baseline_local.push(r);
            node.truncate_log();
        }
        if let Some(pg) = pg {
            let r = tokio::task::block_in_place(|| {
                pg.bench(&data, c, plan.warmup, plan.duration, &pg_work)
            })?;
            describe("postgres", &r);
            results.postgres.push(r);
        }
        save(&results);
    }
    drop(floor);
    if let Some(node) = engine.take() {
        node.stop()?;
    }
    let _ = std::fs::remove_dir_all(&engine_dir);
    if let Some(node) = baseline.take() {
        node.stop()?;
    }
    let _ = std::fs::remove_dir_all(&baseline_dir);

    if let Some(node) = main.take() {
        if let (Some(f), Some((rss, hwm))) = (results.footprint.as_mut(), proc::memory(node.pid()))
        {
            f.rss_loaded = rss;
            f.rss_peak = hwm;
        }
        if plan.wants("sync") {
            let pids = Pids(vec![node.pid()]);
            let orgs: Vec<usize> = (0..data.orgs.len()).collect();
            for (generation, kind, name) in [
                (1, SyncKind::Merge, "merge, every pointer changed (updates)"),
                (
                    2,
                    SyncKind::Replace,
                    "replace (organization), every pointer changed, 1 % left out",
                ),
            ] {
                let mut r = node::sync_orgs(
                    &world,
                    node.addr,
                    data.clone(),
                    &orgs,
                    generation,
                    kind,
                    plan.sync_streams,
                    plan.sync_batch,
                    &pids,
                )
                .await?;
                r.name = name.into();
                say(format!("{name}: {:.0}/s", r.per_second));
                results.sync.push(r);
            }
            save(&results);
        }
        node.stop()?;
    }
    let _ = std::fs::remove_dir_all(&main_dir);

    if plan.wants("events") {
        let r = super::events::run(
            &world,
            &bin,
            &data,
            &world.path().join("events"),
            &plan.node_log_filter,
            plan.sync_streams,
            plan.sync_batch,
            if plan.quick { 20 } else { 500 },
        )
        .await?;
        say(format!(
            "events: sync {:.0}/s unfollowed, {:.0}/s a tenth followed; {} events pulled at \
             {:.0}/s; write → event p50 {:.2} ms p99 {:.2} ms; three regions: home write \
             p50 {:.2} p99 {:.2} ms, other region's write p50 {:.2} p99 {:.2} ms",
            r.sync_unfollowed_per_s,
            r.sync_followed_per_s,
            r.events_made,
            r.pull_events_per_s,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.regions_home_p50_ms,
            r.regions_home_p99_ms,
            r.regions_peer_p50_ms,
            r.regions_peer_p99_ms
        ));
        results.events = Some(r);
        save(&results);
    }

    if plan.wants("federated") {
        federated(plan, &world, &data, &bin, &mut results).await?;
        save(&results);
    }

    if plan.wants("routing") {
        let specs: Vec<LoadSpec> = plan.concurrency.iter().map(|&c| plan.spec(c)).collect();
        let dir = world.path().join("routing");
        let r = super::routing::run(
            &world,
            &bin,
            &data,
            &dir,
            &plan.node_log_filter,
            &specs,
            plan.sync_streams,
            plan.sync_batch,
            plan.idle_limit(),
            if plan.quick { 5 } else { 100 },
        )
        .await?;
        let _ = std::fs::remove_dir_all(&dir);
        results.routing = Some(r);
        save(&results);
    }

    if plan.wants("growth") && plan.growth_pointers > total {
        // The first point is the main data set, measured the same way.
        if let (Some(f), Some(l)) = (
            results.footprint.clone(),
            results
                .local
                .iter()
                .find(|r| r.concurrency == plan.growth_concurrency)
                .cloned(),
        ) {
            results.growth.push(GrowthPoint {
                pointers: total,
                load: results.sync.first().cloned().unwrap_or_default(),
                lookups: l,
                footprint: f,
            });
        }
        let g = growth(plan, &world, &bin).await?;
        results.growth.push(g);
        save(&results);
    }
    Ok(results)
}

/// CPU per pointer between two readings.
fn per_pointer(before: Option<f64>, after: Option<f64>, pointers: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if pointers > 0 => Some((a - b) * 1e6 / pointers as f64),
        _ => None,
    }
}

/// A node on the PostgreSQL engine, in a fresh database `pil_engine` of `pg`'s server.
async fn start_on_postgres(
    plan: &Plan,
    pg: &Pg,
    world: &World,
    data: &DataSet,
    bin: &Path,
    dir: &Path,
) -> anyhow::Result<NodeProc> {
    const DB: &str = "pil_engine";
    pg.psql(&format!(
        "DROP DATABASE IF EXISTS {DB};\nCREATE DATABASE {DB};"
    ))?;
    let storage = pil_node::config::PostgresConfig {
        url: format!(
            "host={} port={} user={} dbname={DB}",
            pg.host.display(),
            pg.port,
            pg.user
        ),
        pool_size: 16,
        connect_timeout_secs: 10,
        ca_file: None,
        password_file: None,
    };
    pil_node::store::postgres::migrate(&storage.engine_config())
        .await
        .context("creating the node's schema")?;
    let mut config = node_config(
        world,
        None,
        dir.join("data"),
        &plan.node_log_filter,
        data,
        "127.0.0.1:0".parse()?,
    );
    config.storage = pil_node::config::StorageConfig {
        engine: pil_node::config::Engine::Postgres,
        postgres: Some(storage),
    };
    NodeProc::start(bin, &config, dir, "node")
}

async fn federated(
    plan: &Plan,
    world: &World,
    data: &Arc<DataSet>,
    bin: &Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let nodes = node::start_regions(
        world,
        bin,
        data,
        &world.path().join("fed"),
        &plan.node_log_filter,
        false,
    )?;
    // Each region holds its own organizations' pointers.
    let mut loaded = 0;
    for (i, node) in nodes.iter().enumerate() {
        let orgs: Vec<usize> = (0..data.orgs.len())
            .filter(|o| o % REGIONS.len() == i)
            .collect();
        let r = node::sync_orgs(
            world,
            node.addr,
            data.clone(),
            &orgs,
            0,
            SyncKind::Merge,
            plan.sync_streams,
            plan.sync_batch,
            &Pids(vec![node.pid()]),
        )
        .await?;
        loaded += r.sent;
    }
    results.federated_pointers = loaded;
    for node in &nodes {
        proc::wait_idle(node.pid(), 0.05, plan.idle_limit());
    }
    let pids = Pids(nodes.iter().map(|n| n.pid()).collect());
    for &c in &plan.concurrency {
        let r = lookups(
            world,
            nodes[0].addr,
            data,
            &plan.spec(c),
            REGIONS.len(),
            &pids,
            None,
        )
        .await?;
        describe("federated", &r);
        results.federated.push(r);
        for n in &nodes {
            n.truncate_log();
        }
    }
    for n in nodes {
        n.stop()?;
    }
    Ok(())
}

async fn growth(plan: &Plan, world: &World, bin: &Path) -> anyhow::Result<GrowthPoint> {
    let patients = plan.growth_pointers.div_ceil(u64::from(plan.per_patient));
    let data = Arc::new(DataSet::new(
        plan.seed,
        patients,
        plan.per_patient,
        plan.orgs,
    ));
    let total = data.total_pointers();
    say(format!("growth: loading {total} pointers"));
    let dir = world.path().join("growth");
    let config = node_config(
        world,
        None,
        dir.join("data"),
        &plan.node_log_filter,
        &data,
        "127.0.0.1:0".parse()?,
    );
    let node = NodeProc::start(bin, &config, &dir, "node")?;
    let load = load_all(world, &node, &data, plan, "merge, empty node, growth set").await?;
    node.truncate_log();
    let (node, mut footprint) =
        restart_measured(bin, node, &config, &dir, "node", total, plan.idle_limit())?;
    let r = lookups(
        world,
        node.addr,
        &data,
        &plan.spec(plan.growth_concurrency),
        1,
        &Pids(vec![node.pid()]),
        None,
    )
    .await?;
    describe("growth", &r);
    if let Some((rss, hwm)) = proc::memory(node.pid()) {
        footprint.rss_loaded = rss;
        footprint.rss_peak = hwm;
    }
    node.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(GrowthPoint {
        pointers: total,
        load,
        lookups: r,
        footprint,
    })
}
