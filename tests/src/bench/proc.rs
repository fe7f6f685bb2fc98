//! What the benchmark reads about processes and directories: CPU time and resident
//! memory from /proc, and disk use of a data directory.

use std::{
    path::Path,
    time::{Duration, Instant},
};

/// Linux's USER_HZ: the unit of the CPU times in /proc/<pid>/stat.
const TICKS_PER_SECOND: f64 = 100.0;

/// Something whose CPU time can be read.
pub trait Cpu {
    /// CPU seconds (user + system) used so far; `None` when unknown.
    fn cpu_seconds(&self) -> Option<f64>;
}

/// A set of processes, by pid.
pub struct Pids(pub Vec<u32>);

impl Cpu for Pids {
    fn cpu_seconds(&self) -> Option<f64> {
        self.0.iter().map(|&p| process_cpu(p)).sum()
    }
}

/// This process (the load generator).
pub struct This;

impl Cpu for This {
    fn cpu_seconds(&self) -> Option<f64> {
        process_cpu(std::process::id())
    }
}

/// Every process whose command name is `name`, with the children they have reaped:
/// PostgreSQL's backends come and go, and the CPU of those that ended is in the
/// postmaster's account.
pub struct ByName(pub &'static str);

impl Cpu for ByName {
    fn cpu_seconds(&self) -> Option<f64> {
        let mut total = 0.0;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == self.0 {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                total += stat_cpu(&stat, true).unwrap_or(0.0);
            }
        }
        Some(total)
    }
}

/// CPU seconds from a /proc/<pid>/stat line; with `children`, including reaped children.
fn stat_cpu(stat: &str, children: bool) -> Option<f64> {
    // The command name may contain spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime, stime, cutime, cstime are fields 14 to 17 of the whole line.
    let n = if children { 4 } else { 2 };
    let mut ticks = 0.0;
    for i in 11..11 + n {
        ticks += fields.get(i)?.parse::<f64>().ok()?;
    }
    Some(ticks / TICKS_PER_SECOND)
}

/// CPU seconds of one process.
pub fn process_cpu(pid: u32) -> Option<f64> {
    stat_cpu(
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
        false,
    )
}

/// CPU seconds of this process's finished, waited-for children (e.g. pgbench).
pub fn children_cpu() -> Option<f64> {
    let all = stat_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?, true)?;
    Some(all - process_cpu(std::process::id())?)
}

/// How long appending 4 KiB and `fdatasync` takes on the file system of `dir`, `n`
/// times: the floor under any durable commit there. Returns latencies in microseconds
/// and the CPU time the calling thread spent per append (mostly in the kernel).
pub fn sync_latencies(dir: &Path, n: usize) -> std::io::Result<(Vec<u64>, Option<f64>)> {
    use std::io::Write;
    let path = dir.join("sync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut out = Vec::with_capacity(n);
    let cpu_before = thread_cpu_ns();
    for _ in 0..n {
        let started = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        out.push(started.elapsed().as_micros() as u64);
    }
    let cpu_us = match (cpu_before, thread_cpu_ns()) {
        (Some(a), Some(b)) if n > 0 => Some((b - a) as f64 / 1000.0 / n as f64),
        _ => None,
    };
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((out, cpu_us))
}

/// Nanoseconds the calling thread has run on a CPU (scheduler accounting, unlike the
/// tick-based counters of /proc/<pid>/stat). Brought up to date when the thread
/// sleeps, as it does in every `fdatasync`.
pub fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident memory now and at its peak (VmRSS, VmHWM), in bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Waits until `pid` has used less than `threshold` of a core over a second (e.g.
/// RocksDB compactions after a load have finished), at most `limit`. Returns how long
/// it waited.
pub fn wait_idle(pid: u32, threshold: f64, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut last = process_cpu(pid).unwrap_or(0.0);
    while started.elapsed() < limit {
        std::thread::sleep(Duration::from_secs(1));
        let now = process_cpu(pid).unwrap_or(0.0);
        if now - last < threshold {
            break;
        }
        last = now;
    }
    started.elapsed()
}

/// Bytes of a RocksDB data directory: table files, write-ahead logs, and the rest
/// (manifest, options, info logs).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct DiskUse {
    pub total: u64,
    pub sst: u64,
    pub wal: u64,
    pub other: u64,
}

pub fn disk_use(dir: &Path) -> DiskUse {
    let mut d = DiskUse::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
                continue;
            }
            // Allocated blocks, not the apparent size, as `du` counts.
            let bytes = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            let name = e.file_name().to_string_lossy().into_owned();
            d.total += bytes;
            if name.ends_with(".sst") {
                d.sst += bytes;
            } else if name.ends_with(".log") {
                d.wal += bytes;
            } else {
                d.other += bytes;
            }
        }
    }
    d
}

/// A port on 127.0.0.1 that was free a moment ago (for nodes that must know each
/// other's addresses before they start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(This.cpu_seconds().is_some());
        let (rss, hwm) = memory(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
