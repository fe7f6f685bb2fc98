//! The suite's results: kept as JSON, rendered as the Markdown tables of
//! docs/benchmarks.md (between its results markers), with each target checked.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{load::LoadResult, node::SyncResult, pg::PgLoad, proc::DiskUse};

pub const BEGIN: &str = "<!-- results:begin (written by pil-bench; edit outside) -->";
pub const END: &str = "<!-- results:end -->";

/// Where and how the suite ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
    pub build: String,
    pub command: String,
}

/// Bytes and keys of one column family.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Family {
    pub name: String,
    pub sst_bytes: u64,
    pub keys: u64,
}

/// A node's size at one data-set size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Footprint {
    pub pointers: u64,
    pub disk: DiskUse,
    pub families: Vec<Family>,
    /// Resident memory after the load and a restart, before lookups (bytes).
    pub rss_idle: u64,
    /// Resident memory after the lookups, and the peak (bytes).
    pub rss_loaded: u64,
    pub rss_peak: u64,
    /// Spawn to serving, on the loaded data directory.
    pub startup_ms: f64,
    pub compaction_wait_s: f64,
}

/// Lookup latency at one data-set size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrowthPoint {
    pub pointers: u64,
    pub load: SyncResult,
    pub lookups: LoadResult,
    pub footprint: Footprint,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataInfo {
    pub seed: u64,
    pub patients: u64,
    pub pointers: u64,
    pub organizations: usize,
}

/// Everything one run of the suite measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub quick: bool,
    pub data: DataInfo,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub max_requests: u64,
    pub node_log_filter: String,
    pub floor: Vec<LoadResult>,
    pub local: Vec<LoadResult>,
    pub federated: Vec<LoadResult>,
    pub federated_pointers: u64,
    pub postgres: Vec<LoadResult>,
    pub postgres_load: Option<PgLoad>,
    pub sync: Vec<SyncResult>,
    pub footprint: Option<Footprint>,
    pub growth: Vec<GrowthPoint>,
    /// Appending 4 KiB and syncing it, in the work directory's file system.
    pub disk_sync: Option<SyncProbe>,
    /// What checking one DPoP-bound call's token and proof costs a node.
    #[serde(default)]
    pub token_check: Option<TokenCheckProbe>,
    /// What one synced pointer costs, stage by stage.
    #[serde(default)]
    pub sync_cost: Option<SyncCostProbe>,
    /// Which other build was measured beside this one.
    #[serde(default)]
    pub baseline_label: Option<String>,
    /// That build's lookups, each run right after this build's at the same concurrency.
    #[serde(default)]
    pub baseline_local: Vec<LoadResult>,
    /// That build's loading sync.
    #[serde(default)]
    pub baseline_sync: Vec<SyncResult>,
    /// This build on the PostgreSQL engine: lookups, each run right after the RocksDB
    /// node's at the same concurrency, with the database server's CPU.
    #[serde(default)]
    pub pg_engine: Vec<LoadResult>,
    /// Its loading sync.
    #[serde(default)]
    pub pg_engine_sync: Vec<SyncResult>,
    /// Change events: sync with a tenth of the patients followed, delivery latency,
    /// a consumer's pull rate.
    #[serde(default)]
    pub events: Option<super::events::EventsResult>,
    /// Routed lookups beside broadcast ones, and what the summaries cost.
    #[serde(default)]
    pub routing: Option<super::routing::RoutingResult>,
}

/// What one synced pointer costs at each stage, measured on its own in one process
/// (`bench::sync_cost`), in µs: wall time on one thread for the first three, the whole
/// process's CPU time for the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncCostProbe {
    pub pointers: u64,
    /// The holder's client encoding it into a sync message.
    pub encode_us: f64,
    /// The node decoding it.
    pub decode_us: f64,
    /// Validation, pseudonym, seal and key.
    pub prepare_us: f64,
    /// Storing it as a new pointer.
    pub insert_us: f64,
    /// Storing it over a stored pointer whose content changed.
    pub update_us: f64,
}

impl SyncCostProbe {
    /// The least CPU per pointer of a sync of updates, client and node together.
    pub fn update_total_us(&self) -> f64 {
        self.encode_us + self.decode_us + self.prepare_us + self.update_us
    }
}

