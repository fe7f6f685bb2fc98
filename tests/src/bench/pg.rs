//! What an operator would otherwise build: the same pointers in PostgreSQL, one table
//! with its natural key, and per lookup the patient's rows plus an audit row committed
//! with `synchronous_commit = on`, driven by pgbench. The server is set up and torn
//! down by tests/bench/run.sh; this module creates the schema, loads the data set, and
//! runs pgbench.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::{
    data::DataSet,
    load::{LoadResult, summarize},
    proc::{ByName, Cpu, children_cpu},
};

/// Where the PostgreSQL server is and which client programs to use.
#[derive(Debug, Clone)]
pub struct Pg {
    /// The Unix socket directory.
    pub host: PathBuf,
    pub port: u16,
    pub user: String,
    pub db: String,
    /// Directory of `psql` and `pgbench` (default: from `PATH`).
    pub bin_dir: Option<PathBuf>,
}

/// What loading the data set into PostgreSQL took and used.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PgLoad {
    pub rows: u64,
    pub seconds: f64,
    /// Table (heap and TOAST) bytes of `pointers`.
    pub table_bytes: u64,
    /// Index bytes of `pointers`.
    pub index_bytes: u64,
}

/// The lookup as one statement (one round trip, committed on its own): the patient's
/// pointers, and an audit row with who asked and how many pointers were returned.
const LOOKUP_SQL: &str = "\
WITH pid AS (SELECT system, value FROM patient_ids WHERE n = :n),
found AS (
  SELECT p.holder_org, p.holder_name, p.sub_unit, p.base_url, p.api_kind, p.categories,
         p.period_start, p.period_end, p.last_updated
  FROM pointers p, pid
  WHERE p.patient_value = pid.value AND p.patient_system = pid.system
),
audit AS (
  INSERT INTO audit_log (at, query_id, requester_org, hpr, profession, purpose,
                         patient_value, pointers)
  SELECT now(), gen_random_uuid(), '983974724', '565501872', 'LE', 'TREAT', pid.value,
         (SELECT count(*) FROM found)
  FROM pid
)
SELECT * FROM found;
";

const SCHEMA_SQL: &str = "\
DROP TABLE IF EXISTS pointers, patient_ids, audit_log;
CREATE TABLE pointers (
  patient_system text NOT NULL,
  patient_value text NOT NULL,
  holder_org char(9) NOT NULL,
  holder_name text NOT NULL,
  sub_unit text NOT NULL DEFAULT '',
  base_url text NOT NULL,
  api_kind smallint NOT NULL,
  categories text[] NOT NULL,
  period_start timestamptz,
  period_end timestamptz,
  last_updated timestamptz NOT NULL,
  expires_at timestamptz
);
CREATE TABLE patient_ids (n integer PRIMARY KEY, system text NOT NULL, value text NOT NULL);
CREATE TABLE audit_log (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL,
  query_id uuid NOT NULL,
  requester_org char(9) NOT NULL,
  hpr text,
  profession text,
  purpose text NOT NULL,
  patient_value text NOT NULL,
  pointers integer NOT NULL
);
CREATE INDEX audit_log_patient ON audit_log (patient_value);
";

const INDEX_SQL: &str = "\
ALTER TABLE pointers ADD PRIMARY KEY
  (patient_value, patient_system, holder_org, sub_unit, base_url, api_kind);
CREATE INDEX pointers_by_org ON pointers (holder_org);
VACUUM ANALYZE pointers;
VACUUM ANALYZE patient_ids;
CHECKPOINT;
";

