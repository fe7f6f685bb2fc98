//! A closed-loop load generator: `concurrency` workers, each sending its next request
//! when the previous one is answered, first for a warm-up, then measured until the
//! duration or the request count runs out, whichever comes first.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{data::mix, proc::Cpu};

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// How long and how much to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_requests: u64,
    pub seed: u64,
}

/// What one load run measured. Latencies are per request, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub throughput: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// CPU the server process(es) used per measured request, in microseconds.
    pub server_cpu_us: Option<f64>,
    /// CPU the load generator used per measured request, in microseconds.
    pub client_cpu_us: Option<f64>,
    /// CPU the database server behind the server used per measured request, in
    /// microseconds (a node on the PostgreSQL engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_cpu_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

struct State {
    phase: AtomicU8,
    measured: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    stopped_at: Mutex<Option<Instant>>,
}

impl State {
    fn stop(&self) {
        let mut at = self.stopped_at.lock().unwrap();
        if at.is_none() {
            *at = Some(Instant::now());
        }
        self.phase.store(STOP, Ordering::SeqCst);
    }
}

/// Runs `call` under `spec`. Worker `w` uses `clients[w % clients.len()]` and passes a
/// fresh pseudo-random number to each call (for choosing the patient). `server` and
/// `client` measure the CPU time of the two sides during the measured phase.
pub async fn run<C, F, Fut>(
    spec: &LoadSpec,
    clients: &[C],
    call: F,
    server: &dyn Cpu,
    database: Option<&dyn Cpu>,
    client: &dyn Cpu,
) -> LoadResult
where
    C: Clone + Send + Sync + 'static,
    F: Fn(C, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    assert!(!clients.is_empty(), "no clients");
    let state = Arc::new(State {
        phase: AtomicU8::new(WARMUP),
        measured: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        stopped_at: Mutex::new(None),
    });
    let per_worker = (spec.max_requests / spec.concurrency as u64 + 1).min(1 << 20) as usize;
    let mut workers = Vec::with_capacity(spec.concurrency);
    for w in 0..spec.concurrency {
        let client = clients[w % clients.len()].clone();
        let call = call.clone();
        let state = state.clone();
        let max = spec.max_requests;
        let mut rng = mix(spec.seed ^ mix(w as u64 + 1));
        workers.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(per_worker);
            loop {
                let phase = state.phase.load(Ordering::SeqCst);
                if phase == STOP {
                    break;
                }
                rng = mix(rng);
                let started = Instant::now();
                let result = call(client.clone(), rng).await;
                let took = started.elapsed();
                // Counted only when sent and answered within the measured phase.
                let counted = phase == MEASURE && state.phase.load(Ordering::SeqCst) == MEASURE;
                match result {
                    Ok(()) if counted => {
                        latencies.push(took.as_micros().min(u32::MAX as u128) as u32);
                        if state.measured.fetch_add(1, Ordering::SeqCst) + 1 >= max {
                            state.stop();
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if counted {
                            state.errors.fetch_add(1, Ordering::SeqCst);
                        }
                        let mut first = state.first_error.lock().unwrap();
                        if first.is_none() {
                            *first = Some(e);
                        }
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(spec.warmup).await;
    let database_cpu = || database.and_then(|d| d.cpu_seconds());
    let (server_before, client_before) = (server.cpu_seconds(), client.cpu_seconds());
    let database_before = database_cpu();
    let started = Instant::now();
    state.phase.store(MEASURE, Ordering::SeqCst);
    while state.phase.load(Ordering::SeqCst) != STOP {
        if started.elapsed() >= spec.duration {
            state.stop();
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = state
        .stopped_at
        .lock()
        .unwrap()
        .unwrap_or_else(Instant::now);
    let (server_after, client_after) = (server.cpu_seconds(), client.cpu_seconds());
    let database_after = database_cpu();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("load worker"));
    }
    all.sort_unstable();
    let seconds = stopped.duration_since(started).as_secs_f64();
    let requests = all.len() as u64;
    let pct = |q: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let rank = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len());
        f64::from(all[rank - 1]) / 1000.0
    };
    let per_request = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) if requests > 0 => Some((a - b) * 1e6 / requests as f64),
        _ => None,
    };
    let first_error = state.first_error.lock().unwrap().take();
    LoadResult {
        concurrency: spec.concurrency,
        requests,
        errors: state.errors.load(Ordering::SeqCst),
        seconds,
        throughput: if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        },
        mean_ms: if all.is_empty() {
            0.0
        } else {
            all.iter().map(|&l| f64::from(l)).sum::<f64>() / all.len() as f64 / 1000.0
        },
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: all.last().map(|&l| f64::from(l) / 1000.0).unwrap_or(0.0),
        server_cpu_us: per_request(server_before, server_after),
        client_cpu_us: per_request(client_before, client_after),
        database_cpu_us: per_request(database_before, database_after),
        first_error,
    }
}

/// Percentiles of latencies given in microseconds, in the shape of [`LoadResult`]
/// (for the PostgreSQL baseline, whose latencies come from pgbench's log).
pub fn summarize(mut micros: Vec<u64>) -> (f64, f64, f64, f64, f64) {
    micros.sort_unstable();
    if micros.is_empty() {
        return (0.0, 0.0, 0.0, 0.0, 0.0);
    }
    let pct = |q: f64| {
        let rank = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
        micros[rank - 1] as f64 / 1000.0
    };
    let mean = micros.iter().sum::<u64>() as f64 / micros.len() as f64 / 1000.0;
    (
        mean,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        *micros.last().unwrap() as f64 / 1000.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoCpu;
    impl Cpu for NoCpu {
        fn cpu_seconds(&self) -> Option<f64> {
            None
        }
    }

    #[tokio::test]
    async fn stops_at_the_request_bound() {
        let spec = LoadSpec {
            concurrency: 4,
            warmup: Duration::from_millis(10),
            duration: Duration::from_secs(30),
            max_requests: 200,
            seed: 1,
        };
        let r = run(
            &spec,
            &[()],
            |_, _| async {
                tokio::time::sleep(Duration::from_micros(200)).await;
                Ok(())
            },
            &NoCpu,
            None,
            &NoCpu,
        )
        .await;
        assert!(r.requests >= 200 && r.requests < 210, "{r:?}");
        assert_eq!(r.errors, 0);
        assert!(r.p50_ms > 0.0 && r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms);
    }

    #[test]
    fn percentiles() {
        let (mean, p50, p99, p999, max) = summarize((1..=1000).collect());
        assert_eq!((p50, p99, p999, max), (0.5, 0.99, 0.999, 1.0));
        assert!((mean - 0.5005).abs() < 1e-9);
    }
}