/// Time of the token and DPoP proof checks of one call, on one thread of an otherwise
/// idle machine (so about its CPU time): the access token's signature check is reused
/// (as in a node), the fresh proof's is not.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenCheckProbe {
    pub samples: usize,
    pub p50_us: f64,
    pub mean_us: f64,
    /// Signing the proof, which the client does for every call.
    pub proof_sign_p50_us: f64,
}

/// Latency of a durable 4 KiB append on the machine's disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncProbe {
    pub samples: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU time of the appending thread per append, in µs.
    #[serde(default)]
    pub cpu_us: Option<f64>,
}

fn at(rs: &[LoadResult], c: usize) -> Option<&LoadResult> {
    rs.iter().find(|r| r.concurrency == c)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn count(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(ch);
    }
    out
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn opt_us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

impl Results {
    /// The RocksDB and PostgreSQL engines, and the plain-PostgreSQL baseline, side by side.
    fn engines_markdown(&self, s: &mut String) {
        let _ = writeln!(s, "\n### Storage engines side by side\n");
        let _ = writeln!(
            s,
            "The same node and data set on the RocksDB engine and on the PostgreSQL engine \
             (its own database on the baseline's server: `fsync` and `synchronous_commit` \
             on, over a Unix socket, a pool of 16 connections), and the plain-PostgreSQL \
             baseline. Each lookup reads the patient's pointers and appends its audit \
             record durably (group commit) before answering; each PostgreSQL-engine lookup \
             run follows the RocksDB node's at the same concurrency. Database CPU: every \
             `postgres` process.\n"
        );
        let _ = writeln!(
            s,
            "| c | what | requests/s | p50 ms | p99 ms | node CPU µs | database CPU µs | together µs |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|"
        );
        let together = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
        for e in &self.pg_engine {
            let c = e.concurrency;
            let rows = [
                ("RocksDB engine", at(&self.local, c), false),
                ("PostgreSQL engine", Some(e), false),
                ("plain PostgreSQL (pgbench)", at(&self.postgres, c), true),
            ];
            for (name, r, plain) in rows {
                let Some(r) = r else { continue };
                // The baseline's server CPU is the database's; it has no node.
                let (node, db) = if plain {
                    (None, r.server_cpu_us)
                } else {
                    (r.server_cpu_us, r.database_cpu_us)
                };
                let _ = writeln!(
                    s,
                    "| {c} | {name} | {} | {} | {} | {} | {} | {} |",
                    count(r.throughput),
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                    opt_us(node),
                    opt_us(db),
                    opt_us(together(node, db))
                );
            }
        }
        let rocks = self.sync.first();
        let pg = self.pg_engine_sync.first();
        if pg.is_some() {
            let _ = writeln!(
                s,
                "\n| loading sync (inserts) | pointers/s | node CPU µs/pointer | database CPU µs/pointer |\n\
                 |---|---:|---:|---:|"
            );
            for (name, r) in [("RocksDB engine", rocks), ("PostgreSQL engine", pg)] {
                let Some(r) = r else { continue };
                let one = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or("–".into());
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} |",
                    count(r.per_second),
                    one(r.server_cpu_us),
                    one(r.database_cpu_us)
                );
            }
        }
    }

    /// Disk bytes per pointer of the main data set (table files after a flush).
    pub fn bytes_per_pointer(&self) -> Option<f64> {
        self.footprint
            .as_ref()
            .filter(|f| f.pointers > 0)
            .map(|f| f.disk.sst as f64 / f.pointers as f64)
    }

    /// The targets, each as (target, measured, verdict).
    pub fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let mut t = Vec::new();
        let top = self.local.iter().map(|r| r.concurrency).max().unwrap_or(0);
        let mid = if at(&self.local, 16).is_some() {
            16
        } else {
            self.local
                .iter()
                .map(|r| r.concurrency)
                .filter(|&c| c < top)
                .max()
                .unwrap_or(top)
        };
        let ratio = |a: Option<&LoadResult>, b: Option<&LoadResult>| match (a, b) {
            (Some(a), Some(b)) if b.throughput > 0.0 => Some(a.throughput / b.throughput),
            _ => None,
        };
        let floor = ratio(at(&self.local, top), at(&self.floor, top));
        t.push((
            format!("local lookups at concurrency {top} ≥ 60 % of the trivial-service floor"),
            floor
                .map(|r| format!("{:.0} %", r * 100.0))
                .unwrap_or_default(),
            floor.map(|r| r >= 0.6),
        ));
        let pg = ratio(at(&self.local, top), at(&self.postgres, top));
        t.push((
            format!("local lookups at concurrency {top} ≥ 2 × PostgreSQL's TPS"),
            pg.map(|r| format!("{r:.2} ×")).unwrap_or_default(),
            pg.map(|r| r >= 2.0),
        ));
        let p99 = at(&self.local, mid).map(|r| r.p99_ms);
        t.push((
            format!("local lookup p99 at concurrency {mid} ≤ 5 ms"),
            p99.map(|v| format!("{} ms", ms(v))).unwrap_or_default(),
            p99.map(|v| v <= 5.0),
        ));
        let fed = match (at(&self.federated, mid), at(&self.local, mid)) {
            (Some(f), Some(l)) if l.p99_ms > 0.0 => Some(f.p99_ms / l.p99_ms),
            _ => None,
        };
        t.push((
            format!("federated (3 regions) p99 ≤ 3 × local p99, concurrency {mid}"),
            fed.map(|r| format!("{r:.2} ×")).unwrap_or_default(),
            fed.map(|r| r <= 3.0),
        ));
        let sync = self
            .sync
            .iter()
            .map(|s| s.per_second)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        t.push((
            "bulk sync ≥ 200 000 pointers/s (slowest mode)".into(),
            sync.map(|v| format!("{} /s", count(v))).unwrap_or_default(),
            sync.map(|v| v >= 200_000.0),
        ));
        let growth = match (self.growth.first(), self.growth.last()) {
            (Some(a), Some(b)) if self.growth.len() > 1 && a.lookups.p99_ms > 0.0 => {
                Some((b.lookups.p99_ms / a.lookups.p99_ms, a.pointers, b.pointers))
            }
            _ => None,
        };
        t.push((
            match growth {
                Some((_, a, b)) => format!(
                    "p99 at {} pointers ≤ 1.5 × p99 at {}",
                    count(b as f64),
                    count(a as f64)
                ),
                None => "p99 at 20 M pointers ≤ 1.5 × p99 at 1 M".into(),
            },
            growth
                .map(|(r, ..)| format!("{r:.2} ×"))
                .unwrap_or_default(),
            growth.map(|(r, ..)| r <= 1.5),
        ));
        if let Some(e) = &self.events
            && e.sync_unfollowed_per_s > 0.0
        {
            let r = e.sync_followed_per_s / e.sync_unfollowed_per_s;
            t.push((
                "bulk sync with a tenth of the patients followed ≥ 90 % of none followed".into(),
                format!("{:.0} %", r * 100.0),
                Some(r >= 0.9),
            ));
        }
        let bpp = self.bytes_per_pointer();
        t.push((
            "under 200 bytes of disk per pointer".into(),
            bpp.map(|v| format!("{v:.0} B")).unwrap_or_default(),
            bpp.map(|v| v < 200.0),
        ));
        t
    }

    /// The results section of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "{BEGIN}\n");
        let _ = writeln!(
            s,
            "Measured {} on {} ({} cores, {:.0} GiB, Linux {}), `{}` build{}.\n",
            m.date,
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            m.build,
            if self.quick {
                " — **quick mode: a smoke test, not a measurement**"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "```sh\n{}\n```\n", m.command);
        let _ = writeln!(
            s,
            "Data set: {} pointers for {} patients at {} organizations (seed {}). Each \
             lookup run: {} s warm-up, then {} s or {} requests, whichever ends \
             first. Node log level `{}`.\n",
            count(self.data.pointers as f64),
            count(self.data.patients as f64),
            self.data.organizations,
            self.data.seed,
            self.warmup_s,
            self.duration_s,
            count(self.max_requests as f64),
            self.node_log_filter
        );
        if let Some(d) = &self.disk_sync {
            let _ = writeln!(
                s,
                "Disk: appending 4 KiB and `fdatasync` takes {} ms at the median, {} ms at \
                 p99, {} ms at most ({} samples) — the least any durable commit waits.\n",
                ms(d.p50_ms),
                ms(d.p99_ms),
                ms(d.max_ms),
                d.samples
            );
        }
        let probes = [
            self.token_check.as_ref().map(|t| {
                format!(
                    "verifying a DPoP-bound call's token and fresh proof takes {:.0} µs at the \
                     median ({} calls on one thread, the token's signature check reused; \
                     signing the proof takes the client {:.0} µs)",
                    t.p50_us, t.samples, t.proof_sign_p50_us
                )
            }),
            self.disk_sync.as_ref().and_then(|d| d.cpu_us).map(|cpu| {
                format!("a durable 4 KiB append costs the appending thread {cpu:.0} µs of CPU")
            }),
        ];
        let probes: Vec<String> = probes.into_iter().flatten().collect();
        if !probes.is_empty() {
            let _ = writeln!(
                s,
                "Costs under every lookup, measured on their own: {}.\n",
                probes.join("; ")
            );
        }
        if let Some(c) = &self.sync_cost {
            let _ = writeln!(
                s,
                "Costs under every synced pointer, measured on their own in one process \
                 with the node's code ({} pointers, a fresh store): the client encodes it \
                 in {:.1} µs; the node decodes it in {:.1} µs, validates, pseudonymizes and \
                 seals it in {:.1} µs, and its store spends {:.1} µs of CPU on it as an \
                 insert and {:.1} µs as an update (all threads: the read of the stored \
                 pointer, three column families, one synced write per message). An update \
                 costs client and node together at least {:.1} µs.\n",
                count(c.pointers as f64),
                c.encode_us,
                c.decode_us,
                c.prepare_us,
                c.insert_us,
                c.update_us,
                c.update_total_us()
            );
        }
        let _ = writeln!(s, "### Targets\n");
        let _ = writeln!(s, "| target | measured | |\n|---|---:|---|");
        for (target, measured, ok) in self.targets() {
            let _ = writeln!(s, "| {target} | {measured} | {} |", verdict(ok));
        }
        let _ = writeln!(s, "\n### Lookups\n");
        let _ = writeln!(
            s,
            "Closed loop: each of *c* clients (own connection, own DPoP key and token, a \
             fresh proof per call) sends its next request when the last is answered. \
             CPU columns: CPU time per request of the server process(es) and of the load \
             generator (for PostgreSQL: all `postgres` processes, and pgbench).\n"
        );
        let _ = writeln!(
            s,
            "| what | c | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | server CPU µs | client CPU µs | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let rows: [(&str, &[LoadResult]); 4] = [
            ("trivial gRPC service (floor)", &self.floor),
            ("PIL local lookup", &self.local),
            ("PostgreSQL + pgbench", &self.postgres),
            ("PIL federated, 3 regions", &self.federated),
        ];
        for (name, rs) in rows {
            for r in rs {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.concurrency,
                    count(r.throughput),
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                    ms(r.p999_ms),
                    ms(r.max_ms),
                    opt_us(r.server_cpu_us),
                    opt_us(r.client_cpu_us),
                    r.errors
                );
            }
        }
        if !self.local.is_empty() && (!self.floor.is_empty() || !self.postgres.is_empty()) {
            let _ = writeln!(
                s,
                "\n| c | PIL / floor | PIL / PostgreSQL | federated p99 / local p99 |\n|---:|---:|---:|---:|"
            );
            for l in &self.local {
                let f = at(&self.floor, l.concurrency)
                    .map(|f| format!("{:.0} %", 100.0 * l.throughput / f.throughput))
                    .unwrap_or_else(|| "–".into());
                let p = at(&self.postgres, l.concurrency)
                    .map(|p| format!("{:.2} ×", l.throughput / p.throughput))
                    .unwrap_or_else(|| "–".into());
                let fd = at(&self.federated, l.concurrency)
                    .map(|f| format!("{:.2} ×", f.p99_ms / l.p99_ms))
                    .unwrap_or_else(|| "–".into());
                let _ = writeln!(s, "| {} | {f} | {p} | {fd} |", l.concurrency);
            }
        }
        let errors: Vec<String> = [&self.floor, &self.local, &self.federated]
            .iter()
            .flat_map(|rs| rs.iter())
            .filter_map(|r| r.first_error.clone())
            .collect();
        if let Some(e) = errors.first() {
            let _ = writeln!(s, "\nFirst error seen: `{}`", e.replace('`', "'"));
        }
        if self.federated_pointers > 0 {
            let _ = writeln!(
                s,
                "\nFederated: the same data set split by holder organization over three \
                 nodes ({} pointers in all); the client asks one of them, which asks the \
                 other two.",
                count(self.federated_pointers as f64)
            );
        }
        if let Some(label) = &self.baseline_label {
            let _ = writeln!(s, "\n### This build beside {label}\n");
            let _ = writeln!(
                s,
                "Both nodes loaded with the same data in the same run; each lookup run of \
                 the other build right after this build's, at the same concurrency.\n"
            );
            let _ = writeln!(
                s,
                "| measure | {label} | this build | change |\n|---|---:|---:|---:|"
            );
            let change =
                |before: f64, after: f64| format!("{:+.1} %", 100.0 * (after / before - 1.0));
            for b in &self.baseline_local {
                let Some(l) = at(&self.local, b.concurrency) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "| lookups/s, c = {} | {} | {} | {} |",
                    b.concurrency,
                    count(b.throughput),
                    count(l.throughput),
                    change(b.throughput, l.throughput)
                );
                if let (Some(bc), Some(lc)) = (b.server_cpu_us, l.server_cpu_us) {
                    let _ = writeln!(
                        s,
                        "| node CPU µs per lookup, c = {} | {bc:.0} | {lc:.0} | {} |",
                        b.concurrency,
                        change(bc, lc)
                    );
                }
            }
            if let (Some(b), Some(l)) = (self.baseline_sync.first(), self.sync.first()) {
                let _ = writeln!(
                    s,
                    "| loading sync, pointers/s | {} | {} | {} |",
                    count(b.per_second),
                    count(l.per_second),
                    change(b.per_second, l.per_second)
                );
                if let (Some(bc), Some(lc)) = (b.server_cpu_us, l.server_cpu_us) {
                    let _ = writeln!(
                        s,
                        "| loading sync, node CPU µs per pointer | {bc:.1} | {lc:.1} | {} |",
                        change(bc, lc)
                    );
                }
            }
        }
        if !self.pg_engine.is_empty() || !self.pg_engine_sync.is_empty() {
            self.engines_markdown(&mut s);
        }
        if let Some(r) = &self.routing {
            routing_markdown(&mut s, r);
        }
        if let Some(e) = &self.events {
            let _ = writeln!(s, "\n### Change events\n");
            let _ = writeln!(
                s,
                "Two nodes loaded with the same data through the same sync: one where \
                 nobody follows anyone, one where {} patients (a tenth) are followed in {} \
                 subscriptions made before the load, so every pointer of theirs makes an \
                 event in the load's writes.\n",
                count(e.patients_followed as f64),
                e.subscriptions
            );
            let _ = writeln!(s, "| measure | value |\n|---|---:|");
            let ratio = if e.sync_unfollowed_per_s > 0.0 {
                format!(
                    "{:.1} %",
                    100.0 * (e.sync_followed_per_s / e.sync_unfollowed_per_s - 1.0)
                )
            } else {
                "–".into()
            };
            for (name, value) in [
                (
                    "loading sync, nobody followed, pointers/s".to_string(),
                    count(e.sync_unfollowed_per_s),
                ),
                (
                    "loading sync, a tenth followed, pointers/s".to_string(),
                    count(e.sync_followed_per_s),
                ),
                ("followed against nobody followed".to_string(), ratio),
                (
                    "node CPU µs per pointer, nobody / a tenth followed".to_string(),
                    format!(
                        "{} / {}",
                        opt_us(e.sync_unfollowed_cpu_us),
                        opt_us(e.sync_followed_cpu_us)
                    ),
                ),
                (
                    "events the load made".to_string(),
                    count(e.events_made as f64),
                ),
                (
                    "events/s pulled by one consumer (1 000 per call)".to_string(),
                    count(e.pull_events_per_s),
                ),
                (
                    format!(
                        "write acknowledged → event at a streaming subscriber, p50 / p99 ms ({} writes)",
                        e.latency_samples
                    ),
                    format!("{} / {}", ms(e.latency_p50_ms), ms(e.latency_p99_ms)),
                ),
                (
                    "three regions: write at the home region → event, p50 / p99 ms".to_string(),
                    format!(
                        "{} / {}",
                        ms(e.regions_home_p50_ms),
                        ms(e.regions_home_p99_ms)
                    ),
                ),
                (
                    "three regions: write at another region → event at the home node, p50 / p99 ms"
                        .to_string(),
                    format!(
                        "{} / {}",
                        ms(e.regions_peer_p50_ms),
                        ms(e.regions_peer_p99_ms)
                    ),
                ),
            ] {
                let _ = writeln!(s, "| {name} | {value} |");
            }
        }
        if !self.sync.is_empty() {
            let _ = writeln!(s, "\n### Bulk sync\n");
            let _ = writeln!(
                s,
                "| sync | streams | pointers | seconds | pointers/s | server CPU µs/pointer | inserted | updated | unchanged | removed |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in &self.sync {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                    r.name,
                    r.streams,
                    count(r.sent as f64),
                    r.seconds,
                    count(r.per_second),
                    r.server_cpu_us
                        .map(|v| format!("{v:.1}"))
                        .unwrap_or_else(|| "–".into()),
                    count(r.inserted as f64),
                    count(r.updated as f64),
                    count(r.unchanged as f64),
                    count(r.removed as f64)
                );
            }
        }
        let mut prints: Vec<&Footprint> = self.footprint.iter().collect();
        prints.extend(self.growth.iter().skip(1).map(|g| &g.footprint));
        if !prints.is_empty() {
            let _ = writeln!(s, "\n### Footprint\n");
            let _ = writeln!(
                s,
                "Disk after the load and a clean stop (memtables flushed) and compactions \
                 have settled; resident memory of the node process.\n"
            );
            let _ = writeln!(
                s,
                "| pointers | disk (all) | table files | bytes/pointer (tables) | RSS idle | RSS after lookups | RSS peak | RSS/M pointers | start-up |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for f in &prints {
                let millions = f.pointers as f64 / 1e6;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.0} ms |",
                    count(f.pointers as f64),
                    mib(f.disk.total),
                    mib(f.disk.sst),
                    f.disk.sst as f64 / f.pointers.max(1) as f64,
                    mib(f.rss_idle),
                    mib(f.rss_loaded),
                    mib(f.rss_peak),
                    if millions > 0.0 {
                        mib((f.rss_loaded as f64 / millions) as u64)
                    } else {
                        "–".into()
                    },
                    f.startup_ms
                );
            }
            for f in &prints {
                if f.families.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "\nTable files by column family at {} pointers:\n\n| family | keys | bytes | bytes/pointer |\n|---|---:|---:|---:|",
                    count(f.pointers as f64)
                );
                for fam in &f.families {
                    if fam.sst_bytes == 0 && fam.keys == 0 {
                        continue;
                    }
                    let _ = writeln!(
                        s,
                        "| `{}` | {} | {} | {:.1} |",
                        fam.name,
                        count(fam.keys as f64),
                        mib(fam.sst_bytes),
                        fam.sst_bytes as f64 / f.pointers.max(1) as f64
                    );
                }
            }
            if let Some(pg) = &self.postgres_load {
                let _ = writeln!(
                    s,
                    "\nPostgreSQL, same pointers: table {} + indexes {} = {:.0} bytes/pointer \
                     (loaded with COPY in {:.1} s).",
                    mib(pg.table_bytes),
                    mib(pg.index_bytes),
                    (pg.table_bytes + pg.index_bytes) as f64 / pg.rows.max(1) as f64,
                    pg.seconds
                );
            }
        }
        if !self.growth.is_empty() {
            let _ = writeln!(s, "\n### Growth\n");
            let _ = writeln!(
                s,
                "| pointers | c | requests/s | p50 ms | p99 ms | p99.9 ms | load pointers/s |\n|---:|---:|---:|---:|---:|---:|---:|"
            );
            for g in &self.growth {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    count(g.pointers as f64),
                    g.lookups.concurrency,
                    count(g.lookups.throughput),
                    ms(g.lookups.p50_ms),
                    ms(g.lookups.p99_ms),
                    ms(g.lookups.p999_ms),
                    if g.load.sent > 0 {
                        count(g.load.per_second)
                    } else {
                        "–".into()
                    }
                );
            }
        }
        let _ = writeln!(s, "\n{END}");
        s
    }
}

