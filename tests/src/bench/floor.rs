//! The floor of the stack: a `LookupService` that answers every call with the same
//! small message, served exactly like a node (tonic, the node's own TLS listener with
//! client certificates required). Whatever a lookup costs beyond this is PIL's code.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use pil_client::v1;
use pil_node::config::TlsConfig;
use tonic::{Request, Response, Status};

struct Floor {
    answer: v1::LookupResponse,
}

#[tonic::async_trait]
impl v1::lookup_service_server::LookupService for Floor {
    async fn lookup(
        &self,
        _req: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
}

/// Serves the floor service on 127.0.0.1 until killed; prints `floor serving <addr>`.
pub async fn serve(tls: TlsConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = pil_node::tls::server_config(&tls)?;
    // The same listener as the node's, cut-off signal included (never sent here).
    let (_never_cut, cut) = tokio::sync::watch::channel(false);
    let incoming = pil_node::tls::incoming(
        listener,
        pil_node::tls::ServerTls::new(config, Default::default()),
        Duration::from_secs(10),
        pil_node::tls::ConnectionLimit::new(
            pil_node::config::Limits::default().max_connections,
            std::sync::Arc::new(pil_node::metrics::Metrics::new()),
        ),
        cut,
    );
    let answer = v1::LookupResponse {
        regions: vec![v1::RegionStatus {
            region: "floor".into(),
            state: v1::RegionState::Ok as i32,
            detail: String::new(),
            pointer_count: 0,
        }],
        query_id: "0".repeat(32),
        ..Default::default()
    };
    println!("floor serving {addr}");
    tonic::transport::Server::builder()
        .add_service(v1::lookup_service_server::LookupServiceServer::new(Floor {
            answer,
        }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// The floor service as a child process (this binary, `floor-serve`), so it runs
/// apart from the load generator just as a node does.
pub struct FloorProc {
    child: Child,
    pub addr: SocketAddr,
}

impl FloorProc {
    pub fn start(tls: &TlsConfig) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("floor-serve")
            .arg("--client-ca")
            .arg(&tls.client_ca)
            .arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the floor service")?;
        let stdout = child.stdout.take().context("floor stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("floor serving ") else {
            let _ = child.kill();
            bail!("the floor service did not start: {line:?}");
        };
        Ok(Self {
            addr: addr.parse()?,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FloorProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TLS files of the world's node certificate.
pub fn tls_of(world_dir: &Path) -> TlsConfig {
    let pki = world_dir.join("pki");
    TlsConfig {
        client_ca: pki.join("ca.pem"),
        cert: pki.join("node.pem"),
        key: pki.join("node-key.pem"),
    }
}
