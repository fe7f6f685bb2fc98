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
            p.last_error.clone(),
        ]);
    }
    println!("{table}");
    Ok(())
}
