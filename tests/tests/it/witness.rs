//! Witnessed audit heads (c2sp.org/tlog-witness): the regions cosign each other's
//! heads over HTTP `add-checkpoint`, a head is published once the quorum cosigned
//! it, and a log rebuilt under the same key is caught at its next head.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use pil_node::config::{NodeConfig, WitnessConfig, WitnessEndpoint, WitnessedLog};
use pil_tests::*;
use pil_transparency::{
    Cosigner, HeadSigner, Quorum, TreeHead,
    witness::{AddCheckpoint, SIZE_CONTENT_TYPE},
};
use serde_json::Value;

use crate::{
    audit::{fails, ok},
    pil,
};

/// Every region witnesses every other's log, and asks all the others to cosign.
struct Witnessing {
    regions: Vec<String>,
    ports: HashMap<String, u16>,
    vkeys: HashMap<String, String>,
}

fn region_dir(world: &World, region: &str) -> PathBuf {
    world.path().join("regions").join(region)
}

fn witness_name(region: &str) -> String {
    format!("witness.{region}.pil.test")
}

impl Witnessing {
    fn prepare(world: &World, regions: &[&str]) -> Self {
        let mut ports = HashMap::new();
        let mut vkeys = HashMap::new();
        for r in regions {
            let dir = region_dir(world, r);
            pil_node::audit::write_signing_key(&dir.join("audit")).expect("audit key");
            let key = dir.join("witness.key");
            let signer = if key.exists() {
                HeadSigner::load(&key).unwrap()
            } else {
                HeadSigner::write_new(&key).unwrap()
            };
            let cosigner = Cosigner::new(witness_name(r), signer).unwrap();
            vkeys.insert(r.to_string(), cosigner.key().to_vkey());
            ports.insert(r.to_string(), free_port());
        }
        Self {
            regions: regions.iter().map(|r| r.to_string()).collect(),
            ports,
            vkeys,
        }
    }

    fn others<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.regions.iter().filter(move |r| *r != region)
    }

    fn apply(&self, world: &World, region: &str, config: &mut NodeConfig) {
        config.witness = Some(WitnessConfig {
            listen: self.addr(region),
            name: witness_name(region),
            key_file: region_dir(world, region).join("witness.key"),
            logs: self
                .others(region)
                .map(|o| WitnessedLog {
                    origin: format!("pil-audit/{o}"),
                    key_file: region_dir(world, o).join("audit").join("public-key.pem"),
                })
                .collect(),
        });
        config.audit.witnesses = self
            .others(region)
            .map(|o| WitnessEndpoint {
                key: self.vkeys[o].clone(),
                url: format!("http://{}", self.addr(o)),
            })
            .collect();
        config.audit.witness_quorum = None;
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    }

    fn addr(&self, region: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[region]))
    }

    /// `--witness <vkey>` for each of `region`'s witnesses.
    fn args(&self, region: &str) -> Vec<String> {
        self.others(region)
            .flat_map(|o| ["--witness".to_string(), self.vkeys[o].clone()])
            .collect()
    }

    fn quorum(&self, region: &str) -> Quorum {
        let witnesses: Vec<_> = self
            .others(region)
            .map(|o| pil_transparency::CosignerKey::parse_vkey(&self.vkeys[o]).unwrap())
            .collect();
        Quorum {
            needed: witnesses.len(),
            witnesses,
        }
    }
}

async fn start(world: &World, witnessing: &Witnessing, region: &str) -> TestNode {
    let mut config = world.region_config(region);
    witnessing.apply(world, region, &mut config);
    TestNode::start(config).await
}

async fn some_lookups(world: &World, node: &TestNode, n: u64) {
    let doctor = world.client(ORG_A, node.addr()).await;
    for i in 0..n {
        doctor.lookup(lookup(&patient_id(i))).await.unwrap();
    }
}

fn pil_args(profile: &std::path::Path, args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pil(profile, &args)
}

/// `POST /add-checkpoint` to a witness: the status, the content type and the body.
async fn add_checkpoint(addr: SocketAddr, body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /add-checkpoint HTTP/1.1\r\nHost: witness\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    (status, content_type, body.to_string())
}

