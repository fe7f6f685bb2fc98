//! What one synced pointer costs, stage by stage, each measured on its own in this
//! process with the node's own code: the wire encoding a holder's client does, the
//! decoding, validation and sealing a node does, and the node's store (its writer
//! threads and RocksDB) inserting and then updating it. Their sum is the least CPU a
//! bulk sync can spend per pointer, whatever the transport and the scheduling.

use std::{path::Path, time::Instant};

use pil_node::{
    patient_keys::PatientKeys,
    pointer::NewPointer,
    registry::{Registry, now_nanos},
    store::Op,
};
use pil_proto::v1;
use prost::Message;

use super::{
    data::DataSet,
    proc::{Cpu, This},
    report::SyncCostProbe,
};

/// Measures the stages on the pointers of a quarter of the data set's organizations,
/// `batch` per message as in the sync benchmark, in a fresh store under `dir`. The
/// store is smaller than the benchmark's node, so its parts are if anything cheaper.
pub async fn sync_cost(data: &DataSet, dir: &Path, batch: usize) -> anyhow::Result<SyncCostProbe> {
    let orgs: Vec<usize> = (0..(data.orgs.len() / 4).max(1)).collect();
    let messages = |generation| -> Vec<v1::SyncPointersRequest> {
        orgs.iter()
            .flat_map(|&org| data.org_batches(org, generation, 0..data.patients, batch))
            .map(|pointers| v1::SyncPointersRequest {
                item: Some(v1::sync_pointers_request::Item::Batch(v1::PointerBatch {
                    pointers,
                })),
            })
            .collect()
    };
    let inserts = messages(0);
    let pointers = count(&inserts);

    // Wall time on one thread while nothing else runs, as the token probe.
    let started = Instant::now();
    let wire: Vec<Vec<u8>> = inserts.iter().map(Message::encode_to_vec).collect();
    let encode_us = per(started.elapsed().as_secs_f64(), pointers);
    drop(inserts);
    let started = Instant::now();
    let decoded = wire
        .iter()
        .map(|w| v1::SyncPointersRequest::decode(w.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let decode_us = per(started.elapsed().as_secs_f64(), pointers);

    let (store, closer) = pil_node::store::rocks::open(&dir.join("sync-cost")).await?;
    let registry = Registry::open(store, PatientKeys::from_bytes(&[1; 32], &[2; 32]), "bench");
    let started = Instant::now();
    let ops = prepare(&registry, &decoded)?;
    let prepare_us = per(started.elapsed().as_secs_f64(), pointers);

    // The store works on several threads (planner, committer, RocksDB's own): its
    // cost is the whole process's CPU while it works, batch after batch.
    let insert_us = store_cpu(&registry, ops).await? / pointers as f64 * 1e6;
    let updates = messages(1);
    let updated = count(&updates);
    let ops = prepare(&registry, &updates)?;
    let update_us = store_cpu(&registry, ops).await? / updated as f64 * 1e6;
    drop(registry);
    closer.close().await;
    Ok(SyncCostProbe {
        pointers,
        encode_us,
        decode_us,
        prepare_us,
        insert_us,
        update_us,
    })
}

/// The pointers a sync message carries (none in a header).
fn pointers_in(message: &v1::SyncPointersRequest) -> &[v1::Pointer] {
    match &message.item {
        Some(v1::sync_pointers_request::Item::Batch(b)) => &b.pointers,
        _ => &[],
    }
}

fn count(messages: &[v1::SyncPointersRequest]) -> u64 {
    messages.iter().map(|m| pointers_in(m).len() as u64).sum()
}

fn per(seconds: f64, pointers: u64) -> f64 {
    seconds * 1e6 / pointers.max(1) as f64
}

/// What a node does with each received pointer before its write: validation, the
/// pseudonym, the seal, the key.
fn prepare(
    registry: &Registry,
    messages: &[v1::SyncPointersRequest],
) -> anyhow::Result<Vec<Vec<Op>>> {
    let now = now_nanos();
    messages
        .iter()
        .map(|m| {
            pointers_in(m)
                .iter()
                .map(|p| Ok(registry.prepare(&NewPointer::from_wire(p, true)?, now)))
                .collect()
        })
        .collect()
}

/// CPU seconds of this process while the registry applies `batches` one at a time.
async fn store_cpu(registry: &Registry, batches: Vec<Vec<Op>>) -> anyhow::Result<f64> {
    let before = This.cpu_seconds();
    for ops in batches {
        registry.apply(ops).await?;
    }
    match (before, This.cpu_seconds()) {
        (Some(b), Some(a)) => Ok(a - b),
        _ => anyhow::bail!("this process's CPU time cannot be read"),
    }
}
