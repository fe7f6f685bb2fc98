//! Helpers for tests of this crate and of the integration suite: a throwaway
//! PostgreSQL server. Compiled only for tests and with the `test-support` feature.

/// A PostgreSQL server of its own in a temp dir, from Debian's `postgresql` programs,
/// on a Unix socket only; stopped by its PID when dropped.
pub struct Throwaway {
    dir: tempfile::TempDir,
    port: u16,
    created: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Throwaway {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that also listens on 127.0.0.1 (port [`Self::port`]) with TLS, presenting
    /// the certificate and key (PEM) given.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    /// The server's data directory (its tables, indexes and write-ahead log).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// The server's port, on its socket and (with TLS) on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                let mut versions: Vec<_> = d.flatten().map(|e| e.path().join("bin")).collect();
                versions.sort();
                versions.pop()
            })
            .filter(|b| b.join("initdb").exists())
            .expect("PostgreSQL's programs (Debian's postgresql package; .ci/setup installs it)");
        let dir = tempfile::tempdir().unwrap();
        let root = nix_is_root();
        if root {
            std::process::Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .unwrap();
        }
        let run = |program: &str, args: &[&str]| {
            let mut c = if root {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(program));
                c
            } else {
                std::process::Command::new(bin.join(program))
            };
            let out = c.args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data = dir.path().join("data");
        let data = data.to_str().unwrap();
        run(
            "initdb",
            &[
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut options = format!("-k {} -p {port} -c fsync=off", dir.path().display());
        match tls {
            None => options.push_str(" -c listen_addresses=''"),
            Some((cert, key)) => {
                let (cert_file, key_file) =
                    (dir.path().join("server.pem"), dir.path().join("server.key"));
                std::fs::write(&cert_file, cert).unwrap();
                std::fs::write(&key_file, key).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                    .unwrap();
                if root {
                    for f in [&cert_file, &key_file] {
                        std::process::Command::new("chown")
                            .arg("postgres")
                            .arg(f)
                            .status()
                            .unwrap();
                    }
                }
                options.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                    cert_file.display(),
                    key_file.display()
                ));
            }
        }
        let log = dir.path().join("server.log");
        run(
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
        Self {
            dir,
            port,
            created: Default::default(),
        }
    }

    pub fn config(&self) -> crate::store::postgres::PgConfig {
        crate::store::postgres::PgConfig {
            url: self.url("postgres"),
            pool_size: 8,
            connect_timeout: std::time::Duration::from_secs(10),
            ca_file: None,
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
        let _ = std::process::Command::new("kill")
            .args(["-QUIT", &pid.to_string()])
            .status();
        for _ in 0..100 {
            let alive = std::process::Command::new("kill")
                .args(["-0", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
