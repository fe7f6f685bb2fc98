//! Nodes under test as child processes running the real `pil-node serve`, with their
//! log in a file (as an operator would run them, and so the log costs what it costs),
//! clients that authenticate like a record system, and bulk loads through the sync API.

use std::{
    fs::OpenOptions,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use pil_auth::dev_issuer::DpopKey;
use pil_client::{Credentials, PilClient, Profile, SyncOptions, v1};
use pil_node::config::{LogFormat, NodeConfig};
use pil_tests::{HOST, ORG_A, ORG_C, World, doctor_token};
use serde::{Deserialize, Serialize};

use super::{
    data::{DataSet, Generation},
    proc::Cpu,
    report::TokenCheckProbe,
};

/// A node configuration for the benchmark: the world's, with the data directory and
/// log given, production defaults for the background tasks, and [`HOST`] writing for
/// every holder organization of the data set (a hosting provider syncing for its
/// customers).
pub fn node_config(
    world: &World,
    region: Option<&str>,
    data_dir: PathBuf,
    log_filter: &str,
    data: &DataSet,
    listen: SocketAddr,
) -> NodeConfig {
    let mut config = match region {
        Some(r) => world.region_config(r),
        None => world.config(true),
    };
    config.listen = listen;
    config.data_dir = data_dir;
    config.log.format = LogFormat::Json;
    config.log.filter = log_filter.to_string();
    config.limits.purge_interval_secs = pil_node::config::Limits::default().purge_interval_secs;
    config.audit.sign_interval_secs = 10;
    let mut writes: Vec<String> = data.orgs.clone();
    writes.push(ORG_C.to_string());
    config.writes_for = [(HOST.to_string(), writes)].into();
    config
}

/// A running node process.
pub struct NodeProc {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    /// From spawning the process to its "node serving" log line.
    pub startup: Duration,
}

impl NodeProc {
    /// Writes `config` as `<dir>/<name>.toml` and runs `pil-node serve` on it, with its
    /// log appended to `<dir>/<name>.log`; waits until it serves.
    pub fn start(bin: &Path, config: &NodeConfig, dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, toml::to_string_pretty(config)?)?;
        let log = dir.join(format!("{name}.log"));
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let offset = log_file.metadata()?.len();
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config_path)
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = started + Duration::from_secs(300);
        let addr = loop {
            if let Some(addr) = serving_addr(&log, offset) {
                break addr;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "node {name} exited with {status} before serving; log:\n{}",
                    tail(&log, offset)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("node {name} did not start; log:\n{}", tail(&log, offset));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Ok(Self {
            startup: started.elapsed(),
            child,
            addr,
            log,
            data_dir: config.data_dir.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Empties the log file (the node appends, so it just continues at the start).
    pub fn truncate_log(&self) {
        if let Ok(f) = OpenOptions::new().write(true).open(&self.log) {
            let _ = f.set_len(0);
        }
    }

    /// SIGTERM, and waits for the clean exit (queued writes done, memtables flushed).
    pub fn stop(mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("node exited with {status}; log:\n{}", tail(&self.log, 0));
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("node did not stop within two minutes of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in the "node serving" line written after byte `offset`, if there is one.
fn serving_addr(log: &Path, offset: u64) -> Option<SocketAddr> {
    let text = read_from(log, offset);
    text.lines()
        .filter(|l| l.contains("node serving"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()))
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(offset));
        let _ = f.take(1 << 20).read_to_string(&mut s);
    }
    s
}

fn tail(path: &Path, offset: u64) -> String {
    let text = read_from(path, offset);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A development access token for [`ORG_A`]'s doctor, bound to `key`, valid for a day:
/// what a record system holds and reuses for many calls.
pub fn requester_token(world: &World, key: &DpopKey) -> anyhow::Result<String> {
    Ok(doctor_token(&world.issuer())
        .purpose("TREAT")
        .decision_ref("care-relationship-recorded-in-ehr", false)
        .expires_in(Duration::from_secs(24 * 3600))
        .bound_to(key)
        .sign()?)
}

/// What checking one DPoP-bound call's token and proof costs a node, timed on one
/// thread with the verifier a node uses: the token is the same for every call (its
/// signature check is reused after the first), each proof is fresh.
pub fn token_check_cost(world: &World, n: usize) -> anyhow::Result<TokenCheckProbe> {
    use pil_auth::verify::{RequestContext, TokenVerifier, VerifierConfig};
    let key = DpopKey::generate()?;
    let token = requester_token(world, &key)?;
    let verifier = TokenVerifier::from_jwks_file(
        VerifierConfig::new(
            pil_node::demo::DEV_ISSUER,
            pil_node::demo::DEV_AUDIENCE,
            "pil:lookup",
        ),
        world.path().join("issuer").join("jwks.json"),
    )?;
    let uri = "https://127.0.0.1:7443/pil.v1.LookupService/Lookup";
    let mut signing = Vec::with_capacity(n);
    let mut checking = Vec::with_capacity(n);
    // Wall time on one thread while nothing else runs: the scheduler's CPU counters
    // are only brought up to date when a thread sleeps, too coarse for tens of µs.
    for i in 0..=n {
        let t0 = Instant::now();
        let proof = key.proof("POST", uri, &token)?;
        let t1 = Instant::now();
        verifier
            .verify(&token, &RequestContext::grpc(ORG_A, uri, Some(&proof)))
            .context("the probe's own token was refused")?;
        let t2 = Instant::now();
        // The first call also checks the token's signature; a node pays that once.
        if i > 0 {
            signing.push((t1 - t0).as_secs_f64() * 1e6);
            checking.push((t2 - t1).as_secs_f64() * 1e6);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mean = checking.iter().sum::<f64>() / checking.len().max(1) as f64;
    Ok(TokenCheckProbe {
        samples: n,
        p50_us: median(&mut checking),
        mean_us: mean,
        proof_sign_p50_us: median(&mut signing),
    })
}

/// `n` clients of [`ORG_A`] at `addr`, each with its own connection, DPoP key and
/// token (a fresh proof is made for every call).
pub async fn lookup_clients(
    world: &World,
    addr: SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<PilClient>> {
    let profile = Profile::load(&world.profile(ORG_A, addr))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let key = DpopKey::generate()?;
        let token = requester_token(world, &key)?;
        let client = PilClient::connect(&profile)
            .await?
            .with_credentials(Credentials::Token {
                token,
                dpop: Some(key),
            });
        out.push(client);
    }
    Ok(out)
}

/// One lookup of a random patient of `data`; fails unless the node answered with
/// every region in order.
pub async fn lookup_once(
    client: PilClient,
    data: Arc<DataSet>,
    r: u64,
    regions: usize,
) -> Result<(), String> {
    let patient = data.patient(r % data.patients);
    let resp = client
        .lookup(v1::LookupRequest {
            patient: Some(patient),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let ok = resp
        .regions
        .iter()
        .filter(|s| s.state == v1::RegionState::Ok as i32)
        .count();
    if ok < regions {
        return Err(format!(
            "{ok} of {regions} regions answered: {:?}",
            resp.regions
        ));
    }
    Ok(())
}

/// What one bulk sync measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncResult {
    pub name: String,
    pub streams: usize,
    pub sent: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub removed: u64,
    pub rejected: u64,
    pub server_cpu_us: Option<f64>,
    /// CPU per pointer of the database server behind the node (PostgreSQL engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_cpu_us: Option<f64>,
}

/// How a sync is run.
#[derive(Debug, Clone, Copy)]
pub enum SyncKind {
    Merge,
    Replace,
}

/// Streams `generation` of the organizations `orgs` (indexes into `data.orgs`) to the
/// node at `addr` as [`HOST`], `streams` organizations at a time, one connection and
/// one SyncPointers stream per organization, `batch` pointers per message.
#[allow(clippy::too_many_arguments)]
pub async fn sync_orgs(
    world: &World,
    addr: SocketAddr,
    data: Arc<DataSet>,
    orgs: &[usize],
    generation: Generation,
    kind: SyncKind,
    streams: usize,
    batch: usize,
    server: &dyn Cpu,
) -> anyhow::Result<SyncResult> {
    let patients = 0..data.patients;
    sync_orgs_in(
        world, addr, data, orgs, patients, generation, kind, streams, batch, server,
    )
    .await
}

/// [`sync_orgs`] for the patients in `patients` only.
#[allow(clippy::too_many_arguments)]
pub async fn sync_orgs_in(
    world: &World,
    addr: SocketAddr,
    data: Arc<DataSet>,
    orgs: &[usize],
    patients: std::ops::Range<u64>,
    generation: Generation,
    kind: SyncKind,
    streams: usize,
    batch: usize,
    server: &dyn Cpu,
) -> anyhow::Result<SyncResult> {
    use futures::StreamExt;
    let profile = Profile::load(&world.profile(HOST, addr))?;
    let cpu_before = server.cpu_seconds();
    let started = Instant::now();
    let results = futures::stream::iter(orgs.iter().copied())
        .map(|org| {
            let data = data.clone();
            let profile = profile.clone();
            let patients = patients.clone();
            async move {
                let client = PilClient::connect(&profile).await?;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let counter = sent.clone();
                let gen_data = data.clone();
                let producer = tokio::task::spawn_blocking(move || {
                    for b in gen_data.org_batches(org, generation, patients, batch) {
                        counter.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        if tx.blocking_send(b).is_err() {
                            return;
                        }
                    }
                });
                let (mode, scope) = match kind {
                    SyncKind::Merge => (v1::SyncMode::Merge, v1::ReplaceScope::Unspecified),
                    SyncKind::Replace => (v1::SyncMode::Replace, v1::ReplaceScope::Organization),
                };
                let report = client
                    .sync(
                        SyncOptions {
                            organization_number: data.orgs[org].clone(),
                            mode,
                            scope,
                            all_or_nothing: false,
                        },
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    )
                    .await?;
                producer.await?;
                let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
                anyhow::Ok((sent, report))
            }
        })
        .buffer_unordered(streams.max(1))
        .collect::<Vec<_>>()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, server.cpu_seconds()) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let mut r = SyncResult {
        streams,
        seconds,
        ..Default::default()
    };
    for result in results {
        let (sent, report) = result?;
        r.sent += sent;
        r.inserted += report.inserted;
        r.updated += report.updated;
        r.unchanged += report.unchanged;
        r.removed += report.removed;
        r.rejected += report.rejected;
        if let Some(e) = report.errors.first() {
            bail!(
                "the node rejected a pointer at {}: {}: {}",
                e.position,
                e.field,
                e.message
            );
        }
    }
    r.per_second = r.sent as f64 / seconds;
    r.server_cpu_us = cpu.map(|c| c * 1e6 / r.sent.max(1) as f64);
    Ok(r)
}

/// The binary `name` next to this one (the benchmark runs from the build's output
/// directory, where `pil-test-node` is too).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!("{} not built", path.display());
    }
    Ok(path)
}

/// Three federated regions' nodes, each with every other as peer.
pub fn start_regions(
    world: &World,
    bin: &Path,
    data: &DataSet,
    dir: &Path,
    log_filter: &str,
    routing: bool,
) -> anyhow::Result<Vec<NodeProc>> {
    let regions = super::suite::REGIONS;
    let ports: Vec<u16> = regions.iter().map(|_| super::proc::free_port()).collect();
    let mut nodes = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        let dir = dir.join(region);
        let mut config = node_config(
            world,
            Some(region),
            dir.join("data"),
            log_filter,
            data,
            format!("127.0.0.1:{}", ports[i]).parse()?,
        );
        config.federation.peers = regions
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, r)| pil_tests::peer(r, format!("127.0.0.1:{}", ports[j]).parse().unwrap()))
            .collect();
        if routing {
            // The default bound; evaluations unlimited, so that a run measures routing
            // rather than the limit on how fast a peer may learn tokens.
            let routed = world.routed_region_config(region, 5000);
            config.keys.routing_key_file = routed.keys.routing_key_file;
            config.federation.summary_staleness_bound_ms = 5000;
            config.federation.token_evaluations_per_second = 1_000_000;
        }
        nodes.push(NodeProc::start(bin, &config, &dir, "node")?);
    }
    Ok(nodes)
}
