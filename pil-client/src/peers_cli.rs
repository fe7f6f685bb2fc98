//! `pil peers`: how a node sees its federation peers.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use crate::{ClientError, PilClient, v1};

/// Prints the node's peers as a table, or as JSON.
pub async fn show(client: &PilClient, json: bool) -> anyhow::Result<()> {
    let peers = client
        .admin()
        .list_peers(v1::ListPeersRequest {})
        .await
        .map_err(ClientError::from)?
        .into_inner()
        .peers;
    if json {
        let rows: Vec<serde_json::Value> = peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "region": p.region, "address": p.address, "identity": p.identity,
                    "purposes": p.purposes, "reachable": p.reachable,
                    "latency_ms": p.latency_ms, "circuit": p.circuit,
                    "last_error": p.last_error,
                    "summary": p.summary.as_ref().map(|s| serde_json::json!({
                        "state": s.state, "age_ms": s.age_ms, "bound_ms": s.bound_ms,
                        "patients": s.patients, "filter_bytes": s.filter_bytes,
                        "key_id": s.key_id, "detail": s.detail,
                    })),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if peers.is_empty() {
        println!("This node has no federation peers.");
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "Region",
        "Address",
        "Identity",
        "Purposes",
        "Reachable",
        "Latency",
        "Circuit",
        "Summary",
        "Last error",
    ]);
    for p in &peers {
        table.add_row([
            p.region.clone(),
            p.address.clone(),
            p.identity.clone(),
            if p.purposes.is_empty() {
                "all".to_string()
            } else {
                p.purposes.join(", ")
            },
            if p.reachable { "yes" } else { "no" }.to_string(),
            if p.reachable {
                format!("{} ms", p.latency_ms)
            } else {
                String::new()
            },
            p.circuit.clone(),
            p.summary.as_ref().map(summary_cell).unwrap_or_default(),
            p.last_error.clone(),
        ]);
    }
    println!("{table}");
    if let Some(bound) = peers
        .iter()
        .find_map(|p| p.summary.as_ref())
        .map(|s| s.bound_ms)
    {
        println!(
            "A peer is skipped only while its summary is fresh (asked for within {bound} ms) and \
             says it holds nothing about the patient; otherwise it is asked."
        );
    }
    Ok(())
}

/// A peer's routing summary in one cell: its state, age, size, and why not fresh.
fn summary_cell(s: &v1::PeerSummary) -> String {
    let mut cell = match s.state.as_str() {
        "none" => "none: asked about every patient".to_string(),
        state => format!(
            "{state}, {} ms old, {} patients, {} KiB",
            s.age_ms,
            s.patients,
            s.filter_bytes.div_ceil(1024)
        ),
    };
    if !s.detail.is_empty() {
        cell.push_str(&format!(" ({})", s.detail));
    }
    cell
}
