//! `pil audit …`: search, export, verify and prove a node's audit log. Needs an
//! organization certificate whose organization holds the auditor role; every call is
//! itself recorded in the log.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use futures::StreamExt;
use pil_proto::v1;
use pil_transparency::{CosignerKey, HeadVerifier, Quorum, QuorumCheck, SignedTreeHead};

use crate::{
    audit_record::Record,
    audit_verify::{self, LogVerifier},
    client::PilClient,
    records,
};

/// The witnesses an auditor trusts: a head counts as published once a quorum of them
/// cosigned it.
#[derive(Args, Debug, Default)]
pub struct WitnessArgs {
    /// A witness's verifier key (`<name>+<key id>+<base64 key>`, from its operator);
    /// repeat for each witness.
    #[arg(long = "witness", value_name = "VKEY")]
    keys: Vec<String>,
    /// A file of witness verifier keys, one per line (`#` starts a comment).
    #[arg(long)]
    witnesses_file: Option<PathBuf>,
    /// How many of those witnesses must have cosigned a head (default: all of them).
    #[arg(long)]
    quorum: Option<usize>,
}

impl WitnessArgs {
    /// The quorum to check, when any witness is given.
    fn quorum(&self) -> anyhow::Result<Option<Quorum>> {
        let mut lines: Vec<String> = self.keys.clone();
        if let Some(path) = &self.witnesses_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            lines.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or_default().trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
        if lines.is_empty() {
            if self.quorum.is_some() {
                bail!("--quorum needs the witnesses' keys: give --witness or --witnesses-file");
            }
            return Ok(None);
        }
        let witnesses = lines
            .iter()
            .map(|l| CosignerKey::parse_vkey(l))
            .collect::<Result<Vec<_>, _>>()?;
        let needed = self.quorum.unwrap_or(witnesses.len());
        if needed == 0 || needed > witnesses.len() {
            bail!(
                "--quorum {needed}: give a number from 1 to the {} witnesses given",
                witnesses.len()
            );
        }
        Ok(Some(Quorum { witnesses, needed }))
    }
}

/// One line on a head's cosignatures, for people.
fn describe_quorum(size: u64, check: &QuorumCheck) -> String {
    let mut line = format!(
        "head of size {size}: cosigned by {} of {} needed",
        check.cosigned.len(),
        check.needed
    );
    if !check.cosigned.is_empty() {
        let names: Vec<String> = check
            .cosigned
            .iter()
            .map(|(name, at)| {
                format!(
                    "{name} at {}",
                    records::format_time(&prost_types::Timestamp {
                        seconds: i64::try_from(*at).unwrap_or(i64::MAX),
                        nanos: 0,
                    })
                )
            })
            .collect();
        line.push_str(&format!(" ({})", names.join(", ")));
    }
    if !check.missing.is_empty() {
        line.push_str(&format!("; not cosigned by {}", check.missing.join(", ")));
    }
    if !check.invalid.is_empty() {
        line.push_str(&format!(
            "; INVALID cosignature from {}",
            check.invalid.join(", ")
        ));
    }
    line.push_str(if check.met() {
        ": published"
    } else {
        ": NOT published"
    });
    line
}

