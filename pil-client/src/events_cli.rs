//! `pil follow`, `pil subscriptions` and `pil events`: following patients' pointers
//! and reading the events, as tables or as JSON lines with CloudEvents' attribute
//! names (one event per line, for pipes).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use crate::{
    PilClient,
    records::{PointerJson, format_time, patient},
    v1,
};

/// `pil follow`'s arguments.
#[derive(clap::Args)]
pub struct FollowArgs {
    /// A patient to follow (repeatable).
    #[arg(long = "patient")]
    patients: Vec<String>,
    /// A file of patients to follow, one identifier per line.
    #[arg(long)]
    patients_file: Option<PathBuf>,
    /// Only pointers holding one of these categories (repeatable).
    #[arg(long = "category")]
    categories: Vec<String>,
    /// Days to follow (default: as long as the node's legal configuration allows).
    #[arg(long, default_value_t = 0)]
    days: u32,
}

#[derive(Subcommand)]
pub enum SubscriptionsCommand {
    /// The organization's subscriptions.
    List,
    /// Extends a subscription from now, with a fresh token.
    Renew {
        id: String,
        #[arg(long, default_value_t = 0)]
        days: u32,
    },
    /// Ends a subscription.
    End { id: String },
}

/// `pil events`' arguments.
#[derive(clap::Args)]
pub struct EventsArgs {
    /// The subscription's id.
    subscription: String,
    /// The last event number already processed (0: from the start).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many events (without --follow).
    #[arg(long, default_value_t = 100)]
    max: u32,
    /// Keep the stream open and print events as they come.
    #[arg(long)]
    follow: bool,
    /// Seconds between heartbeats while following (printed to stderr).
    #[arg(long, default_value_t = 15)]
    heartbeat: u32,
}

pub async fn follow(client: &PilClient, args: FollowArgs, json: bool) -> anyhow::Result<()> {
    let mut values = args.patients;
    if let Some(file) = &args.patients_file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        values.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    if values.is_empty() {
        anyhow::bail!("name the patients to follow with --patient or --patients-file");
    }
    let resp = client
        .subscribe(v1::SubscribeRequest {
            patients: values.iter().map(|v| patient(v, None)).collect(),
            categories: args.categories,
            days: args.days,
        })
        .await?;
    let sub = resp.subscription.unwrap_or_default();
    if json {
        let refused: Vec<serde_json::Value> = resp
            .refused
            .iter()
            .map(|r| {
                serde_json::json!({
                    "patient": r.patient.as_ref().map(|p| &p.value), "reason": r.reason,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "subscription": subscription_json(&sub), "refused": refused })
        );
        return Ok(());
    }
    println!(
        "Subscription {} follows {} patients until {} ({}).",
        sub.id,
        sub.patients.len(),
        time_text(sub.expires_at.as_ref()),
        sub.legal_basis
    );
    for r in &resp.refused {
        println!(
            "Not followed: {}: {}",
            r.patient.as_ref().map(|p| p.value.as_str()).unwrap_or(""),
            r.reason
        );
    }
    for r in sub.regions.iter().filter(|r| {
        v1::RegionFollowingState::try_from(r.state) != Ok(v1::RegionFollowingState::Following)
    }) {
        println!(
            "Region {} is {}{}.",
            r.region,
            region_state(r.state),
            if r.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", r.detail)
            }
        );
    }
    println!("Read its events with `pil events {}`.", sub.id);
    Ok(())
}

fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    t.map(format_time).unwrap_or_default()
}

fn subscription_json(s: &v1::Subscription) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "organization_number": s.organization_number,
        "patients": s.patients.iter().map(|p| &p.value).collect::<Vec<_>>(),
        "categories": s.categories,
        "created_at": time_text(s.created_at.as_ref()),
        "expires_at": time_text(s.expires_at.as_ref()),
        "ended": s.ended, "last_event": s.last_event, "legal_basis": s.legal_basis,
        "regions": s.regions.iter().map(|r| serde_json::json!({
            "region": r.region, "state": region_state(r.state), "detail": r.detail,
            "collected": r.collected,
        })).collect::<Vec<_>>(),
    })
}

fn region_state(state: i32) -> &'static str {
    match v1::RegionFollowingState::try_from(state) {
        Ok(v1::RegionFollowingState::Pending) => "pending",
        Ok(v1::RegionFollowingState::Following) => "following",
        Ok(v1::RegionFollowingState::Refused) => "refused",
        Ok(v1::RegionFollowingState::Ended) => "ended",
        Ok(v1::RegionFollowingState::HoldsNothing) => "not told (holds nothing)",
        _ => "unknown",
    }
}

