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

/// Every process whose command name is `name` (PostgreSQL's backends come and go).
pub struct ByName(pub &'static str);

impl Cpu for ByName {
    fn cpu_seconds(&self) -> Option<f64> {
        let mut total = 0.0;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == self.0 {
                total += process_cpu(pid).unwrap_or(0.0);
            }
        }
        Some(total)
    }
}

/// CPU seconds of one process and its finished, waited-for children.
pub fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
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
