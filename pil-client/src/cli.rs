//! The `pil` command line: lookups, registration and bulk sync for people and scripts.
//! Tables by default, `--json` for machines; every error is one line on stderr and a
//! non-zero exit.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use pil_proto::v1;

use crate::{
    Credentials,
    client::{PilClient, SyncOptions},
    profile::Profile,
    records::patient,
    records::{self, PointerJson},
};

#[derive(Parser)]
#[command(
    name = "pil",
    version,
    about = "Client for PIL, the patient information locator"
)]
struct Cli {
    /// Client profile (node address, CA, certificate, key).
    #[arg(long, global = true, env = "PIL_PROFILE")]
    profile: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The requester's access token (e.g. from HelseID), sent instead of minting
    /// development tokens from the profile: as a Bearer token, or as a DPoP token with a
    /// fresh proof per call when it is bound to `--dpop-key`.
    #[arg(long, global = true, env = "PIL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The private key (PKCS#8 PEM) a DPoP-bound `--token` is bound to.
    #[arg(long, global = true, env = "PIL_DPOP_KEY")]
    dpop_key: Option<PathBuf>,
    /// Purpose of use in development tokens (HL7 PurposeOfUse: TREAT, ETREAT, COC, …).
    #[arg(long, global = true)]
    purpose: Option<String>,
    /// HPR number in development tokens.
    #[arg(long, global = true)]
    hpr: Option<String>,
    /// HPR authorization (profession) code in development tokens, e.g. LE, SP.
    #[arg(long, global = true)]
    profession: Option<String>,
    /// Development tokens assert no care relationship.
    #[arg(long, global = true)]
    no_care_relationship: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Which APIs hold data about a patient?
    Lookup {
        /// The patient's identifier (fødselsnummer, D-nummer, H-nummer or FH-nummer).
        #[arg(long)]
        patient: String,
        /// Identifier system OID; detected from the number when omitted.
        #[arg(long)]
        system: Option<String>,
        /// Only these categories (repeatable).
        #[arg(long = "category")]
        categories: Vec<String>,
        /// Only these organizations (repeatable).
        #[arg(long = "organization")]
        organizations: Vec<String>,
        /// Ask the home region only, not the federated regions.
        #[arg(long)]
        home_region_only: bool,
        /// Ask every region, also those whose summaries say they hold nothing about
        /// the patient (for checking routing; every region then learns of the lookup).
        #[arg(long, conflicts_with = "home_region_only")]
        all_regions: bool,
    },
    /// Register (insert or replace) one pointer.
    Register {
        #[command(flatten)]
        target: PointerTarget,
        /// Data category (repeatable, at least one).
        #[arg(long = "category", required = true)]
        categories: Vec<String>,
        /// Display name of the holder.
        #[arg(long)]
        name: Option<String>,
        /// Start of the period the data covers (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        period_start: Option<String>,
        /// End of the period the data covers.
        #[arg(long)]
        period_end: Option<String>,
        /// When the holder's data last changed (default: now, or unchanged).
        #[arg(long)]
        last_updated: Option<String>,
        /// When the pointer stops being returned.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Remove one pointer.
    Delete {
        #[command(flatten)]
        target: PointerTarget,
    },
    /// Bulk-sync pointers from an NDJSON or CSV file.
    Sync {
        /// The file (`.ndjson`/`.jsonl` or `.csv`; `-` for NDJSON on stdin).
        file: PathBuf,
        /// File format; detected from the extension when omitted.
        #[arg(long)]
        format: Option<FileFormat>,
        /// merge: upsert what is sent; replace: what is sent becomes the complete set.
        #[arg(long, value_enum, default_value_t = Mode::Merge)]
        mode: Mode,
        /// For replace: complete per patient, or for the whole organization.
        #[arg(long, value_enum, default_value_t = Scope::Organization)]
        scope: Scope,
        /// The organization synced; default: the holder of the first record.
        #[arg(long)]
        organization: Option<String>,
        /// Store nothing if any record is invalid.
        #[arg(long)]
        all_or_nothing: bool,
        /// Pointers per message.
        #[arg(long, default_value_t = 2000)]
        batch: usize,
    },
    /// The legal configuration: check a policy set offline, or explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// A patient's blocks (sperring); needs the operator role.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
    },
    /// A patient's opt-out (reservasjon); needs the operator role.
    OptOut {
        #[command(subcommand)]
        command: OptOutCommand,
    },
    /// The node's federation peers: address, identity, reachability (checked now),
    /// latency, circuit state and last error. Needs the operator role.
    Peers,
    /// Follow patients: learn of every new, changed or removed pointer without
    /// looking them up again (prints the subscription's id).
    Follow(crate::events_cli::FollowArgs),
    /// The organization's subscriptions: list, renew, end.
    Subscriptions {
        #[command(subcommand)]
        command: crate::events_cli::SubscriptionsCommand,
    },
    /// A subscription's events, after a number; `--follow` keeps printing them as
    /// they come. `--json`: one CloudEvents object per line.
    Events(crate::events_cli::EventsArgs),
    /// The node's audit log: search, export, verify, proofs, patient reports
    /// (auditor role).
    Audit {
        #[command(subcommand)]
        command: crate::audit_cli::AuditCommand,
    },
    /// The auditor console: the audit log in a browser, every record proven
    /// (auditor role; listens on 127.0.0.1 only).
    Console(crate::console_cli::ConsoleArgs),
    /// Write every pointer registered for an organization as NDJSON.
    Export {
        /// The organization whose pointers to export.
        #[arg(long)]
        organization: String,
        /// Output file; stdout when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a legal-configuration directory (schema, policies, settings) offline.
    Check {
        /// The directory, e.g. legal-config/.
        dir: PathBuf,
    },
    /// Would this requester, with this purpose, see pointers, and why? Reads no
    /// pointers.
    Explain {
        /// Only these categories (repeatable).
        #[arg(long = "category")]
        categories: Vec<String>,
        /// The patient in mind (fødselsnummer or D-number): also tells whether they
        /// have opted out.
        #[arg(long)]
        patient: Option<String>,
        /// The patient identifier's system, when not a fødselsnummer or D-number.
        #[arg(long)]
        system: Option<String>,
    },
    /// Make the node re-read its legal configuration (operator role).
    Reload,
}

#[derive(Subcommand)]
enum BlockCommand {
    /// Forbid a professional, a profession or an organization to see the patient's
    /// pointers.
    Add {
        #[arg(long)]
        patient: String,
        /// Block a health professional by HPR number.
        #[arg(long, group = "target")]
        hpr_number: Option<String>,
        /// Block a profession (HPR authorization code, e.g. SP).
        #[arg(long = "block-profession", group = "target")]
        block_profession: Option<String>,
        /// Block an organization.
        #[arg(long, group = "target")]
        organization: Option<String>,
        /// Only for pointers held by this organization.
        #[arg(long)]
        holder: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the patient's blocks.
    List {
        #[arg(long)]
        patient: String,
    },
    /// Lift a block.
    Lift {
        #[arg(long)]
        patient: String,
        #[arg(long)]
        block_id: String,
    },
}

#[derive(Subcommand)]
enum OptOutCommand {
    /// Record that the patient opts out of PIL.
    Set {
        #[arg(long)]
        patient: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift the patient's opt-out.
    Lift {
        #[arg(long)]
        patient: String,
    },
    /// Show whether the patient has opted out.
    Show {
        #[arg(long)]
        patient: String,
    },
}

#[derive(clap::Args)]
struct PointerTarget {
    /// The patient's identifier.
    #[arg(long)]
    patient: String,
    /// Identifier system OID; detected from the number when omitted.
    #[arg(long)]
    system: Option<String>,
    /// Holder organization number.
    #[arg(long)]
    organization: String,
    /// Sub-unit organization number.
    #[arg(long)]
    sub_unit: Option<String>,
    /// API base URL (https).
    #[arg(long)]
    url: String,
    /// API kind.
    #[arg(long, default_value = "FHIR_R4")]
    api_kind: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum FileFormat {
    Ndjson,
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Merge,
    Replace,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scope {
    Patients,
    Organization,
}

/// Runs the command line; the binary's `main`. Returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", pil_proto::error_line::one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The identifier system for a number when the user did not name one.
async fn connect(cli: &Cli) -> anyhow::Result<PilClient> {
    let path = cli
        .profile
        .as_deref()
        .context("no profile: pass --profile FILE or set PIL_PROFILE")?;
    let profile = Profile::load(path)?;
    let client = PilClient::connect(&profile).await?;
    if let Some(token) = &cli.token {
        let pem = match &cli.dpop_key {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the DPoP key {}", path.display()))?,
            ),
            None => None,
        };
        let credentials = crate::credentials::for_token(token.clone(), pem.as_deref())?;
        return Ok(client.with_credentials(credentials));
    }
    let Some(dev) = &profile.token else {
        return Ok(client);
    };
    let credentials = Credentials::dev(dev)?.adjust(|p| {
        if let Some(purpose) = &cli.purpose {
            p.purpose = purpose.clone();
        }
        if let Some(hpr) = &cli.hpr {
            p.hpr = Some(hpr.clone());
        }
        if let Some(profession) = &cli.profession {
            p.profession = Some(profession.clone());
        }
        if cli.no_care_relationship {
            p.care_relationship = false;
        }
    });
    Ok(client.with_credentials(credentials))
}

fn print_rules(rules: &[v1::AppliedRule]) {
    for r in rules {
        let effect = if r.effect == v1::RuleEffect::Forbid as i32 {
            "forbid"
        } else {
            "permit"
        };
        println!("  {effect} {} — {}: {}", r.id, r.legal_basis, r.explanation);
    }
}

fn rules_json(rules: &[v1::AppliedRule]) -> serde_json::Value {
    rules
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.id, "legal_basis": r.legal_basis, "explanation": r.explanation,
                "effect": if r.effect == v1::RuleEffect::Forbid as i32 { "forbid" } else { "permit" },
            })
        })
        .collect()
}