/// The JSON form of a quorum check.
fn quorum_json(check: &QuorumCheck) -> serde_json::Value {
    serde_json::json!({
        "published": check.met(),
        "needed": check.needed,
        "cosigned_by": check.cosigned.iter()
            .map(|(name, at)| serde_json::json!({"witness": name, "timestamp": at}))
            .collect::<Vec<_>>(),
        "missing": check.missing,
        "invalid": check.invalid,
    })
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Records matching a filter, newest first, a page at a time. Filter by
    /// professional and purpose with the global --hpr and --purpose.
    Search {
        #[command(flatten)]
        filter: FilterArgs,
        /// Records per page (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after a previous page (printed at its end).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Write records matching a filter, oldest first, one per line.
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        /// jsonl: the records exactly as hashed; fhir: FHIR R4 AuditEvents.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Output file; stdout when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check the whole log against the node's signed tree heads, with only its
    /// public key: every record, its position and every signed root.
    Verify {
        /// The node's tree-head public key (PEM), obtained from its operator; after
        /// a key rotation, its key history (every public key, oldest first).
        #[arg(long)]
        public_key: PathBuf,
        /// Have the node sign its current tree first, so every record is covered.
        #[arg(long)]
        sign_now: bool,
        /// The retention period of the node's legal configuration (`audit_log_days`):
        /// contents removed from records younger than this are reported as deleted.
        #[arg(long)]
        retention_days: Option<u32>,
        #[command(flatten)]
        witnesses: WitnessArgs,
    },
    /// Print or save the node's newest signed tree head (a signed note, with the
    /// witnesses' cosignatures it has).
    Head {
        /// Have the node sign its current tree first.
        #[arg(long)]
        sign_now: bool,
        /// Save the note to this file (keep it: later heads must extend it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Check the head's signature with this public key (or key history) first.
        #[arg(long)]
        public_key: Option<PathBuf>,
        #[command(flatten)]
        witnesses: WitnessArgs,
    },
    /// Prove that one record is in the signed log, and print it.
    Prove {
        /// The record's index.
        #[arg(long)]
        index: u64,
        /// The node's tree-head public key or key history (PEM).
        #[arg(long)]
        public_key: PathBuf,
        /// Prove against this saved head instead of the node's newest.
        #[arg(long)]
        head: Option<PathBuf>,
    },
    /// Prove that the log still extends a head saved earlier: nothing it covered was
    /// changed or removed.
    Consistency {
        /// The saved head (from `pil audit head --out`).
        #[arg(long)]
        from: PathBuf,
        /// The node's tree-head public key or key history (PEM).
        #[arg(long)]
        public_key: PathBuf,
        /// Save the new head here once it is proven consistent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Mark a record reviewed (an emergency access followed up, a refusal looked
    /// into), with a note; the review is itself a record (action audit_review).
    Review {
        /// The reviewed record's index.
        #[arg(long)]
        index: u64,
        /// What the review found and did.
        #[arg(long)]
        note: String,
        /// Who reviewed, as they want to be named in the record.
        #[arg(long, default_value = "")]
        reviewer: String,
    },
    /// Who looked a patient up, when and why, in every region that answers.
    PatientReport {
        /// The patient's identifier.
        #[arg(long)]
        patient: String,
        /// Identifier system OID; detected from the number when omitted.
        #[arg(long)]
        system: Option<String>,
        /// Only this node's log, without asking the other regions.
        #[arg(long)]
        home_region_only: bool,
    },
}

/// Which records (search and export).
#[derive(Args)]
pub struct FilterArgs {
    /// Records about this patient (identifier; the node matches its pseudonym).
    #[arg(long)]
    patient: Option<String>,
    /// The patient identifier's system; detected from the number when omitted.
    #[arg(long, requires = "patient")]
    system: Option<String>,
    /// Records of this requesting or calling organization.
    #[arg(long)]
    organization: Option<String>,
    /// Records with this decision.
    #[arg(long, value_parser = ["allowed", "denied", "unauthenticated", "not_applicable"])]
    decision: Option<String>,
    /// Records of these actions (repeatable), e.g. lookup, block_create, audit_access.
    #[arg(long = "action")]
    actions: Vec<String>,
    /// Records at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    from: Option<String>,
    /// Records before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    to: Option<String>,
    /// Only emergency access (ETREAT).
    #[arg(long)]
    emergency_only: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Fhir,
}

/// Options of the top-level command line that audit commands use: --json, and the
/// global --hpr and --purpose as search filters (audit calls send no token).
pub struct Globals {
    pub json: bool,
    pub hpr: Option<String>,
    pub purpose: Option<String>,
}

/// Runs one `pil audit` command.
pub async fn run(
    client: &PilClient,
    command: AuditCommand,
    globals: Globals,
) -> anyhow::Result<()> {
    let json = globals.json;
    match command {
        AuditCommand::Search {
            filter,
            limit,
            page_token,
        } => {
            let resp = client
                .audit_search(v1::SearchAuditRequest {
                    filter: Some(filter.to_wire(&globals)?),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await?;
            print_search(&resp, json)?;
        }
        AuditCommand::Export {
            filter,
            format,
            out,
        } => {
            let format = match format {
                ExportFormat::Jsonl => v1::AuditExportFormat::JsonLines,
                ExportFormat::Fhir => v1::AuditExportFormat::FhirAuditEvent,
            };
            let mut lines = client
                .audit_export(v1::ExportAuditRequest {
                    filter: Some(filter.to_wire(&globals)?),
                    format: format as i32,
                })
                .await?;
            let mut writer = output(out.as_deref())?;
            let mut n = 0u64;
            while let Some(line) = lines.next().await {
                writer.write_all(&line?)?;
                writer.write_all(b"\n")?;
                n += 1;
            }
            writer.flush()?;
            if let Some(path) = out {
                eprintln!("exported {n} records to {}", path.display());
            }
        }
        AuditCommand::Verify {
            public_key,
            sign_now,
            retention_days,
            witnesses,
        } => {
            let quorum = witnesses.quorum()?;
            verify(client, &public_key, sign_now, retention_days, quorum, json).await?
        }
        AuditCommand::Head {
            sign_now,
            out,
            public_key,
            witnesses,
        } => {
            let quorum = witnesses.quorum()?;
            let head = client.audit_tree_head(sign_now).await?;
            if let Some(key) = public_key {
                audit_verify::check_head(&head.note, &load_key(&key)?)?;
            }
            let check = quorum.map(|q| q.check(&head.note)).transpose()?;
            if let Some(check) = check.as_ref().filter(|c| !c.met()) {
                bail!(
                    "{}: fewer than the quorum of witnesses cosigned it",
                    describe_quorum(head.size, check)
                );
            }
            if let Some(check) = &check {
                eprintln!("{}", describe_quorum(head.size, check));
            }
            match out {
                Some(path) => {
                    write_file(&path, head.note.as_bytes())?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({ "size": head.size, "saved": path })
                        );
                    } else {
                        println!(
                            "saved the signed tree head of size {} to {}",
                            head.size,
                            path.display()
                        );
                    }
                }
                None if json => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "size": head.size,
                            "note": head.note,
                            "witnesses": check.as_ref().map(quorum_json),
                        })
                    );
                }
                None => print!("{}", head.note),
            }
        }
        AuditCommand::Prove {
            index,
            public_key,
            head,
        } => prove(client, index, &public_key, head.as_deref(), json).await?,
        AuditCommand::Consistency {
            from,
            public_key,
            out,
        } => consistency(client, &from, &public_key, out.as_deref(), json).await?,
        AuditCommand::Review {
            index,
            note,
            reviewer,
        } => {
            client.audit_review(index, &note, &reviewer).await?;
            if json {
                println!("{}", serde_json::json!({ "reviewed": index }));
            } else {
                println!("record {index} marked reviewed");
            }
        }
        AuditCommand::PatientReport {
            patient,
            system,
            home_region_only,
        } => {
            let resp = client
                .audit_patient_report(
                    crate::records::patient(&patient, system.as_deref()),
                    home_region_only,
                )
                .await?;
            print_patient_report(&resp, json)?;
        }
    }
    Ok(())
}