/// Each other region's part, e.g. "helse-midt following (12), helse-nord pending".
fn regions_text(s: &v1::Subscription) -> String {
    if s.regions.is_empty() {
        return "this region only".into();
    }
    s.regions
        .iter()
        .map(|r| {
            let mut t = format!("{} {}", r.region, region_state(r.state));
            if r.collected > 0 {
                t.push_str(&format!(" ({} collected)", r.collected));
            }
            if !r.detail.is_empty() {
                t.push_str(&format!(": {}", r.detail));
            }
            t
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn subscriptions(
    client: &PilClient,
    command: SubscriptionsCommand,
    json: bool,
) -> anyhow::Result<()> {
    let shown = match command {
        SubscriptionsCommand::List => client.subscriptions().await?,
        SubscriptionsCommand::Renew { id, days } => {
            vec![client.renew_subscription(&id, days).await?]
        }
        SubscriptionsCommand::End { id } => vec![client.end_subscription(&id).await?],
    };
    if json {
        let rows: Vec<serde_json::Value> = shown.iter().map(subscription_json).collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if shown.is_empty() {
        println!("The organization has no subscriptions at this node.");
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "Subscription",
        "Patients",
        "Categories",
        "Expires",
        "State",
        "Last event",
        "Other regions",
    ]);
    for s in &shown {
        table.add_row([
            s.id.clone(),
            s.patients.len().to_string(),
            if s.categories.is_empty() {
                "all".into()
            } else {
                s.categories.join(", ")
            },
            time_text(s.expires_at.as_ref()),
            if s.ended { "ended" } else { "active" }.into(),
            s.last_event.to_string(),
            regions_text(s),
        ]);
    }
    println!("{table}");
    Ok(())
}

fn kind_name(kind: i32) -> &'static str {
    match v1::EventKind::try_from(kind) {
        Ok(v1::EventKind::PointerAppeared) => "pointer.appeared",
        Ok(v1::EventKind::PointerChanged) => "pointer.changed",
        Ok(v1::EventKind::PointerRemoved) => "pointer.removed",
        Ok(v1::EventKind::PointerLapsed) => "pointer.lapsed",
        Ok(v1::EventKind::PatientUnfollowed) => "patient.unfollowed",
        Ok(v1::EventKind::NotShown) => "not-shown",
        _ => "unknown",
    }
}

/// One event as a CloudEvents 1.0 JSON object (structured mode): `sequence` is the
/// subscription's number (the CloudEvents sequence extension), `data` the patient and
/// the pointer.
fn event_json(e: &v1::Event) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0",
        "id": e.id,
        "source": format!("pil:{}/subscriptions/{}", e.region, e.subscription_id),
        "type": format!("no.pil.{}", kind_name(e.kind)),
        "time": time_text(e.time.as_ref()),
        "sequence": e.number.to_string(),
        "datacontenttype": "application/json",
        "data": {
            "patient": e.patient.as_ref().map(|p| serde_json::json!({"system": p.system, "value": p.value})),
            "pointer": e.pointer.as_ref().map(PointerJson::from_wire),
        },
    })
}

fn print_event(e: &v1::Event, json: bool) {
    if json {
        println!("{}", event_json(e));
        return;
    }
    let pointer = e
        .pointer
        .as_ref()
        .map(|p| {
            format!(
                "{} {} [{}]",
                p.holder
                    .as_ref()
                    .map(|h| h.organization_number.as_str())
                    .unwrap_or(""),
                p.endpoint
                    .as_ref()
                    .map(|x| x.base_url.as_str())
                    .unwrap_or(""),
                p.categories.join(", ")
            )
        })
        .unwrap_or_default();
    println!(
        "{:>6}  {}  {:<18}  {}  {}",
        e.number,
        time_text(e.time.as_ref()),
        kind_name(e.kind),
        e.patient.as_ref().map(|p| p.value.as_str()).unwrap_or(""),
        pointer
    );
}

pub async fn events(client: &PilClient, args: EventsArgs, json: bool) -> anyhow::Result<()> {
    if !args.follow {
        let page = client
            .pull_events(&args.subscription, args.after, args.max)
            .await?;
        for e in &page.events {
            print_event(e, json);
        }
        let shown = page.events.last().map(|e| e.number).unwrap_or(args.after);
        if shown < page.last_event {
            eprintln!(
                "{} more events: pil events {} --after {shown}",
                page.last_event - shown,
                args.subscription
            );
        }
        return Ok(());
    }
    let mut stream = client
        .stream_events(&args.subscription, args.after, args.heartbeat)
        .await?;
    while let Some(message) = stream.message().await.map_err(crate::ClientError::from)? {
        match message.message {
            Some(v1::stream_events_response::Message::Event(e)) => print_event(&e, json),
            Some(v1::stream_events_response::Message::Heartbeat(h)) => {
                eprintln!(
                    "{} nothing new; newest event {}",
                    time_text(h.time.as_ref()),
                    h.last_event
                )
            }
            None => {}
        }
    }
    Ok(())
}