fn target_parts(
    t: &PointerTarget,
) -> anyhow::Result<(v1::PatientIdentifier, v1::Organization, v1::Endpoint)> {
    let api_kind = records::EndpointJson {
        base_url: t.url.clone(),
        api_kind: t.api_kind.clone(),
    };
    let probe = PointerJson {
        endpoint: api_kind,
        ..Default::default()
    }
    .to_wire()
    .map_err(anyhow::Error::msg)?;
    Ok((
        patient(&t.patient, t.system.as_deref()),
        v1::Organization {
            organization_number: t.organization.clone(),
            sub_unit_organization_number: t.sub_unit.clone().unwrap_or_default(),
            name: String::new(),
        },
        probe.endpoint.expect("set above"),
    ))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    if let Command::Policy {
        command: PolicyCommand::Check { dir },
    } = &cli.command
    {
        // Offline: no node, no profile.
        let summary = pil_legal::check(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("{summary}");
        return Ok(());
    }
    if let Command::Console(args) = cli.command {
        let profile = cli
            .profile
            .context("no profile: pass --profile FILE or set PIL_PROFILE")?;
        return crate::console_cli::run(&profile, args).await;
    }
    let client = connect(&cli).await?;
    match cli.command {
        Command::Policy { command } => policy(&client, command, json).await?,
        Command::Block { command } => block(&client, command, json).await?,
        Command::OptOut { command } => opt_out(&client, command, json).await?,
        Command::Peers => crate::peers_cli::show(&client, json).await?,
        Command::Follow(args) => crate::events_cli::follow(&client, args, json).await?,
        Command::Subscriptions { command } => {
            crate::events_cli::subscriptions(&client, command, json).await?
        }
        Command::Events(args) => crate::events_cli::events(&client, args, json).await?,
        Command::Audit { command } => {
            let globals = crate::audit_cli::Globals {
                json,
                hpr: cli.hpr.clone(),
                purpose: cli.purpose.clone(),
            };
            crate::audit_cli::run(&client, command, globals).await?
        }
        Command::Lookup {
            patient: value,
            system,
            categories,
            organizations,
            home_region_only,
            all_regions,
        } => {
            let resp = client
                .lookup(v1::LookupRequest {
                    patient: Some(patient(&value, system.as_deref())),
                    categories,
                    organization_numbers: organizations,
                    home_region_only,
                    all_regions,
                })
                .await?;
            print_lookup(&resp, json)?;
        }
        Command::Register {
            target,
            categories,
            name,
            period_start,
            period_end,
            last_updated,
            expires_at,
        } => {
            let (patient, mut holder, endpoint) = target_parts(&target)?;
            holder.name = name.unwrap_or_default();
            let t = |s: Option<String>| {
                s.map(|s| records::parse_time(&s))
                    .transpose()
                    .map_err(anyhow::Error::msg)
            };
            let period_start = t(period_start)?;
            let period_end = t(period_end)?;
            let pointer = v1::Pointer {
                patient: Some(patient),
                holder: Some(holder),
                endpoint: Some(endpoint),
                categories,
                period: (period_start.is_some() || period_end.is_some()).then_some(v1::Period {
                    start: period_start,
                    end: period_end,
                }),
                last_updated: t(last_updated)?,
                expires_at: t(expires_at)?,
                ..Default::default()
            };
            let resp = client.upsert(pointer).await?;
            let outcome = v1::WriteOutcome::try_from(resp.outcome)
                .map(|o| {
                    o.as_str_name()
                        .trim_start_matches("WRITE_OUTCOME_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            if json {
                let stored = resp.pointer.as_ref().map(PointerJson::from_wire);
                println!(
                    "{}",
                    serde_json::json!({ "outcome": outcome, "pointer": stored })
                );
            } else {
                let id = resp.pointer.map(|p| p.pointer_id).unwrap_or_default();
                println!("{outcome} (pointer {id})");
            }
        }
        Command::Delete { target } => {
            let (patient, holder, endpoint) = target_parts(&target)?;
            let deleted = client
                .delete(v1::DeletePointerRequest {
                    patient: Some(patient),
                    holder: Some(holder),
                    endpoint: Some(endpoint),
                })
                .await?;
            if json {
                println!("{}", serde_json::json!({ "deleted": deleted }));
            } else if deleted {
                println!("deleted");
            } else {
                println!("no such pointer (nothing to delete)");
            }
        }
        Command::Sync {
            file,
            format,
            mode,
            scope,
            organization,
            all_or_nothing,
            batch,
        } => {
            sync(
                &client,
                &file,
                format,
                mode,
                scope,
                organization,
                all_or_nothing,
                batch.clamp(1, 50_000),
                json,
            )
            .await?
        }
        Command::Console(_) => unreachable!("handled before connecting"),
        Command::Export { organization, out } => {
            let mut stream = client.export(&organization).await?;
            let mut writer: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let mut n = 0u64;
            while let Some(page) = stream.next().await {
                for p in page? {
                    serde_json::to_writer(&mut writer, &PointerJson::from_wire(&p))?;
                    writer.write_all(b"\n")?;
                    n += 1;
                }
            }
            writer.flush()?;
            if let Some(path) = out {
                eprintln!("exported {n} pointers to {}", path.display());
            }
        }
    }
    Ok(())
}

async fn policy(client: &PilClient, command: PolicyCommand, json: bool) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { .. } => unreachable!("handled offline"),
        PolicyCommand::Reload => {
            let r = client.reload_legal_config().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"policies": r.policies, "peers": r.peers, "detail": r.detail})
                );
            } else {
                println!("configuration reloaded: {}", r.detail);
            }
        }
        PolicyCommand::Explain {
            categories,
            patient: who,
            system,
        } => {
            let r = client
                .explain(v1::ExplainRequest {
                    categories,
                    patient: who.as_deref().map(|p| patient(p, system.as_deref())),
                })
                .await?;
            if json {
                let cats: Vec<_> = r
                    .categories
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "category": c.category, "allowed": c.allowed,
                            "emergency": c.emergency, "rules": rules_json(&c.rules),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "allowed": r.allowed, "emergency": r.emergency,
                        "rules": rules_json(&r.rules), "categories": cats,
                        "opted_out": r.opted_out,
                    })
                );
                return Ok(());
            }
            let verdict = if r.allowed { "ALLOWED" } else { "REFUSED" };
            let emergency = if r.emergency {
                " (emergency access)"
            } else {
                ""
            };
            println!("lookup {verdict}{emergency}");
            print_rules(&r.rules);
            if r.opted_out {
                println!("the patient has opted out of PIL: a lookup returns nothing");
            }
            for c in &r.categories {
                let v = if c.allowed { "shown" } else { "withheld" };
                println!("{}: {v}", c.category);
                print_rules(&c.rules);
            }
        }
    }
    Ok(())
}

