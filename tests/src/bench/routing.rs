//! Privacy-preserving routing, measured: three regions that hold disjoint patients,
//! the same lookups routed and broadcast (`all_regions`) side by side at each
//! concurrency; how many regions that hold nothing about the patient are asked per
//! 1 000 lookups; what a summary of a million patients weighs and how often it
//! answers "may hold" for a patient it does not hold; and how long a new patient's
//! pointer takes to become routable from another region.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use pil_client::{PilClient, Profile, v1};
use pil_node::routing::summary::Summary;
use pil_tests::{HOST, OPERATOR, World};
use serde::{Deserialize, Serialize};

use super::{
    data::{DataSet, mix},
    load::{self, LoadResult, LoadSpec},
    node::{self, NodeProc, SyncKind},
    proc::{self, Pids, This},
};

/// What the routing scenario measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoutingResult {
    pub patients: u64,
    pub pointers: u64,
    /// Lookups with routing, one per concurrency.
    pub routed: Vec<LoadResult>,
    /// The same lookups asking every region, each run right after the routed one.
    pub broadcast: Vec<LoadResult>,
    /// Regions asked that held nothing about the patient, per 1 000 lookups, routed
    /// and broadcast, by concurrency.
    pub uninvolved_routed: Vec<(usize, f64)>,
    pub uninvolved_broadcast: Vec<(usize, f64)>,
    /// A summary over a million tokens: its filter's size as sent, how long it took
    /// to build, and the share of a million other tokens it says it may hold.
    pub filter_bytes_per_million: u64,
    pub filter_build_ms_per_million: f64,
    pub false_positive_rate: f64,
    /// From a pointer's acknowledgement in one region to a lookup in another finding it.
    pub routable_samples: usize,
    pub routable_p50_ms: f64,
    pub routable_p99_ms: f64,
    pub routable_max_ms: f64,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[pil-bench] {}", msg.as_ref());
}