impl FilterArgs {
    fn to_wire(&self, globals: &Globals) -> anyhow::Result<v1::AuditFilter> {
        let time = |s: &Option<String>, name: &str| {
            s.as_deref()
                .map(records::parse_time)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--{name}: {e}"))
        };
        Ok(v1::AuditFilter {
            patient: self
                .patient
                .as_deref()
                .map(|p| crate::records::patient(p, self.system.as_deref())),
            hpr_number: globals.hpr.clone().unwrap_or_default(),
            organization_number: self.organization.clone().unwrap_or_default(),
            purpose_of_use: globals.purpose.clone().unwrap_or_default(),
            decision: self.decision.clone().unwrap_or_default(),
            from: time(&self.from, "from")?,
            to: time(&self.to, "to")?,
            actions: self.actions.clone(),
            emergency_only: self.emergency_only,
        })
    }
}

fn output(path: Option<&Path>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match path {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn load_key(path: &Path) -> anyhow::Result<HeadVerifier> {
    HeadVerifier::load(path).context("cannot load the node's public key")
}

fn load_head(path: &Path, key: &HeadVerifier) -> anyhow::Result<SignedTreeHead> {
    let note =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    audit_verify::check_head(&note, key).with_context(|| format!("{}", path.display()))
}

async fn verify(
    client: &PilClient,
    public_key: &Path,
    sign_now: bool,
    retention_days: Option<u32>,
    quorum: Option<Quorum>,
    json: bool,
) -> anyhow::Result<()> {
    let key = load_key(public_key)?;
    if sign_now {
        client.audit_tree_head(true).await?;
    }
    // Heads before the log: the log only grows, so every head listed is covered by
    // the log read afterwards.
    let heads = client.audit_tree_heads().await?;
    let mut check = LogVerifier::new(&heads, &key);
    if let Some(days) = retention_days {
        let keep = std::time::Duration::from_secs(u64::from(days) * 86_400);
        check = check.with_retention(keep, std::time::SystemTime::now());
    }
    let mut entries = client.audit_read_log(0).await?;
    while let Some(entry) = entries.next().await {
        check.push(&entry.context("reading the log")?);
    }
    let report = check.finish();
    // The newest head the quorum cosigned, and what the newest head has.
    let witnessed = match &quorum {
        Some(q) => {
            // Newest first: the search stops at the first published head.
            let newest_published = heads
                .iter()
                .rev()
                .find(|h| q.check(&h.note).is_ok_and(|c| c.met()))
                .map(|h| h.size);
            let newest = match heads.last() {
                Some(h) => Some((h.size, q.check(&h.note)?)),
                None => None,
            };
            Some((newest_published, newest))
        }
        None => None,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "verified": report.is_ok() && report.heads > 0,
                "records": report.records,
                "removed": report.removed,
                "heads": report.heads,
                "signed_size": report.signed_size,
                "problems": report.problems,
                "first_problem": report.first_problem.as_ref().map(|p| p.to_string()),
                "first_bad_record": report.first_problem.as_ref().and_then(|p| p.record()),
                "published_size": witnessed.as_ref().map(|(p, _)| *p),
                "newest_head_witnesses": witnessed.as_ref()
                    .and_then(|(_, n)| n.as_ref().map(|(_, c)| quorum_json(c))),
            })
        );
    }
    if let Some(problem) = &report.first_problem {
        bail!(
            "audit log verification failed: {problem} ({} problem(s) in {} records)",
            report.problems,
            report.records
        );
    }
    if report.heads == 0 {
        bail!(
            "nothing could be verified: the log's {} records are covered by no signed tree \
             head yet; verify again with --sign-now to have the node sign one",
            report.records
        );
    }
    if !json {
        println!(
            "verified {} records against {} signed heads",
            report.records, report.heads
        );
        if report.removed > 0 {
            println!(
                "{} oldest records' contents were removed after the retention period; their leaf hashes were checked",
                report.removed
            );
        }
        if report.unsigned() > 0 {
            println!(
                "{} newest records (among them this check's own requests) are not yet covered by a signed head",
                report.unsigned()
            );
        }
        if let Some((published, newest)) = &witnessed {
            if let Some((size, check)) = newest {
                println!("{}", describe_quorum(*size, check));
            }
            match published {
                Some(size) => println!(
                    "the newest head the quorum of witnesses cosigned covers {size} records"
                ),
                None => println!("no head is cosigned by the quorum of witnesses"),
            }
        }
    }
    if let Some((None, _)) = &witnessed {
        bail!(
            "the log verifies against the node's own key, but no head of it is published: \
             none is cosigned by the quorum of witnesses, so a rewritten history could not \
             be told apart"
        );
    }
    Ok(())
}