async fn metrics_text(node: &TestNode) -> String {
    http_get(node.node.metrics_addr().unwrap(), "/metrics")
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_head_is_cosigned_by_the_other_regions_and_checked_against_the_quorum() {
    let world = World::new();
    let regions = ["vest", "midt", "nord"];
    let witnessing = Witnessing::prepare(&world, &regions);
    let mut nodes = Vec::new();
    for r in regions {
        nodes.push(start(&world, &witnessing, r).await);
    }
    let vest = &nodes[0];
    some_lookups(&world, vest, 5).await;
    let auditor = world.client(HOST, vest.addr()).await;
    let head = auditor.audit_tree_head(true).await.unwrap();
    let check = witnessing.quorum("vest").check(&head.note).unwrap();
    assert!(check.met(), "{check:?}\n{}", head.note);
    assert_eq!(check.cosigned.len(), 2);

    // The command line checks the quorum against the keys the auditor holds.
    let profile = world.profile(HOST, vest.addr());
    let key = region_dir(&world, "vest")
        .join("audit")
        .join("public-key.pem");
    let mut args: Vec<String> = ["--json", "audit", "head", "--sign-now", "--public-key"]
        .map(String::from)
        .into();
    args.push(key.display().to_string());
    args.extend(witnessing.args("vest"));
    let shown: Value = serde_json::from_str(&ok(pil_args(&profile, &args))).unwrap();
    assert_eq!(shown["witnesses"]["published"], true, "{shown}");
    assert_eq!(
        shown["witnesses"]["cosigned_by"].as_array().unwrap().len(),
        2
    );
    let mut verify: Vec<String> = ["--json", "audit", "verify", "--public-key"]
        .map(String::from)
        .into();
    verify.push(key.display().to_string());
    verify.extend(witnessing.args("vest"));
    let report: Value = serde_json::from_str(&ok(pil_args(&profile, &verify))).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    assert!(report["published_size"].as_u64().unwrap() >= head.size);

    // A witness the node does not ask never cosigns: with it in the quorum, the head
    // is not published, and the command says so once.
    let stranger = Cosigner::new("witness.elsewhere", HeadSigner::generate()).unwrap();
    let mut strict: Vec<String> = ["audit", "head", "--witness"].map(String::from).into();
    strict.push(stranger.key().to_vkey());
    strict.extend(witnessing.args("vest"));
    let err = fails(pil_args(&profile, &strict));
    assert!(err.contains("NOT published"), "{err}");
    assert!(err.contains("not cosigned by witness.elsewhere"), "{err}");

    // Each witness counted what it cosigned; the node, what was published.
    let midt = metrics_text(&nodes[1]).await;
    assert!(
        midt.contains("pil_witness_cosigned_total{log=\"pil-audit/vest\"}"),
        "{midt}"
    );
    let vest_metrics = metrics_text(vest).await;
    assert!(
        vest_metrics.contains("pil_audit_cosignature_requests_total{witness=\"witness.midt.pil.test\",outcome=\"cosigned\"}"),
        "{vest_metrics}"
    );
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_rebuilt_under_the_same_key_is_caught_by_its_witnesses() {
    let world = World::new();
    let regions = ["vest", "midt", "nord"];
    let witnessing = Witnessing::prepare(&world, &regions);
    let vest = start(&world, &witnessing, "vest").await;
    let midt = start(&world, &witnessing, "midt").await;
    let nord = start(&world, &witnessing, "nord").await;
    some_lookups(&world, &vest, 8).await;
    let auditor = world.client(HOST, vest.addr()).await;
    let real = auditor.audit_tree_head(true).await.unwrap();
    assert!(witnessing.quorum("vest").check(&real.note).unwrap().met());
    drop(auditor);
    vest.stop().await;

    // The operator replaces the log: same signing key, a new store, another history.
    let mut config = world.region_config("vest");
    witnessing.apply(&world, "vest", &mut config);
    config.data_dir = region_dir(&world, "vest").join("rebuilt");
    config.storage = world.storage_for("vest-rebuilt");
    let rebuilt = TestNode::start(config).await;
    some_lookups(&world, &rebuilt, 3).await;
    let auditor = world.client(HOST, rebuilt.addr()).await;
    let forged = auditor.audit_tree_head(true).await.unwrap();
    let check = witnessing.quorum("vest").check(&forged.note).unwrap();
    assert!(check.cosigned.is_empty(), "no witness cosigned: {check:?}");

    // The auditor holding the witnesses' keys sees it is not published.
    let profile = world.profile(HOST, rebuilt.addr());
    let mut args: Vec<String> = ["audit", "head"].map(String::from).into();
    args.extend(witnessing.args("vest"));
    let err = fails(pil_args(&profile, &args));
    assert!(err.contains("NOT published"), "{err}");

    // Both witnesses raised the alarm: a metric, and a record in their own logs
    // holding the checkpoint as evidence.
    for witness in [&midt, &nord] {
        let metrics = metrics_text(witness).await;
        assert!(
            metrics.contains("pil_witness_alarms_total{log=\"pil-audit/vest\""),
            "{metrics}"
        );
        let host = world.client(HOST, witness.addr()).await;
        host.audit_tree_head(true).await.unwrap();
        let records = read_records(&host).await;
        let alarm = records
            .iter()
            .find(|r| r["action"] == "witness_alarm")
            .expect("an alarm record");
        let detail = alarm["detail"].as_str().unwrap();
        assert!(detail.starts_with("pil-audit/vest: "), "{detail}");
        assert!(
            detail.contains("the checkpoint: \"pil-audit/vest\\n"),
            "{detail}"
        );
    }
    // The witnesses still hold the real log's size, not the rebuilt one's.
    let (status, content_type, body) = add_checkpoint(
        witnessing.addr("midt"),
        &AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint: forged.note.clone(),
        }
        .to_body(),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(content_type, SIZE_CONTENT_TYPE);
    // The real log's last head (its final one at shutdown, over this head's access
    // record, or this head).
    let held: u64 = body.trim_end().parse().unwrap();
    assert!(held >= real.size, "{held} < {}", real.size);
    for node in [rebuilt, midt, nord] {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_witness_keeps_what_it_cosigned_across_a_restart_and_refuses_a_fork() {
    let world = World::new();
    let regions = ["vest", "midt"];
    let witnessing = Witnessing::prepare(&world, &regions);
    let vest = start(&world, &witnessing, "vest").await;
    let midt = start(&world, &witnessing, "midt").await;
    some_lookups(&world, &vest, 4).await;
    let auditor = world.client(HOST, vest.addr()).await;
    let first = auditor.audit_tree_head(true).await.unwrap();
    assert!(witnessing.quorum("vest").check(&first.note).unwrap().met());

    midt.stop().await;
    let midt = start(&world, &witnessing, "midt").await;
    // Restarted, it still holds the size it cosigned.
    let (status, _, body) = add_checkpoint(
        witnessing.addr("midt"),
        &AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint: first.note.clone(),
        }
        .to_body(),
    )
    .await;
    assert_eq!((status, body), (409, format!("{}\n", first.size)));

    // A head of the same size with another root, signed by the log's own key, is a
    // fork: refused, never cosigned.
    let signer = HeadSigner::load(
        region_dir(&world, "vest")
            .join("audit")
            .join("signing-key.pem"),
    )
    .unwrap();
    let fork = signer
        .sign(TreeHead {
            origin: "pil-audit/vest".into(),
            size: first.size,
            root: [9; 32],
            timestamp_ms: u64::MAX / 2,
        })
        .unwrap()
        .to_note()
        .unwrap();
    let (status, _, body) = add_checkpoint(
        witnessing.addr("midt"),
        &AddCheckpoint {
            old_size: first.size,
            proof: Vec::new(),
            checkpoint: fork,
        }
        .to_body(),
    )
    .await;
    assert_eq!((status, body), (409, format!("{}\n", first.size)));
    let metrics = metrics_text(&midt).await;
    assert!(
        metrics.contains("pil_witness_alarms_total{log=\"pil-audit/vest\",kind=\"fork\"} 1"),
        "{metrics}"
    );
    // A checkpoint not signed by the log's key is refused as such.
    let stranger = HeadSigner::generate()
        .sign(TreeHead {
            origin: "pil-audit/vest".into(),
            size: first.size + 1,
            root: [9; 32],
            timestamp_ms: 1,
        })
        .unwrap()
        .to_note()
        .unwrap();
    let (status, _, _) = add_checkpoint(
        witnessing.addr("midt"),
        &AddCheckpoint {
            old_size: first.size,
            proof: Vec::new(),
            checkpoint: stranger,
        }
        .to_body(),
    )
    .await;
    assert_eq!(status, 403);

    // The real log goes on: its next head extends the one cosigned, and is cosigned.
    some_lookups(&world, &vest, 2).await;
    let next = auditor.audit_tree_head(true).await.unwrap();
    assert!(next.size > first.size);
    assert!(
        witnessing.quorum("vest").check(&next.note).unwrap().met(),
        "{}",
        next.note
    );
    drop(auditor);
    vest.stop().await;
    midt.stop().await;
}

/// Every record of `client`'s node, as JSON.
async fn read_records(client: &pil_client::PilClient) -> Vec<Value> {
    use futures::StreamExt;
    let mut entries = client.audit_read_log(0).await.unwrap();
    let mut out = Vec::new();
    while let Some(entry) = entries.next().await {
        let entry = entry.unwrap();
        if !entry.record.is_empty() {
            out.push(serde_json::from_slice(&entry.record).unwrap());
        }
    }
    out
}