/// Replaces the results section of `doc` (or appends one).
pub fn splice(doc: &str, section: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let mut out = String::with_capacity(doc.len() + section.len());
            out.push_str(&doc[..b]);
            out.push_str(section.trim_end());
            out.push_str(&doc[e + END.len()..]);
            out
        }
        _ => format!("{}\n\n{}", doc.trim_end(), section),
    }
}

/// The routing scenario's tables.
fn routing_markdown(s: &mut String, r: &super::routing::RoutingResult) {
    let _ = writeln!(s, "\n### Routing\n");
    let _ = writeln!(
        s,
        "Three regions with routing keys, each holding a third of the patients ({} \
         patients, {} pointers in all); the client asks Helse Vest. Each concurrency runs \
         routed lookups, then the same lookups with `all_regions` (broadcast). \
         \"Uninvolved\" counts peers asked that held nothing about the patient, per 1 000 \
         lookups; broadcast asks 4/3 of them per lookup on average. Node CPU is the three \
         nodes' together, per lookup.\n",
        count(r.patients as f64),
        count(r.pointers as f64)
    );
    let _ = writeln!(
        s,
        "| c | routed req/s | broadcast req/s | routed p99 ms | broadcast p99 ms | routed CPU µs | broadcast CPU µs | uninvolved / 1000, routed | uninvolved / 1000, broadcast |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for routed in &r.routed {
        let c = routed.concurrency;
        let Some(b) = at(&r.broadcast, c) else {
            continue;
        };
        let of = |v: &[(usize, f64)]| {
            v.iter()
                .find(|(k, _)| *k == c)
                .map_or("–".to_string(), |(_, x)| format!("{x:.1}"))
        };
        let _ = writeln!(
            s,
            "| {c} | {} | {} | {} | {} | {} | {} | {} | {} |",
            count(routed.throughput),
            count(b.throughput),
            ms(routed.p99_ms),
            ms(b.p99_ms),
            opt_us(routed.server_cpu_us),
            opt_us(b.server_cpu_us),
            of(&r.uninvolved_routed),
            of(&r.uninvolved_broadcast)
        );
    }
    let _ = writeln!(s, "\n| measure | value |\n|---|---:|");
    let _ = writeln!(
        s,
        "| summary of 1 000 000 patients, bytes as sent | {} |",
        count(r.filter_bytes_per_million as f64)
    );
    let _ = writeln!(
        s,
        "| building it, ms | {:.0} |",
        r.filter_build_ms_per_million
    );
    let _ = writeln!(
        s,
        "| false-positive rate (1 000 000 patients not held) | {:.4} % |",
        r.false_positive_rate * 100.0
    );
    let _ = writeln!(
        s,
        "| new patient routable from another region, p50 / p99 / max ms ({} samples) | {} / {} / {} |",
        r.routable_samples,
        ms(r.routable_p50_ms),
        ms(r.routable_p99_ms),
        ms(r.routable_max_ms)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_between_markers() {
        let doc = format!("# T\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## After\n");
        let out = splice(&doc, &format!("{BEGIN}\nnew\n{END}\n"));
        assert!(out.contains("new") && !out.contains("old"));
        assert!(out.starts_with("# T") && out.ends_with("## After\n"));
    }

    #[test]
    fn renders_empty_and_partial_results() {
        let mut r = Results::default();
        assert!(r.markdown().contains("not measured"));
        r.local.push(LoadResult {
            concurrency: 16,
            throughput: 1000.0,
            p99_ms: 4.0,
            ..Default::default()
        });
        r.floor.push(LoadResult {
            concurrency: 16,
            throughput: 2000.0,
            ..Default::default()
        });
        let md = r.markdown();
        assert!(md.contains("| 16 | 50 % |"), "{md}");
        assert!(
            md.contains("p99 at concurrency 16 ≤ 5 ms | 4.00 ms | met"),
            "{md}"
        );
    }
}