async fn prove(
    client: &PilClient,
    index: u64,
    public_key: &Path,
    head: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let key = load_key(public_key)?;
    let head = match head {
        Some(path) => load_head(path, &key)?,
        None => {
            let newest = client.audit_tree_head(false).await?;
            audit_verify::check_head(&newest.note, &key)?
        }
    };
    let size = head.head.size;
    if index >= size {
        bail!(
            "record {index} is not covered by the signed tree head of size {size}; \
             sign a newer one with `pil audit head --sign-now`"
        );
    }
    let answer = client.audit_inclusion_proof(index, size).await?;
    audit_verify::check_inclusion(&head, index, &answer)?;
    let root = hex::encode(head.head.root);
    let record: Option<serde_json::Value> = if answer.record.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&answer.record).context("the record is not JSON")?)
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "index": index, "tree_size": size, "root": root,
                "included": true, "record": record,
            })
        );
        return Ok(());
    }
    println!("record {index} is included in the signed tree of size {size} (root {root})");
    match record {
        Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
        None => println!("(its contents were removed after the retention period)"),
    }
    Ok(())
}

async fn consistency(
    client: &PilClient,
    from: &Path,
    public_key: &Path,
    out: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let key = load_key(public_key)?;
    let old = load_head(from, &key)?;
    let fresh = client.audit_tree_head(true).await?;
    let new = audit_verify::check_head(&fresh.note, &key).context("the node's newest head")?;
    let proof = if old.head.size < new.head.size {
        client
            .audit_consistency_proof(old.head.size, new.head.size)
            .await?
    } else {
        Vec::new()
    };
    audit_verify::check_consistency(&old, &new, &proof)?;
    if let Some(path) = out {
        write_file(path, fresh.note.as_bytes())?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "consistent": true, "old_size": old.head.size, "new_size": new.head.size,
                "new_root": hex::encode(new.head.root),
            })
        );
    } else {
        println!(
            "consistent: the log of size {} extends the saved head of size {}",
            new.head.size, old.head.size
        );
    }
    Ok(())
}

