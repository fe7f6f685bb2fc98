//! The `pil-node` command line. The binary is a thin wrapper over [`main`], so the
//! test harness can run the very same entry point as a child process.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    config::{LogFormat, NodeConfig},
    demo, pki, server, telemetry,
};

#[derive(Parser)]
#[command(
    name = "pil-node",
    version,
    about = "A regional PIL (patient information locator) node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum KeyStep {
    /// Add a new key to the ring as staged: read from the next reload, not yet
    /// written. In a region of several nodes on one database, stage and reload every
    /// node before rotating any.
    Stage {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
    },
    /// Put the staged key in force (a new one when none is staged); the key in force
    /// becomes an earlier key. Reload the node next (SIGHUP or `pil policy reload`):
    /// it moves every patient to the new key in the background while serving.
    Rotate {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
    },
    /// Follow the running node's re-keying until it is done, with a progress bar.
    Progress {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
        /// Print the state once as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Retire the earlier keys once re-keying is done: the registry is no longer read
    /// under them; audit search by patient still is. Reload the node next.
    Retire {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from a configuration file.
    Serve {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
        /// Override the listen address.
        #[arg(long, env = "PIL_LISTEN")]
        listen: Option<SocketAddr>,
        /// Override the data directory.
        #[arg(long, env = "PIL_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Override the log format.
        #[arg(long, env = "PIL_LOG_FORMAT")]
        log_format: Option<LogFormat>,
    },
    /// Check a configuration and everything it names (keys and their file modes,
    /// certificates, the token issuer's keys, peers, the legal configuration) without
    /// starting a node or touching its data directory; prints every problem found.
    CheckConfig {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
    },
    /// Create or upgrade the PostgreSQL schema the configuration names (run once per
    /// region before its nodes start, and after upgrading them). RocksDB needs nothing:
    /// its data directory is upgraded when opened.
    Migrate {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
    },
    /// Make this node's witness key (`[witness] key_file`) if it does not exist, and
    /// print its verifier key: give that to the regions whose logs it witnesses (their
    /// `[[audit.witnesses]] key`) and to their auditors.
    WitnessKey {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
    },
    /// What a running node is doing: version, storage, audit log, peers, queues, keys.
    /// Asks the node through its control socket in the data directory, so it runs on
    /// the node's machine as the node's user.
    Status {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take a consistent backup of a running node's store into a new directory (the
    /// node keeps serving). Keys are not in it: back them up apart (see the operator
    /// guide). PostgreSQL regions use the database's own tools instead.
    Backup {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
        /// A new (or empty) directory for the backup.
        #[arg(long)]
        to: PathBuf,
        /// Print the backup's manifest as JSON instead of a progress bar and summary.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a stopped node's data directory. Records written after
    /// the backup are lost; the node says so when it next starts.
    Restore {
        /// The node's TOML configuration.
        #[arg(long, env = "PIL_CONFIG")]
        config: PathBuf,
        /// The backup directory (as `pil-node backup --to` made it).
        #[arg(long)]
        from: PathBuf,
        /// Move a data directory that holds data aside (it is kept, renamed) instead
        /// of refusing.
        #[arg(long)]
        replace: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the pseudonym key: stage a key, put it in force, follow the re-keying,
    /// retire the old key. See the operator guide.
    PseudonymKey {
        #[command(subcommand)]
        step: KeyStep,
    },
    /// Generate a development PKI: CA, node certificate, organization certificates, and
    /// a development token issuer (signing key and JWKS) for `[auth]`.
    DevPki {
        /// Output directory (an existing CA there is reused).
        #[arg(long)]
        out: PathBuf,
        /// Region id the node certificate is for.
        #[arg(long, default_value = "demo")]
        region: String,
        /// Organization certificate to issue, as ORGNR=NAME (repeatable).
        #[arg(long = "org", value_parser = parse_org)]
        orgs: Vec<(String, String)>,
    },
    /// Start three federated regions with synthetic data spread across them, and print
    /// how to query them.
    Demo {
        /// Where the demo keeps its PKI, keys, configuration, profiles and data (one
        /// directory per region).
        #[arg(long, default_value = "pil-demo")]
        dir: PathBuf,
        /// Listen address of the first region; the others use the next ports.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Number of synthetic patients.
        #[arg(long, default_value_t = 5000)]
        patients: u64,
        /// Prepare and load, then exit instead of serving.
        #[arg(long)]
        no_serve: bool,
    },
}

fn parse_org(s: &str) -> Result<(String, String), String> {
    let (n, name) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ORGNR=NAME, got {s:?}"))?;
    pil_proto::ident::OrgNumber::parse(n).map_err(|e| e.to_string())?;
    Ok((n.to_string(), name.to_string()))
}

/// Runs the command line; the binary's `main`. A failure is one line on stderr (no
/// backtrace, whatever `RUST_BACKTRACE` says) and a non-zero exit.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pil-node")
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", pil_proto::error_line::one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            log_format,
        } => {
            let mut cfg = NodeConfig::load(&config)?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(f) = log_format {
                cfg.log.format = f;
            }
            telemetry::init(cfg.log.format, &cfg.log.filter);
            let node = server::start(cfg).await?;
            reload_on_sighup(node.signal_reload());
            node.run_until(shutdown_signal()).await?;
        }
        Command::CheckConfig { config } => {
            let cfg = NodeConfig::load(&config)?;
            match crate::server::preflight::check(&cfg, cfg.listen.port()).await {
                Ok(checked) => println!(
                    "{} is valid: region {}, {} policies in force, {} peers",
                    config.display(),
                    cfg.region,
                    checked.access.legal().summary().policies,
                    cfg.federation.peers.len()
                ),
                Err(problems) => {
                    for p in &problems {
                        eprintln!("error: {}", pil_proto::error_line::one_line(p));
                    }
                    anyhow::bail!("{}: {} problem(s) found", config.display(), problems.len());
                }
            }
        }
        Command::Migrate { config } => {
            let cfg = NodeConfig::load(&config)?;
            match &cfg.storage.postgres {
                Some(pg) if cfg.storage.engine == crate::config::Engine::Postgres => {
                    let version = crate::store::postgres::migrate(&pg.engine_config()).await?;
                    println!("database schema at version {version}");
                }
                _ => println!(
                    "nothing to migrate: the RocksDB engine upgrades its data directory when \
                     it opens it"
                ),
            }
        }
        Command::WitnessKey { config } => {
            let cfg = NodeConfig::load(&config)?;
            let w = cfg
                .witness
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("{}: no [witness] section", config.display()))?;
            if !w.key_file.exists() {
                pil_transparency::HeadSigner::write_new(&w.key_file)?;
                eprintln!("made {}", w.key_file.display());
            }
            let keys = crate::witness::WitnessKeys::load(w).map_err(anyhow::Error::msg)?;
            println!("{}", keys.vkey());
        }
        Command::Status { config, json } => status(&NodeConfig::load(&config)?, json).await?,
        Command::Backup { config, to, json } => {
            backup(&NodeConfig::load(&config)?, &to, json).await?
        }
        Command::Restore {
            config,
            from,
            replace,
            json,
        } => restore(&NodeConfig::load(&config)?, &from, replace, json).await?,
        Command::PseudonymKey { step } => pseudonym_key(step).await?,
        Command::DevPki { out, region, orgs } => {
            let orgs: Vec<(&str, &str)> =
                orgs.iter().map(|(n, m)| (n.as_str(), m.as_str())).collect();
            let files = pki::write_dev_pki(&out, &region, &orgs)?;
            println!("CA:   {}", files.ca_cert.display());
            println!(
                "node: {} ({})",
                files.node_cert.display(),
                files.node_key.display()
            );
            for o in &files.orgs {
                println!(
                    "org {}: {} ({})",
                    o.org_number,
                    o.cert.display(),
                    o.key.display()
                );
            }
            let (audit_key, audit_public) = crate::audit::write_signing_key(&out.join("audit"))?;
            println!(
                "audit log signing key: {} (public key for auditors: {})",
                audit_key.display(),
                audit_public.display()
            );
            let (key, jwks) = demo::write_dev_issuer(&out.join("issuer"))?;
            println!(
                "token issuer {}: {} (signing key {})",
                demo::DEV_ISSUER,
                jwks.display(),
                key.display()
            );
        }
        Command::Demo {
            dir,
            listen,
            patients,
            no_serve,
        } => {
            telemetry::init(LogFormat::Human, "info");
            let setups = demo::prepare_regions(&dir, listen)?;
            let mut nodes = Vec::new();
            for setup in &setups {
                nodes.push(server::start(setup.config.clone()).await?);
            }
            let data = demo::data_set(patients, 2032);
            let mut per_region: Vec<Vec<pil_proto::v1::Pointer>> =
                vec![Vec::new(); demo::DEMO_REGIONS.len()];
            for (i, p) in data.iter().enumerate() {
                let value = p.patient.as_ref().map(|p| p.value.as_str()).unwrap_or("");
                per_region[demo::region_of(i, value)].push(p.clone());
            }
            let mut loaded = Vec::new();
            for (node, pointers) in nodes.iter().zip(&per_region) {
                loaded.push(demo::load(node.registry(), pointers).await?);
            }
            let sample = demo::showcase_patient(&data)
                .or_else(|| {
                    data.first()
                        .and_then(|p| p.patient.as_ref())
                        .map(|p| p.value.clone())
                })
                .unwrap_or_default();
            let pil = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("pil")))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "pil".into());
            println!();
            println!(
                "PIL demo: {} regions federated with each other, {} synthetic patients, {} pointers",
                setups.len(),
                patients,
                data.len()
            );
            for ((setup, node), (pointers, (inserted, unchanged))) in setups
                .iter()
                .zip(&nodes)
                .zip(per_region.iter().zip(&loaded))
            {
                println!(
                    "  {} on https://{}: {} pointers ({inserted} new, {unchanged} already there)",
                    setup.config.region,
                    node.addr(),
                    pointers.len()
                );
                println!("    configuration:  {}", shown(&setup.config_path));
                println!(
                    "    audit public key: {}",
                    shown(&setup.dir.join("audit").join("public-key.pem"))
                );
                println!("    client profiles:");
                for (org, path) in &setup.profiles {
                    let (hpr, profession) = org.professional;
                    println!(
                        "      {:<24} {} ({profession}, HPR {hpr})",
                        org.name,
                        shown(path)
                    );
                }
            }
            // Profiles of the first region: the hospital runs the node (operator role),
            // the vendor's privacy officer audits it (auditor role), the GP is a doctor
            // and the municipality's home nursing a nurse.
            let first = &setups[0];
            let profile = |i: usize| shown(&first.profiles[i].1);
            let (operator, nurse, doctor, auditor) =
                (profile(0), profile(1), profile(2), profile(4));
            let public_key = shown(&first.dir.join("audit").join("public-key.pem"));
            println!();
            println!(
                "Try (a lookup at the home region answers for every region; patient {sample} has \
                 pointers in several regions, one of them to a sensitive category):"
            );
            println!("  {pil} --profile {doctor} lookup --patient {sample}");
            println!("  {pil} --profile {nurse} lookup --patient {sample}");
            println!("  {pil} --profile {doctor} lookup --patient {sample} --home-region-only");
            println!("  {pil} --profile {doctor} lookup --patient {sample} --json");
            println!("  {pil} --profile {doctor} policy explain --patient {sample}");
            println!("  {pil} --profile {operator} peers");
            println!(
                "  {pil} --profile {doctor} export --organization {} --out export.ndjson",
                first.profiles[2].0.number
            );
            println!();
            println!(
                "Audit (profile {auditor} holds the auditor role in every region; each \
                 region's audit public key is listed above):"
            );
            println!("  {pil} --profile {auditor} audit search --patient {sample}");
            println!("  {pil} --profile {auditor} audit patient-report --patient {sample}");
            println!(
                "  {pil} --profile {auditor} audit verify --public-key {public_key} --sign-now"
            );
            println!();
            if no_serve {
                for node in nodes {
                    node.shutdown().await?;
                }
            } else {
                println!("Press ctrl-c to stop.");
                shutdown_signal().await;
                tracing::info!("shutting down");
                for node in nodes {
                    node.shutdown().await?;
                }
            }
        }
    }
    Ok(())
}

