//! Helpers for tests of this crate and of the integration suite: a throwaway
//! PostgreSQL server. Compiled only for tests and with the `test-support` feature.

/// A PostgreSQL server of its own in a temp dir, from Debian's `postgresql` programs,
/// on a Unix socket (and, with TLS, 127.0.0.1); stopped by its PID when dropped.
pub struct Throwaway {
    dir: tempfile::TempDir,
    port: u16,
    created: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// How a server starts: from `initdb` or a base backup of another, with settings.
#[derive(Default)]
struct Setup<'a> {
    tls: Option<(String, String)>,
    settings: Vec<String>,
    base_backup_of: Option<&'a Throwaway>,
}

impl Throwaway {
    /// The `postgres` user's password over TCP, on a server started with TLS.
    pub const PASSWORD: &str = "throwaway-password";

    pub fn start() -> Self {
        Self::start_with(Setup::default())
    }

    /// A server that also listens on 127.0.0.1 (port [`Self::port`]) with TLS, presenting
    /// the certificate and key (PEM) given. Connections there authenticate with
    /// [`Self::PASSWORD`] (SCRAM); on the socket, without.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Setup {
            tls: Some((cert_pem.to_string(), key_pem.to_string())),
            ..Setup::default()
        })
    }

    /// A primary whose commits return only once the standby named `standby` has the
    /// commit's write-ahead log (synchronous replication); start that standby with
    /// [`Self::start_standby_of`] before anything is committed.
    pub fn start_primary() -> Self {
        Self::start_with(Setup {
            settings: vec!["synchronous_standby_names=standby".into()],
            ..Setup::default()
        })
    }

    /// A hot standby of `primary`, copied with `pg_basebackup` and streaming from it
    /// as the synchronous standby `standby`; returns once the primary reports it in
    /// synchronous state.
    pub fn start_standby_of(primary: &Throwaway) -> Self {
        let standby = Self::start_with(Setup {
            base_backup_of: Some(primary),
            ..Setup::default()
        });
        for _ in 0..200 {
            if primary.sql("postgres", "SELECT sync_state FROM pg_stat_replication") == "sync" {
                return standby;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the standby never became synchronous");
    }

    /// Kills the server and every process it started at once (`kill -9`), as a machine
    /// failure would.
    pub fn kill_9(&self) {
        let Some(pid) = self.pid() else { return };
        let mut pids = vec![pid.to_string()];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // After the command's name in parentheses: state, then the parent's PID.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent == Some(pid) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        // A child may end on its own meanwhile; what counts is that none is left.
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(std::process::Stdio::null())
            .status();
        for _ in 0..100 {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the server (PID {pid}) survived kill -9");
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub fn promote(&self) {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-w", "promote"]);
    }

    /// Runs one SQL statement with `psql` in database `db`; its output, unaligned.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let dir = self.dir.path().to_str().unwrap();
        let port = self.port.to_string();
        self.run(
            "psql",
            &[
                "-h", dir, "-p", &port, "-U", "postgres", "-d", db, "-At", "-c", sql,
            ],
        )
        .trim()
        .to_string()
    }

    /// The connection string of database `name` on whichever of `servers` takes
    /// writes, tried in order, as a client of a replicated database names it.
    pub fn url_of_primary(servers: &[&Throwaway], name: &str) -> String {
        let hosts: Vec<String> = servers
            .iter()
            .map(|s| s.dir.path().display().to_string())
            .collect();
        let ports: Vec<String> = servers.iter().map(|s| s.port.to_string()).collect();
        format!(
            "host={} port={} user=postgres dbname={name} target_session_attrs=read-write",
            hosts.join(","),
            ports.join(",")
        )
    }

    /// The server's data directory (its tables, indexes and write-ahead log).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// The server's port, on its socket and (with TLS) on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn start_with(setup: Setup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = is_root();
        if root {
            chown_to_postgres(dir.path());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let server = Self {
            dir,
            port,
            created: Default::default(),
        };
        let data = server.data_dir();
        let data = data.to_str().unwrap();
        match setup.base_backup_of {
            None => {
                let host_auth = if setup.tls.is_some() {
                    "--auth-host=scram-sha-256"
                } else {
                    "--auth-host=trust"
                };
                server.run(
                    "initdb",
                    &[
                        "-D",
                        data,
                        "-U",
                        "postgres",
                        "--auth-local=trust",
                        host_auth,
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ],
                );
            }
            Some(primary) => {
                let from = primary.dir.path().to_str().unwrap();
                let from_port = primary.port.to_string();
                server.run(
                    "pg_basebackup",
                    &[
                        "-D",
                        data,
                        "-h",
                        from,
                        "-p",
                        &from_port,
                        "-U",
                        "postgres",
                        "-X",
                        "stream",
                        "-R",
                        "--no-sync",
                    ],
                );
                // Later lines win: the standby names itself to the primary.
                let auto = server.data_dir().join("postgresql.auto.conf");
                let mut text = std::fs::read_to_string(&auto).unwrap();
                text.push_str(&format!(
                    "primary_conninfo = 'host={from} port={from_port} user=postgres application_name=standby'\n"
                ));
                std::fs::write(&auto, text).unwrap();
            }
        }
        let mut options = format!("-k {} -p {port} -c fsync=off", server.dir.path().display());
        for setting in &setup.settings {
            options.push_str(&format!(" -c {setting}"));
        }
        match &setup.tls {
            None => options.push_str(" -c listen_addresses=''"),
            Some((cert, key)) => {
                let (cert_file, key_file) = (
                    server.dir.path().join("server.pem"),
                    server.dir.path().join("server.key"),
                );
                std::fs::write(&cert_file, cert).unwrap();
                std::fs::write(&key_file, key).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                    .unwrap();
                if root {
                    chown_to_postgres(&cert_file);
                    chown_to_postgres(&key_file);
                }
                options.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                    cert_file.display(),
                    key_file.display()
                ));
            }
        }
        let log = server.dir.path().join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                data,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
        if setup.tls.is_some() {
            let sql = format!("ALTER USER postgres PASSWORD '{}'", Self::PASSWORD);
            server.sql("postgres", &sql);
        }
        server
    }

    /// Runs one of PostgreSQL's programs, as the `postgres` user when running as root;
    /// its standard output.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let program = programs().join(program);
        let mut c = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        let out = c.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn config(&self) -> crate::store::postgres::PgConfig {
        crate::store::postgres::PgConfig {
            url: self.url("postgres"),
            pool_size: 8,
            connect_timeout: std::time::Duration::from_secs(10),
            ca_file: None,
            password_file: None,
        }
    }

    /// The connection string of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={name}",
            self.dir.path().display(),
            self.port
        )
    }

    /// Creates database `name` with this node version's schema, from synchronous code
    /// (a test's configuration); a name already created is left as it is.
    pub fn create_migrated_database(&self, name: &str) -> crate::store::postgres::PgConfig {
        let mut config = self.config();
        config.url = self.url(name);
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        if created.insert(name.to_string()) {
            let admin = self.url("postgres");
            let name = name.to_string();
            let migrate = config.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let (client, connection) =
                        tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                            .await
                            .unwrap();
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                        .await
                        .expect("create database");
                    crate::store::postgres::migrate(&migrate)
                        .await
                        .expect("migrate");
                });
            })
            .join()
            .expect("creating a database");
        }
        config
    }

    fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else { return };
        // SIGQUIT: immediate shutdown; the data directory is thrown away anyway.
        if !alive(pid) {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-QUIT", &pid.to_string()])
            .status();
        for _ in 0..100 {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn alive(pid: u32) -> bool {
    // A zombie (a killed server not yet reaped) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// The newest installed PostgreSQL's programs.
fn programs() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            let mut versions: Vec<_> = d.flatten().map(|e| e.path().join("bin")).collect();
            versions.sort();
            versions.pop()
        })
        .filter(|b| b.join("initdb").exists())
        .expect("PostgreSQL's programs (Debian's postgresql package; .ci/setup installs it)")
}

fn chown_to_postgres(path: &std::path::Path) {
    std::process::Command::new("chown")
        .arg("postgres")
        .arg(path)
        .status()
        .unwrap();
}

fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}