async fn block(client: &PilClient, command: BlockCommand, json: bool) -> anyhow::Result<()> {
    use v1::block_target::Target;
    let show = |b: &v1::Block| {
        let target = match b.target.as_ref().and_then(|t| t.target.as_ref()) {
            Some(Target::HprNumber(h)) => format!("professional {h}"),
            Some(Target::Profession(p)) => format!("profession {p}"),
            Some(Target::OrganizationNumber(o)) => format!("organization {o}"),
            None => "?".into(),
        };
        let holder = if b.holder_organization_number.is_empty() {
            "all holders".to_string()
        } else {
            format!("holder {}", b.holder_organization_number)
        };
        format!("{}  {target}, {holder}  {}", b.block_id, b.reason)
    };
    match command {
        BlockCommand::Add {
            patient: value,
            hpr_number,
            block_profession,
            organization,
            holder,
            reason,
        } => {
            let target = match (hpr_number, block_profession, organization) {
                (Some(h), _, _) => Target::HprNumber(h),
                (_, Some(p), _) => Target::Profession(p),
                (_, _, Some(o)) => Target::OrganizationNumber(o),
                _ => {
                    bail!("name whom to block: --hpr-number, --block-profession or --organization")
                }
            };
            let b = client
                .create_block(
                    patient(&value, None),
                    v1::Block {
                        target: Some(v1::BlockTarget {
                            target: Some(target),
                        }),
                        holder_organization_number: holder.unwrap_or_default(),
                        reason,
                        ..Default::default()
                    },
                )
                .await?;
            if json {
                println!("{}", serde_json::json!({ "block_id": b.block_id }));
            } else {
                println!("block recorded: {}", show(&b));
            }
        }
        BlockCommand::List { patient: value } => {
            let blocks = client.list_blocks(patient(&value, None)).await?;
            if json {
                let ids: Vec<_> = blocks.iter().map(|b| b.block_id.clone()).collect();
                println!("{}", serde_json::json!({ "block_ids": ids }));
            } else if blocks.is_empty() {
                println!("no blocks");
            } else {
                for b in &blocks {
                    println!("{}", show(b));
                }
            }
        }
        BlockCommand::Lift {
            patient: value,
            block_id,
        } => {
            let lifted = client.lift_block(patient(&value, None), &block_id).await?;
            println!(
                "{}",
                if lifted {
                    "block lifted"
                } else {
                    "no such block"
                }
            );
        }
    }
    Ok(())
}

