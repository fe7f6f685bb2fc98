//! Draws `docs/monitoring/dashboard.svg`: three federated regions under a mixed load
//! (lookups allowed, refused and by emergency access, writes, change events, a region
//! that goes down, a pseudonym-key rotation), scraped by a real Prometheus, and the
//! shipped dashboard's own queries evaluated by it and drawn as the dashboard lays them
//! out. Not part of the suite (it runs for a minute and a half): run
//! `tests/monitoring/dashboard-picture.sh`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use pil_proto::v1;
use pil_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the load runs, and when its events happen.
const RUN: Duration = Duration::from_secs(90);
const REGION_DOWN_AT: Duration = Duration::from_secs(35);
const ROTATION_AT: Duration = Duration::from_secs(55);

fn prometheus_binary() -> PathBuf {
    let dir = std::env::var_os("PIL_PROMTOOL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/pil-promtool")
        });
    let status = Command::new("bash")
        .arg(package_dir().join("monitoring/prometheus-tools.sh"))
        .arg(&dir)
        .status()
        .expect("run prometheus-tools.sh");
    assert!(status.success());
    dir.join("prometheus")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain-HTTP GET's status line and body.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.ok()?;
    Some(out)
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    async fn start(dir: &std::path::Path, targets: &[(&str, SocketAddr)]) -> Self {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: pil-node\n    static_configs:\n",
        );
        for (region, addr) in targets {
            config.push_str(&format!(
                "      - targets: [\"{addr}\"]\n        labels: {{instance: {region}}}\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new(prometheus_binary())
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        for _ in 0..100 {
            if http_get(addr, "/-/ready")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
            {
                return Self { child, addr };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("prometheus did not become ready");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "draws the dashboard picture for the docs: tests/monitoring/dashboard-picture.sh"]
async fn draw_the_dashboard_picture() {
    let world = World::new();
    let mut configs = Vec::new();
    let mut nodes = Vec::new();
    for region in ["vest", "midt", "nord"] {
        let mut config = world.region_config(region);
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        nodes.push((region, TestNode::start(config.clone()).await));
        configs.push(config);
    }
    {
        let pairs: Vec<(&str, &TestNode)> = nodes.iter().map(|(r, n)| (*r, n)).collect();
        federate(&pairs);
    }
    let targets: Vec<(&str, SocketAddr)> = nodes
        .iter()
        .map(|(r, n)| (*r, n.node.metrics_addr().unwrap()))
        .collect();
    let prometheus = Prometheus::start(world.path(), &targets).await;
    let vest = nodes[0].1.addr();

    // Pointers in every region, for patients 0..300.
    for (i, (_, node)) in nodes.iter().enumerate() {
        let writer = world.client(ORG_A, node.addr()).await;
        for p in (0..300u64).filter(|p| p % 3 == i as u64) {
            writer
                .upsert(pointer(&patient_id(p), ORG_A, 1, &["medications"]))
                .await
                .unwrap();
        }
    }
    let started = unix_now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    // Lookups at vest, across the regions: most allowed, some refused, some emergency.
    for worker in 0..2u64 {
        let doctor = world.client(ORG_A, vest).await;
        let researcher = world
            .client_as(ORG_A, vest, |t| t.purpose = "HRESCH".into())
            .await;
        let emergency = world
            .client_as(ORG_A, vest, |t| {
                t.purpose = "ETREAT".into();
                t.care_relationship = false;
            })
            .await;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut i = worker;
            while !stop.load(Ordering::SeqCst) {
                let p = patient_id(i % 300);
                let _ = match i % 20 {
                    0 | 10 => researcher.lookup(lookup(&p)).await,
                    7 => emergency.lookup(lookup(&p)).await,
                    _ => doctor.lookup(lookup(&p)).await,
                };
                i += 2;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    // Writes at vest, some to followed patients.
    {
        let writer = world.client(ORG_A, vest).await;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let p = patient_id(u64::from(n % 30) * 3);
                let categories: &[&str] = if (n / 30).is_multiple_of(2) {
                    &["medications"]
                } else {
                    &["medications", "lab-results"]
                };
                let _ = writer.upsert(pointer(&p, ORG_A, 2, categories)).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // A subscriber following ten patients, pulling every second.
    {
        let gp = world.client(ORG_C, vest).await;
        let followed: Vec<v1::PatientIdentifier> = (0..10).map(|i| patient_id(i * 3)).collect();
        let sub = gp
            .subscribe(v1::SubscribeRequest {
                patients: followed,
                ..Default::default()
            })
            .await
            .unwrap()
            .subscription
            .unwrap();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut after, mut waited) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                // With a region down, deliveries wait for its protections.
                match gp.pull_events(&sub.id, after, 100).await {
                    Ok(page) => after = page.events.last().map(|e| e.number).unwrap_or(after),
                    Err(_) => waited += 1,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            assert!(after > 20, "events delivered: {after}");
            eprintln!("{after} events delivered; {waited} pulls waited for a region");
        }));
    }

    tokio::time::sleep(REGION_DOWN_AT).await;
    let (_, nord) = nodes.pop().unwrap();
    nord.stop().await;
    tokio::time::sleep(ROTATION_AT - REGION_DOWN_AT).await;
    pil_node::patient_keys::rotate_ring_file(&configs[0].keys.pseudonym_key_file).unwrap();
    world
        .client(OPERATOR, vest)
        .await
        .reload_legal_config()
        .await
        .unwrap();
    tokio::time::sleep(RUN - ROTATION_AT).await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    // The last scrapes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended = unix_now();

    let out = package_dir().join("../docs/monitoring/dashboard.svg");
    let status = Command::new("python3")
        .arg(package_dir().join("monitoring/draw-dashboard.py"))
        .arg("--prometheus")
        .arg(format!("http://{}", prometheus.addr))
        .arg("--dashboard")
        .arg(package_dir().join("../docs/monitoring/pil-dashboard.json"))
        .arg("--start")
        .arg(format!("{started:.0}"))
        .arg("--end")
        .arg(format!("{ended:.0}"))
        .args(["--instance", "vest", "--skip", "PostgreSQL"])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run draw-dashboard.py");
    assert!(status.success());
    eprintln!("drew {}", out.display());
    drop(prometheus);
    for (_, node) in nodes {
        node.stop().await;
    }
}