fn parse(bytes: &[u8]) -> anyhow::Result<Record> {
    Ok(Record::parse(bytes)?)
}

fn print_search(resp: &v1::SearchAuditResponse, json: bool) -> anyhow::Result<()> {
    let more = (!resp.next_page_token.is_empty())
        .then(|| format!("more records: pass --page-token {}", resp.next_page_token));
    if json {
        let mut out = std::io::stdout().lock();
        for r in &resp.records {
            out.write_all(r)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        if let Some(more) = more {
            eprintln!("{more}");
        }
        return Ok(());
    }
    if resp.records.is_empty() {
        println!("no records");
    } else {
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header([
            "Index",
            "Time",
            "Action",
            "Organization",
            "HPR",
            "Purpose",
            "Decision",
            "Status",
            "Pointers",
            "Patient",
        ]);
        for bytes in &resp.records {
            let r = parse(bytes)?;
            let decision = if r.decision.emergency {
                format!("{} (emergency)", r.decision.outcome)
            } else {
                r.decision.outcome.clone()
            };
            table.add_row([
                r.index.to_string(),
                r.time.clone(),
                r.action.clone(),
                r.organization(),
                r.hpr(),
                r.purpose(),
                decision,
                r.outcome.status.clone(),
                r.outcome.pointers.to_string(),
                r.patient_short(),
            ]);
        }
        println!("{table}");
    }
    if let Some(more) = more {
        println!("{more}");
    }
    Ok(())
}

fn print_patient_report(resp: &v1::PatientReportResponse, json: bool) -> anyhow::Result<()> {
    if json {
        let regions = resp
            .regions
            .iter()
            .map(|region| {
                let records = region
                    .records
                    .iter()
                    .map(|r| serde_json::from_slice(r))
                    .collect::<Result<Vec<serde_json::Value>, _>>()?;
                Ok(serde_json::json!({
                    "region": region.region, "answered": region.answered,
                    "detail": region.detail, "records": records,
                }))
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .context("the node sent an audit record that is not JSON")?;
        println!("{}", serde_json::json!({ "regions": regions }));
        return Ok(());
    }
    for region in &resp.regions {
        if !region.answered {
            let why = if region.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", region.detail)
            };
            println!("region {}: did not answer{why}", region.region);
            continue;
        }
        if region.records.is_empty() {
            println!("region {}: no lookups of this patient", region.region);
            continue;
        }
        println!(
            "region {}: {} lookups of this patient",
            region.region,
            region.records.len()
        );
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header([
            "Time",
            "Organization",
            "HPR",
            "Profession",
            "Purpose",
            "Decision",
            "Emergency",
        ]);
        for bytes in &region.records {
            let r = parse(bytes)?;
            table.add_row([
                r.time.clone(),
                r.organization(),
                r.hpr(),
                r.requester_field(|q| q.profession.clone()),
                r.purpose(),
                r.decision.outcome.clone(),
                if r.decision.emergency { "yes" } else { "" }.to_string(),
            ]);
        }
        println!("{table}");
    }
    let silent: Vec<&str> = resp
        .regions
        .iter()
        .filter(|r| !r.answered)
        .map(|r| r.region.as_str())
        .collect();
    if !silent.is_empty() {
        println!(
            "not answered: {} (their lookups of the patient are not in this report)",
            silent.join(", ")
        );
    }
    Ok(())
}
