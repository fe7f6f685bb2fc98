//! Change events, measured: what following a tenth of the patients costs a bulk sync
//! (beside a node where nobody follows anyone, loaded the same way in the same run),
//! how long a write takes to reach a streaming subscriber, and how fast one consumer
//! pulls a backlog.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use pil_client::{PilClient, v1};
use pil_tests::{ORG_C, World};
use serde::{Deserialize, Serialize};

use super::{
    data::DataSet,
    load::summarize,
    node::{self, NodeProc, SyncKind, lookup_clients, node_config},
    proc::Pids,
};

/// Patients per subscription (the node's limit is 1 000).
const PER_SUBSCRIPTION: u64 = 1000;

/// What the events scenario measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsResult {
    pub patients_followed: u64,
    pub subscriptions: u64,
    /// Loading sync into a node where nobody follows anyone, pointers/s.
    pub sync_unfollowed_per_s: f64,
    /// The same into a node where a tenth of the patients are followed.
    pub sync_followed_per_s: f64,
    pub sync_unfollowed_cpu_us: Option<f64>,
    pub sync_followed_cpu_us: Option<f64>,
    /// Events the followed load made.
    pub events_made: u64,
    /// From a write's acknowledgement to its event reaching a streaming subscriber.
    pub latency_samples: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// One consumer pulling the backlog, 1 000 events per call.
    pub pull_events_per_s: f64,
    /// Three federated regions, the subscription made at the first: a write at the
    /// home region (delivered after asking both peers for the patient's protections)
    /// and a write at another region (collected by the home node, then delivered).
    #[serde(default)]
    pub regions_home_p50_ms: f64,
    #[serde(default)]
    pub regions_home_p99_ms: f64,
    #[serde(default)]
    pub regions_peer_p50_ms: f64,
    #[serde(default)]
    pub regions_peer_p99_ms: f64,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    world: &World,
    bin: &Path,
    data: &Arc<DataSet>,
    dir: &Path,
    log_filter: &str,
    streams: usize,
    batch: usize,
    samples: usize,
) -> anyhow::Result<EventsResult> {
    let mut r = EventsResult::default();
    let start = |name: &str| {
        let config = node_config(
            world,
            None,
            dir.join(name).join("data"),
            log_filter,
            data,
            "127.0.0.1:0".parse().expect("address"),
        );
        NodeProc::start(bin, &config, &dir.join(name), "node")
    };
    let orgs: Vec<usize> = (0..data.orgs.len()).collect();
    let load = |node: &NodeProc| {
        let pids = Pids(vec![node.pid()]);
        let addr = node.addr;
        let orgs = orgs.clone();
        async move {
            node::sync_orgs(
                world,
                addr,
                data.clone(),
                &orgs,
                0,
                SyncKind::Merge,
                streams,
                batch,
                &pids,
            )
            .await
        }
    };

    // Nobody follows anyone.
    let plain = start("unfollowed")?;
    let s = load(&plain).await?;
    r.sync_unfollowed_per_s = s.per_second;
    r.sync_unfollowed_cpu_us = s.server_cpu_us;
    plain.stop()?;

    // A tenth of the patients followed, before the load.
    let followed = start("followed")?;
    let subscriber = lookup_clients(world, followed.addr, 1).await?.remove(0);
    let mut subscriptions = Vec::new();
    let every_tenth: Vec<u64> = (0..data.patients).step_by(10).collect();
    for chunk in every_tenth.chunks(PER_SUBSCRIPTION as usize) {
        let sub = subscriber
            .subscribe(v1::SubscribeRequest {
                patients: chunk.iter().map(|&i| data.patient(i)).collect(),
                ..Default::default()
            })
            .await?
            .subscription
            .unwrap_or_default();
        subscriptions.push(sub.id);
    }
    r.patients_followed = every_tenth.len() as u64;
    r.subscriptions = subscriptions.len() as u64;
    let s = load(&followed).await?;
    r.sync_followed_per_s = s.per_second;
    r.sync_followed_cpu_us = s.server_cpu_us;

    // One consumer pulls its backlog.
    let started = Instant::now();
    let mut pulled = 0u64;
    for id in &subscriptions {
        let mut after = 0;
        loop {
            let page = subscriber.pull_events(id, after, 1000).await?;
            let Some(last) = page.events.last() else {
                break;
            };
            after = last.number;
            pulled += page.events.len() as u64;
        }
    }
    r.events_made = pulled;
    r.pull_events_per_s = pulled as f64 / started.elapsed().as_secs_f64().max(1e-9);

    // A write's way to a streaming subscriber.
    let first = subscriptions.first().cloned().unwrap_or_default();
    let backlog = subscriber.pull_events(&first, 0, 1).await?.last_event;
    let mut stream = subscriber.stream_events(&first, backlog, 60).await?;
    let writer = world.client(ORG_C, followed.addr).await;
    let patient = data.patient(0);
    let mut micros = Vec::with_capacity(samples);
    for n in 0..samples as u32 {
        write_and_wait(&writer, &mut stream, &patient, n, &mut micros).await?;
    }
    drop(stream);
    let (_, p50, p99, _, _) = summarize(micros);
    r.latency_samples = samples;
    r.latency_p50_ms = p50;
    r.latency_p99_ms = p99;
    followed.stop()?;

    // Across three regions.
    let regions = node::start_regions(world, bin, data, &dir.join("regions"), log_filter, false)?;
    let home = regions[0].addr;
    let subscriber = lookup_clients(world, home, 1).await?.remove(0);
    let patient = data.patient(1);
    let sub = subscriber
        .subscribe(v1::SubscribeRequest {
            patients: vec![patient.clone()],
            ..Default::default()
        })
        .await?
        .subscription
        .unwrap_or_default();
    let mut stream = subscriber.stream_events(&sub.id, 0, 60).await?;
    for (i, node) in regions.iter().enumerate().take(2) {
        let writer = world.client(ORG_C, node.addr).await;
        let mut micros = Vec::with_capacity(samples);
        for n in 0..samples as u32 {
            let n = 20_000 + (i as u32) * 10_000 + n;
            write_and_wait(&writer, &mut stream, &patient, n, &mut micros).await?;
        }
        let (_, p50, p99, _, _) = summarize(micros);
        if i == 0 {
            (r.regions_home_p50_ms, r.regions_home_p99_ms) = (p50, p99);
        } else {
            (r.regions_peer_p50_ms, r.regions_peer_p99_ms) = (p50, p99);
        }
    }
    drop(stream);
    for node in regions {
        node.stop()?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(r)
}

/// Writes a new pointer for `patient` (through `writer`, at any region) and waits for
/// its event; records the time from the acknowledgement to the event.
async fn write_and_wait(
    writer: &PilClient,
    stream: &mut tonic::Streaming<v1::StreamEventsResponse>,
    patient: &v1::PatientIdentifier,
    n: u32,
    micros: &mut Vec<u64>,
) -> anyhow::Result<()> {
    writer
        .upsert(pil_tests::pointer(
            patient,
            ORG_C,
            10_000 + n,
            &["medications"],
        ))
        .await?;
    let acked = Instant::now();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .map_err(|_| anyhow::anyhow!("no event within 10 s of a write"))??
            .and_then(|m| m.message);
        match message {
            Some(v1::stream_events_response::Message::Event(_)) => break,
            Some(_) => continue,
            None => anyhow::bail!("the event stream ended"),
        }
    }
    micros.push(acked.elapsed().as_micros() as u64);
    Ok(())
}