/// Runs the scenario: `dir` holds the three nodes, removed by the caller.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    world: &World,
    bin: &std::path::Path,
    data: &Arc<DataSet>,
    dir: &std::path::Path,
    log_filter: &str,
    specs: &[LoadSpec],
    streams: usize,
    batch: usize,
    idle_limit: Duration,
    samples: usize,
) -> anyhow::Result<RoutingResult> {
    let mut result = RoutingResult {
        patients: data.patients,
        ..Default::default()
    };
    let (bytes, build_ms, fp) = filter_figures(1_000_000);
    result.filter_bytes_per_million = bytes;
    result.filter_build_ms_per_million = build_ms;
    result.false_positive_rate = fp;
    say(format!(
        "routing: a summary of 1 000 000 patients is {bytes} bytes, built in {build_ms:.0} ms, \
         false-positive rate {:.5} %",
        fp * 100.0
    ));

    let nodes = node::start_regions(world, bin, data, dir, log_filter, true)?;
    // Region i holds the i-th third of the patients, every organization's pointers.
    let regions = nodes.len() as u64;
    let share = data.patients.div_ceil(regions);
    let orgs: Vec<usize> = (0..data.orgs.len()).collect();
    for (i, n) in nodes.iter().enumerate() {
        let from = i as u64 * share;
        let to = ((i as u64 + 1) * share).min(data.patients);
        let r = node::sync_orgs_in(
            world,
            n.addr,
            data.clone(),
            &orgs,
            from..to,
            0,
            SyncKind::Merge,
            streams,
            batch,
            &Pids(vec![n.pid()]),
        )
        .await?;
        result.pointers += r.sent;
    }
    for n in &nodes {
        proc::wait_idle(n.pid(), 0.05, idle_limit);
    }
    wait_summaries(world, &nodes[0], share.saturating_sub(1)).await?;
    let pids = Pids(nodes.iter().map(|n| n.pid()).collect());
    let holder = move |r: u64, patients: u64| ((r % patients) / share) as usize;
    for spec in specs {
        for all_regions in [false, true] {
            let clients = node::lookup_clients(world, nodes[0].addr, spec.concurrency).await?;
            let data = data.clone();
            let asked = Arc::new(AtomicU64::new(0));
            let lookups = Arc::new(AtomicU64::new(0));
            let (a, l) = (asked.clone(), lookups.clone());
            let names: Vec<&'static str> = super::suite::REGIONS.to_vec();
            let r = load::run(
                spec,
                &clients,
                move |c, r| {
                    let (data, a, l, names) = (data.clone(), a.clone(), l.clone(), names.clone());
                    async move {
                        let patients = data.patients;
                        let asked = lookup_counted(c, data, r, all_regions).await?;
                        let held_by = names[holder(r, patients)];
                        // Peers asked that hold nothing about the patient.
                        let n = asked.iter().filter(|r| r.as_str() != held_by).count();
                        a.fetch_add(n as u64, Ordering::Relaxed);
                        l.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                },
                &pids,
                None,
                &This,
            )
            .await;
            let per_1000 = 1000.0 * asked.load(Ordering::Relaxed) as f64
                / lookups.load(Ordering::Relaxed).max(1) as f64;
            let what = if all_regions { "broadcast" } else { "routed" };
            say(format!(
                "routing {what} c={}: {:.0}/s p99 {:.2} ms, node CPU {:.0} µs, {per_1000:.1} \
                 regions holding nothing asked per 1000 lookups, {} errors",
                r.concurrency,
                r.throughput,
                r.p99_ms,
                r.server_cpu_us.unwrap_or(f64::NAN),
                r.errors
            ));
            if all_regions {
                result.uninvolved_broadcast.push((r.concurrency, per_1000));
                result.broadcast.push(r);
            } else {
                result.uninvolved_routed.push((r.concurrency, per_1000));
                result.routed.push(r);
            }
            for n in &nodes {
                n.truncate_log();
            }
        }
    }
    let (p50, p99, max) = time_to_routable(world, data, &nodes, samples).await?;
    result.routable_samples = samples;
    result.routable_p50_ms = p50;
    result.routable_p99_ms = p99;
    result.routable_max_ms = max;
    say(format!(
        "routing: a new patient's pointer routable from another region after p50 {p50:.1} ms, \
         p99 {p99:.1} ms, max {max:.1} ms"
    ));
    for n in nodes {
        n.stop()?;
    }
    Ok(result)
}

/// The summary's figures for `n` random tokens: filter bytes, build time, and the
/// false-positive rate over `n` other tokens.
fn filter_figures(n: usize) -> (u64, f64, f64) {
    let tokens: Vec<u64> = (0..n as u64).map(mix).collect();
    let started = Instant::now();
    let Ok(summary) = Summary::build(&tokens, 0) else {
        return (0, 0.0, f64::NAN);
    };
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let bytes = summary.encode_filter().len() as u64;
    let held: std::collections::HashSet<u64> = tokens.into_iter().collect();
    let mut tried = 0u64;
    let mut positive = 0u64;
    let mut i = n as u64;
    while tried < n as u64 {
        i += 1;
        let t = mix(i);
        if held.contains(&t) {
            continue;
        }
        tried += 1;
        positive += u64::from(summary.may_hold(t));
    }
    (bytes, build_ms, positive as f64 / tried as f64)
}

/// Looks up patient `r` and returns the peer regions that were asked (every region
/// in the answer but the home node's and those skipped as holding nothing).
async fn lookup_counted(
    client: PilClient,
    data: Arc<DataSet>,
    r: u64,
    all_regions: bool,
) -> Result<Vec<String>, String> {
    let resp = client
        .lookup(v1::LookupRequest {
            patient: Some(data.patient(r % data.patients)),
            all_regions,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let home = super::suite::REGIONS[0];
    let mut asked = Vec::new();
    for s in &resp.regions {
        match v1::RegionState::try_from(s.state) {
            Ok(v1::RegionState::Ok) if s.region != home => asked.push(s.region.clone()),
            Ok(v1::RegionState::Ok | v1::RegionState::HoldsNothing) => {}
            _ => return Err(format!("region {} answered {:?}", s.region, s)),
        }
    }
    Ok(asked)
}

/// Waits until the home node holds a fresh summary of each peer covering `patients`.
async fn wait_summaries(world: &World, home: &NodeProc, patients: u64) -> anyhow::Result<()> {
    let profile = Profile::load(&world.profile(OPERATOR, home.addr))?;
    let admin = PilClient::connect(&profile).await?.admin();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let peers = admin
            .clone()
            .list_peers(v1::ListPeersRequest {})
            .await?
            .into_inner()
            .peers;
        let ready = !peers.is_empty()
            && peers.iter().all(|p| {
                p.summary
                    .as_ref()
                    .is_some_and(|s| s.state == "fresh" && s.patients >= patients)
            });
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "summaries not fresh after 120 s: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Registers a pointer for a new patient in the second region, `samples` times, and
/// times until a lookup at the first finds it.
async fn time_to_routable(
    world: &World,
    data: &DataSet,
    nodes: &[NodeProc],
    samples: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let holder = PilClient::connect(&Profile::load(&world.profile(HOST, nodes[1].addr))?).await?;
    let clients = node::lookup_clients(world, nodes[0].addr, 1).await?;
    let doctor = clients[0].clone();
    let org = data.orgs[0].clone();
    let mut taken = Vec::with_capacity(samples);
    for k in 0..samples as u64 {
        let patient = data.patient(data.patients + 1 + k);
        holder
            .upsert(pil_tests::pointer(&patient, &org, 1, &["medications"]))
            .await?;
        let acked = Instant::now();
        loop {
            let r = doctor
                .lookup(v1::LookupRequest {
                    patient: Some(patient.clone()),
                    ..Default::default()
                })
                .await?;
            if !r.pointers.is_empty() {
                taken.push(acked.elapsed().as_micros() as u64);
                break;
            }
            anyhow::ensure!(
                acked.elapsed() < Duration::from_secs(30),
                "a new pointer not found from another region after 30 s: {:?}",
                r.regions
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, p50, p99, _, max) = load::summarize(taken);
    Ok((p50, p99, max))
}