async fn opt_out(client: &PilClient, command: OptOutCommand, json: bool) -> anyhow::Result<()> {
    match command {
        OptOutCommand::Set {
            patient: value,
            reason,
        } => {
            client.set_opt_out(patient(&value, None), &reason).await?;
            println!("opt-out recorded");
        }
        OptOutCommand::Lift { patient: value } => {
            let lifted = client.lift_opt_out(patient(&value, None)).await?;
            println!(
                "{}",
                if lifted {
                    "opt-out lifted"
                } else {
                    "no opt-out to lift"
                }
            );
        }
        OptOutCommand::Show { patient: value } => {
            let r = client.get_opt_out(patient(&value, None)).await?;
            if json {
                println!("{}", serde_json::json!({ "opted_out": r.opted_out }));
            } else if r.opted_out {
                let since = r
                    .since
                    .as_ref()
                    .map(records::format_time)
                    .unwrap_or_default();
                println!("opted out since {since}");
            } else {
                println!("not opted out");
            }
        }
    }
    Ok(())
}

fn print_lookup(resp: &v1::LookupResponse, json: bool) -> anyhow::Result<()> {
    if json {
        let pointers: Vec<PointerJson> = resp.pointers.iter().map(PointerJson::from_wire).collect();
        let regions: Vec<serde_json::Value> = resp
            .regions
            .iter()
            .map(|r| {
                serde_json::json!({
                    "region": r.region,
                    "state": region_state(r.state),
                    "detail": r.detail,
                    "pointer_count": r.pointer_count,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "query_id": resp.query_id, "pointers": pointers, "regions": regions,
                "opted_out": resp.opted_out, "emergency": resp.emergency,
                "rules": rules_json(&resp.rules), "withheld": resp.withheld,
            })
        );
        return Ok(());
    }
    if resp.opted_out {
        println!("The patient has opted out of PIL; nothing is shown.");
    } else if !resp.withheld.is_empty() {
        println!(
            "No pointers are shown: {}",
            resp.withheld.trim_start_matches("no pointers are shown: ")
        );
    } else if resp.pointers.is_empty() {
        println!("No pointers found.");
    } else {
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header([
            "Region",
            "Organization",
            "Endpoint",
            "API",
            "Categories",
            "Period",
            "Last updated",
        ]);
        for p in &resp.pointers {
            let holder = p.holder.clone().unwrap_or_default();
            let endpoint = p.endpoint.clone().unwrap_or_default();
            let org = match (
                holder.name.is_empty(),
                holder.sub_unit_organization_number.is_empty(),
            ) {
                (true, true) => holder.organization_number,
                (false, true) => format!("{} ({})", holder.name, holder.organization_number),
                (_, false) => format!(
                    "{} {} / {}",
                    holder.name, holder.organization_number, holder.sub_unit_organization_number
                ),
            };
            let date = |t: &Option<prost_types::Timestamp>| {
                t.as_ref()
                    .map(|t| records::format_time(t).chars().take(10).collect::<String>())
                    .unwrap_or_default()
            };
            let period = p
                .period
                .as_ref()
                .map(|pd| format!("{} – {}", date(&pd.start), date(&pd.end)))
                .unwrap_or_default();
            table.add_row([
                p.region.clone(),
                org,
                endpoint.base_url,
                records::api_kind_name(endpoint.api_kind),
                p.categories.join(", "),
                period,
                date(&p.last_updated),
            ]);
        }
        println!("{table}");
    }
    if resp.emergency {
        println!("emergency access (ETREAT): this lookup is flagged for the auditors");
    }
    for r in &resp.regions {
        let detail = if r.detail.is_empty() {
            String::new()
        } else {
            format!(" — {}", r.detail)
        };
        println!(
            "region {}: {} ({} pointers){detail}",
            r.region,
            region_state(r.state),
            r.pointer_count
        );
    }
    Ok(())
}

fn region_state(s: i32) -> String {
    v1::RegionState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("REGION_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// Reads pointers from a file in the background, in batches.
fn read_batches(
    file: PathBuf,
    format: FileFormat,
    batch: usize,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<Vec<v1::Pointer>>>,
) {
    let result = (|| -> anyhow::Result<()> {
        let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
            Box::new(BufReader::new(std::io::stdin()))
        } else {
            Box::new(BufReader::new(
                std::fs::File::open(&file)
                    .with_context(|| format!("cannot open {}", file.display()))?,
            ))
        };
        let mut buf = Vec::with_capacity(batch);
        let push = |p: v1::Pointer, buf: &mut Vec<v1::Pointer>| -> bool {
            buf.push(p);
            if buf.len() >= batch {
                return tx.blocking_send(Ok(std::mem::take(buf))).is_ok();
            }
            true
        };
        match format {
            FileFormat::Ndjson => {
                for (i, line) in reader.lines().enumerate() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let p = records::parse_json_line(&line).map_err(|message| {
                        records::RecordError {
                            line: i as u64 + 1,
                            message,
                        }
                    })?;
                    if !push(p, &mut buf) {
                        return Ok(());
                    }
                }
            }
            FileFormat::Csv => {
                let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
                for (i, rec) in rdr.records().enumerate() {
                    let rec = rec?;
                    let p = records::parse_csv_record(&rec).map_err(|message| {
                        records::RecordError {
                            line: i as u64 + 2,
                            message,
                        }
                    })?;
                    if !push(p, &mut buf) {
                        return Ok(());
                    }
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.blocking_send(Ok(buf));
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(e.context(format!("reading {}", file.display()))));
    }
}

#[allow(clippy::too_many_arguments)]
async fn sync(
    client: &PilClient,
    file: &Path,
    format: Option<FileFormat>,
    mode: Mode,
    scope: Scope,
    organization: Option<String>,
    all_or_nothing: bool,
    batch: usize,
    json: bool,
) -> anyhow::Result<()> {
    let format = match format {
        Some(f) => f,
        None => match file.extension().and_then(|e| e.to_str()) {
            Some("csv") => FileFormat::Csv,
            Some("ndjson" | "jsonl" | "json") => FileFormat::Ndjson,
            _ if file.as_os_str() == "-" => FileFormat::Ndjson,
            _ => bail!(
                "cannot tell the format of {}; pass --format",
                file.display()
            ),
        },
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let path = file.to_path_buf();
    std::thread::spawn(move || read_batches(path, format, batch, tx));

    // The header needs the organization: take it from the first batch if not given.
    let first = match rx.recv().await {
        Some(b) => b?,
        None => Vec::new(),
    };
    let organization = match organization {
        Some(o) => o,
        None => first
            .first()
            .and_then(|p| p.holder.as_ref())
            .map(|h| h.organization_number.clone())
            .context("the file is empty; pass --organization to sync an empty set")?,
    };
    let progress = if json {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {pos} pointers sent ({per_sec}) {elapsed}")
                .expect("valid template"),
        );
        pb
    };
    let (err_tx, err_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let pb = progress.clone();
    let batches = async_stream(first, rx, err_tx, pb);
    let options = SyncOptions {
        organization_number: organization,
        mode: match mode {
            Mode::Merge => v1::SyncMode::Merge,
            Mode::Replace => v1::SyncMode::Replace,
        },
        scope: match (mode, scope) {
            (Mode::Merge, _) => v1::ReplaceScope::Unspecified,
            (Mode::Replace, Scope::Patients) => v1::ReplaceScope::Patients,
            (Mode::Replace, Scope::Organization) => v1::ReplaceScope::Organization,
        },
        all_or_nothing,
    };
    let result = tokio::select! {
        r = client.sync(options, batches) => r,
        Ok(e) = err_rx => {
            progress.finish_and_clear();
            return Err(e.context(
                "sync cancelled (an all-or-nothing sync stored nothing; a merge kept the \
                 batches sent before the error)",
            ));
        }
    };
    progress.finish_and_clear();
    let report = result?;
    if json {
        let errors: Vec<_> = report
            .errors
            .iter()
            .map(|e| serde_json::json!({"position": e.position, "field": e.field, "message": e.message}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "inserted": report.inserted, "updated": report.updated,
                "unchanged": report.unchanged, "removed": report.removed,
                "rejected": report.rejected, "replace_applied": report.replace_applied,
                "errors": errors,
            })
        );
    } else {
        println!(
            "inserted {}, updated {}, unchanged {}, removed {}, rejected {}",
            report.inserted, report.updated, report.unchanged, report.removed, report.rejected
        );
        for e in &report.errors {
            println!("  record {}: {}: {}", e.position, e.field, e.message);
        }
        if matches!(mode, Mode::Replace) && !report.replace_applied {
            println!("replace step skipped because records were rejected; nothing was removed");
        }
    }
    if report.rejected > 0 {
        bail!("{} record(s) rejected", report.rejected);
    }
    Ok(())
}

/// Turns the reader's channel into the request stream. On a read error the stream
/// stalls instead of ending, and the error is handed to the caller, which then drops
/// the call: the node sees a cancelled stream, not a complete one, so an all-or-nothing
/// sync stores nothing.
fn async_stream(
    first: Vec<v1::Pointer>,
    rx: tokio::sync::mpsc::Receiver<anyhow::Result<Vec<v1::Pointer>>>,
    err_tx: tokio::sync::oneshot::Sender<anyhow::Error>,
    progress: ProgressBar,
) -> impl futures::Stream<Item = Vec<v1::Pointer>> + Send + 'static {
    let rest = tokio_stream::wrappers::ReceiverStream::new(rx);
    let err_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(err_tx)));
    futures::stream::iter([Ok(first)])
        .chain(rest)
        .then(move |b| {
            let err_tx = err_tx.clone();
            async move {
                match b {
                    Ok(b) => b,
                    Err(e) => {
                        if let Some(tx) = err_tx.lock().ok().and_then(|mut t| t.take()) {
                            let _ = tx.send(e);
                        }
                        futures::future::pending().await
                    }
                }
            }
        })
        .filter(|b| futures::future::ready(!b.is_empty()))
        .inspect(move |b| progress.inc(b.len() as u64))
}