impl Pg {
    fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    fn psql_command(&self) -> Command {
        let mut c = Command::new(self.program("psql"));
        c.arg("-X")
            .arg("-q")
            .args(["-v", "ON_ERROR_STOP=1", "-At"])
            .arg("-h")
            .arg(&self.host)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
                "-d",
                &self.db,
            ]);
        c
    }

    /// Runs SQL (statement by statement, each in its own transaction) and returns its
    /// unaligned output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut child = self
            .psql_command()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        child
            .stdin
            .take()
            .context("psql stdin")?
            .write_all(sql.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn copy(
        &self,
        table_and_columns: &str,
        mut rows: impl FnMut(&mut String) -> bool,
    ) -> anyhow::Result<()> {
        let mut child = self
            .psql_command()
            .arg("-c")
            .arg(format!("COPY {table_and_columns} FROM STDIN (FORMAT csv)"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        {
            let mut stdin = std::io::BufWriter::new(child.stdin.take().context("psql stdin")?);
            let mut buf = String::new();
            loop {
                buf.clear();
                let more = rows(&mut buf);
                stdin.write_all(buf.as_bytes())?;
                if !more {
                    break;
                }
            }
            stdin.flush()?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("COPY failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Creates the tables and loads `data` (generation 0), then builds the indexes.
    pub fn load(&self, data: &DataSet) -> anyhow::Result<PgLoad> {
        let started = Instant::now();
        self.psql(SCHEMA_SQL)?;
        let mut next = 0u64;
        self.copy(
            "pointers (patient_system, patient_value, holder_org, holder_name, sub_unit, \
             base_url, api_kind, categories, period_start, last_updated)",
            |buf| {
                let end = (next + 10_000).min(data.patients);
                for i in next..end {
                    data.csv_rows(i, buf);
                }
                next = end;
                next < data.patients
            },
        )?;
        let mut next = 0u64;
        self.copy("patient_ids (n, system, value)", |buf| {
            use std::fmt::Write as _;
            let end = (next + 10_000).min(data.patients);
            for i in next..end {
                let p = data.patient(i);
                let _ = writeln!(buf, "{i},{},{}", p.system, p.value);
            }
            next = end;
            next < data.patients
        })?;
        self.psql(INDEX_SQL)?;
        let seconds = started.elapsed().as_secs_f64();
        let number = |sql: &str| -> anyhow::Result<u64> {
            self.psql(sql)?
                .parse()
                .with_context(|| format!("not a number from {sql}"))
        };
        Ok(PgLoad {
            rows: number("SELECT count(*) FROM pointers")?,
            seconds,
            table_bytes: number("SELECT pg_table_size('pointers')")?,
            index_bytes: number("SELECT pg_indexes_size('pointers')")?,
        })
    }

    /// Runs the lookup script at `concurrency` for a warm-up, then for `duration`,
    /// and reads throughput from pgbench and latencies from its per-transaction log.
    pub fn bench(
        &self,
        data: &DataSet,
        concurrency: usize,
        warmup: Duration,
        duration: Duration,
        work: &Path,
    ) -> anyhow::Result<LoadResult> {
        let script = work.join("lookup.sql");
        std::fs::write(
            &script,
            format!(
                "\\set n random(0, {})\n{}",
                data.patients.saturating_sub(1),
                LOOKUP_SQL.replace('\n', " ").trim()
            ),
        )?;
        let logs = work.join(format!("pgbench-c{concurrency}"));
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs)?;
        let run = |seconds: u64, log: bool| -> anyhow::Result<String> {
            let mut c = Command::new(self.program("pgbench"));
            c.arg("-n")
                .args(["-M", "prepared"])
                .arg("-h")
                .arg(&self.host)
                .args(["-p", &self.port.to_string(), "-U", &self.user])
                .args(["-c", &concurrency.to_string()])
                .args(["-j", &concurrency.min(2).to_string()])
                .args(["-T", &seconds.max(1).to_string()])
                .arg("-f")
                .arg(&script);
            if log {
                c.arg("-l")
                    .arg(format!("--log-prefix={}", logs.join("tx").display()));
            }
            let out = c.arg(&self.db).output().context("running pgbench")?;
            if !out.status.success() {
                bail!(
                    "pgbench failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        run(warmup.as_secs().max(1), false)?;
        let server = ByName("postgres");
        let (server_before, client_before) = (server.cpu_seconds(), children_cpu());
        let stdout = run(duration.as_secs().max(1), true)?;
        // The backends end after pgbench does; then their CPU is in the postmaster's.
        std::thread::sleep(Duration::from_millis(300));
        let (server_after, client_after) = (server.cpu_seconds(), children_cpu());
        let field = |prefix: &str| -> Option<f64> {
            stdout
                .lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .and_then(|l| l.split(['=', ':']).nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        let tps = field("tps").context("no tps in pgbench's output")?;
        let failed = field("number of failed transactions").unwrap_or(0.0) as u64;
        let mut micros = Vec::new();
        for entry in std::fs::read_dir(&logs)?.flatten() {
            let text = std::fs::read_to_string(entry.path())?;
            for line in text.lines() {
                // client transaction_no latency_us script_no epoch epoch_us
                if let Some(us) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                    micros.push(us);
                }
            }
        }
        let requests = micros.len() as u64;
        let (mean_ms, p50_ms, p99_ms, p999_ms, max_ms) = summarize(micros);
        let per_request = |b: Option<f64>, a: Option<f64>| match (b, a) {
            (Some(b), Some(a)) if requests > 0 => Some((a - b) * 1e6 / requests as f64),
            _ => None,
        };
        Ok(LoadResult {
            concurrency,
            requests,
            errors: failed,
            seconds: if tps > 0.0 {
                requests as f64 / tps
            } else {
                0.0
            },
            throughput: tps,
            mean_ms,
            p50_ms,
            p99_ms,
            p999_ms,
            max_ms,
            server_cpu_us: per_request(server_before, server_after),
            client_cpu_us: per_request(client_before, client_after),
            database_cpu_us: None,
            first_error: None,
        })
    }
}