/// A byte count for people.
fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A progress bar of bytes, or nothing when the output is for a program.
fn byte_bar(hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    bar(
        0,
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
    )
}

/// A progress bar of `len` steps drawn by `template`.
fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// The running node's status, asked through its control socket.
async fn node_status(cfg: &NodeConfig) -> anyhow::Result<pil_proto::v1::StatusResponse> {
    let mut control = crate::control::connect(&cfg.data_dir).await?;
    Ok(control
        .status(pil_proto::v1::StatusRequest {})
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner())
}

async fn status(cfg: &NodeConfig, json: bool) -> anyhow::Result<()> {
    let s = node_status(cfg).await?;
    if json {
        let queue = |q: Option<pil_proto::v1::QueueStatus>| {
            let q = q.unwrap_or_default();
            serde_json::json!({"waiting": q.waiting, "groups": q.groups, "items": q.items})
        };
        let audit = s.audit.clone().unwrap_or_default();
        let started = s
            .started_at
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let out = serde_json::json!({
            "version": s.version,
            "region": s.region,
            "engine": s.engine,
            "started_at": started,
            "data_dir_bytes": s.data_dir_bytes,
            "figures": s.figures.iter().map(|f| (f.name.clone(), f.value)).collect::<std::collections::BTreeMap<_, _>>(),
            "audit": {
                "records": audit.records,
                "signed": audit.signed,
                "newest_head": audit.newest_head,
                "signing_key_id": audit.signing_key_id,
            },
            "peers": s.peers.iter().map(|p| serde_json::json!({"region": p.region, "circuit": p.circuit})).collect::<Vec<_>>(),
            "writer": queue(s.writer),
            "audit_queue": queue(s.audit_queue),
            "policies": s.policies,
            "certificate": {"sha256": s.cert_sha256, "not_after": s.cert_not_after},
            "issuer_key_ids": s.issuer_key_ids,
            "restored": (!s.restored.is_empty()).then_some(&s.restored),
            "pseudonym_keys": s.pseudonym_keys.as_ref().map(|k| serde_json::json!({
                "key": k.key, "earlier": k.earlier, "staged": k.staged, "retired": k.retired,
                "state": k.state, "progress": k.progress, "patients_moved": k.patients_moved,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let audit = s.audit.unwrap_or_default();
    println!(
        "pil-node {} serving region {} on {}",
        s.version, s.region, s.engine
    );
    if let Some(t) = &s.started_at {
        println!("  started        {t}");
    }
    println!(
        "  data directory {} ({})",
        cfg.data_dir.display(),
        bytes(s.data_dir_bytes)
    );
    for f in &s.figures {
        let value = if f.name.ends_with("_bytes") {
            bytes(f.value)
        } else {
            f.value.to_string()
        };
        println!("    {:<26} {value}", f.name);
    }
    println!(
        "  audit log      {} records, {} under the newest signed head ({} awaiting the next), heads signed by key {}",
        audit.records,
        audit.signed,
        audit.records.saturating_sub(audit.signed),
        audit.signing_key_id
    );
    for (name, q) in [("writer", s.writer), ("audit queue", s.audit_queue)] {
        let q = q.unwrap_or_default();
        let mean = if q.groups == 0 {
            0.0
        } else {
            q.items as f64 / q.groups as f64
        };
        println!(
            "  {name:<14} {} waiting; {} group commits so far, {mean:.1} per group",
            q.waiting, q.groups
        );
    }
    if s.peers.is_empty() {
        println!("  peers          none");
    }
    for p in &s.peers {
        println!("  peer           {} (circuit {})", p.region, p.circuit);
    }
    println!("  legal config   {} policies in force", s.policies);
    println!(
        "  certificate    sha256 {} valid until {}",
        s.cert_sha256, s.cert_not_after
    );
    println!("  issuer keys    {}", s.issuer_key_ids.join(", "));
    if let Some(k) = &s.pseudonym_keys {
        let others = [
            ("earlier", &k.earlier),
            ("staged", &k.staged),
            ("retired", &k.retired),
        ]
        .iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(what, ids)| format!(", {what} {}", ids.join(" ")))
        .collect::<String>();
        println!("  pseudonym key  {}{others}", k.key);
        if k.state == "moving" {
            println!(
                "  re-keying      pass {}, {:.0}% walked, {} patients moved",
                k.pass,
                k.progress * 100.0,
                k.patients_moved
            );
        } else if !k.detail.is_empty() {
            println!("  re-keying      {}: {}", k.state, k.detail);
        }
    }
    if !s.restored.is_empty() {
        println!("  restored       {}", s.restored);
    }
    Ok(())
}

async fn pseudonym_key(step: KeyStep) -> anyhow::Result<()> {
    use crate::patient_keys::{retire_ring_file, rotate_ring_file, stage_ring_file};
    let reload = "reload the node next (SIGHUP, or `pil policy reload`)";
    match step {
        KeyStep::Stage { config } => {
            let cfg = NodeConfig::load(&config)?;
            let change = stage_ring_file(&cfg.keys.pseudonym_key_file)?;
            println!(
                "key {} staged beside {} in force; {reload}",
                change.changed[0], change.current
            );
        }
        KeyStep::Rotate { config } => {
            let cfg = NodeConfig::load(&config)?;
            let change = rotate_ring_file(&cfg.keys.pseudonym_key_file)?;
            println!(
                "key {} in force, {} now an earlier key; {reload}, then follow it with \
                 `pil-node pseudonym-key progress`",
                change.current, change.changed[0]
            );
        }
        KeyStep::Retire { config } => {
            let cfg = NodeConfig::load(&config)?;
            let keys = rekey_status(&cfg).await?;
            if keys.state != "done" || keys.unidentified > 0 {
                anyhow::bail!(
                    "re-keying is not done (state {}: {}); earlier keys are still needed",
                    keys.state,
                    keys.detail
                );
            }
            let change = retire_ring_file(&cfg.keys.pseudonym_key_file)?;
            println!(
                "retired {}; audit search by patient still uses them; {reload}",
                change.changed.join(", ")
            );
        }
        KeyStep::Progress { config, json } => {
            let cfg = NodeConfig::load(&config)?;
            if json {
                let s = rekey_status(&cfg).await?;
                let out = serde_json::json!({
                    "key": s.key, "earlier": s.earlier, "staged": s.staged, "retired": s.retired,
                    "state": s.state, "pass": s.pass, "progress": s.progress,
                    "patients_seen": s.patients_seen, "patients_moved": s.patients_moved,
                    "pointers_moved": s.pointers_moved, "protections_moved": s.protections_moved,
                    "unidentified": s.unidentified, "detail": s.detail,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            let bar = bar(1000, "{msg} [{bar:40}] {percent}% ({elapsed}, {eta} left)");
            loop {
                let s = rekey_status(&cfg).await?;
                bar.set_position((s.progress * 1000.0) as u64);
                bar.set_message(format!(
                    "pass {}: {} patients moved, {} pointers",
                    s.pass, s.patients_moved, s.pointers_moved
                ));
                if s.state != "moving" {
                    bar.finish_and_clear();
                    println!("re-keying {} (key {}): {}", s.state, s.key, s.detail);
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

async fn rekey_status(cfg: &NodeConfig) -> anyhow::Result<pil_proto::v1::PseudonymKeyStatus> {
    Ok(node_status(cfg).await?.pseudonym_keys.unwrap_or_default())
}

async fn backup(cfg: &NodeConfig, to: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let to = std::path::absolute(to).with_context(|| format!("{}", to.display()))?;
    let mut control = crate::control::connect(&cfg.data_dir).await?;
    let mut steps = control
        .backup(pil_proto::v1::BackupRequest {
            directory: to.display().to_string(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    let bar = byte_bar(json);
    bar.set_message("copying");
    use pil_proto::v1::backup_response::Step;
    loop {
        let step = steps
            .message()
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        match step.and_then(|s| s.step) {
            Some(Step::Progress(p)) => {
                bar.set_length(p.total_bytes);
                bar.set_position(p.copied_bytes);
            }
            Some(Step::Done(done)) => {
                bar.finish_and_clear();
                if json {
                    println!("{}", done.manifest_json);
                } else {
                    let m: crate::store::backup::Manifest =
                        serde_json::from_str(&done.manifest_json)?;
                    println!(
                        "backup of region {} in {}: {} files, {}, taken at {}, holding at                          least the {} audit records of the head signed before it",
                        m.region,
                        to.display(),
                        m.files.len(),
                        bytes(m.files.iter().map(|f| f.bytes).sum()),
                        m.taken_at,
                        m.signed_size
                    );
                    println!(
                        "the keys are not in it: keep the pseudonym, storage, TLS and audit                          signing keys backed up apart"
                    );
                }
                return Ok(());
            }
            None => anyhow::bail!("the node ended the backup without finishing it"),
        }
    }
}

async fn restore(
    cfg: &NodeConfig,
    from: &std::path::Path,
    replace: bool,
    json: bool,
) -> anyhow::Result<()> {
    use crate::store::backup;
    if cfg.storage.engine != crate::config::Engine::Rocksdb {
        anyhow::bail!(
            "this node stores in PostgreSQL: restore the database with its own tools (see              the operator guide, \"Backups\")"
        );
    }
    if crate::control::connect(&cfg.data_dir).await.is_ok() {
        anyhow::bail!(
            "the node is running on {}; stop it before restoring",
            cfg.data_dir.display()
        );
    }
    let from = std::path::absolute(from).with_context(|| format!("{}", from.display()))?;
    let manifest = backup::read_manifest(&from, &cfg.region)?;
    let bar = byte_bar(json);
    bar.set_message("restoring");
    let progress = bar.clone();
    let moved = backup::restore_files(
        from.clone(),
        manifest.clone(),
        cfg.data_dir.clone(),
        replace,
        move |copied, total| {
            progress.set_length(total);
            progress.set_position(copied);
        },
    )
    .await?;
    bar.finish_and_clear();
    // Opening checks the restored log against the newest head it holds.
    let (store, closer) = server::open_store(cfg).await?;
    let size = store.audit_size().await?;
    drop(store);
    closer.close().await;
    if size.size < manifest.signed_size {
        anyhow::bail!(
            "the restored audit log holds {} records, fewer than the {} its backup's head              covers; the backup is damaged",
            size.size,
            manifest.signed_size
        );
    }
    let note = backup::RestoredNote {
        backup: from.display().to_string(),
        taken_at: manifest.taken_at.clone(),
        restored_at: backup::now_rfc3339(),
        records: size.size,
        signed_size: size.signed,
    };
    backup::leave_note(&cfg.data_dir, &note)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "restored": cfg.data_dir.display().to_string(),
                "backup": note.backup,
                "taken_at": note.taken_at,
                "audit_records": note.records,
                "moved_aside": moved.map(|m| m.display().to_string()),
            })
        );
    } else {
        println!(
            "restored {} from the backup taken at {}: {} audit records",
            cfg.data_dir.display(),
            note.taken_at,
            note.records
        );
        if let Some(moved) = moved {
            println!(
                "the data directory it replaces is kept as {}",
                moved.display()
            );
        }
        println!(
            "records written after the backup are lost; the node announces this when it              starts, since its peers and auditors may hold newer heads"
        );
    }
    Ok(())
}

/// A path as the user would type it: relative to where they stand when it is below
/// it, else absolute.
fn shown(path: &std::path::Path) -> String {
    let cwd = std::env::current_dir().ok();
    cwd.as_deref()
        .and_then(|cwd| path.strip_prefix(cwd).ok())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Reloads the configuration on SIGHUP; anything invalid leaves all of it as it was.
fn reload_on_sighup(reload: crate::reload::SignalReload) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match reload.run().await {
                Ok(r) => tracing::info!(detail = %r.describe(), "configuration reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "configuration reload refused; everything in force before stays"
                ),
            }
        }
    });
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
