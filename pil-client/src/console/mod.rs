//! `pil console`: the audit log in the auditor's browser.
//!
//! A small web application on 127.0.0.1 that calls the nodes' audit API with the
//! auditor's certificate, exactly as `pil audit` does; the nodes gain no web server.
//! Proofs are checked here, on the auditor's machine, with the public keys the auditor
//! holds, so a page says "verified" only when the node's answer proves it.
//!
//! # Layout
//! - [`guard`]: who may use the console — a one-time secret in the printed address,
//!   a session cookie, CSRF tokens, the Host check and the security headers.
//! - [`region`]: one region's node, its key and the last head seen of its log.
//! - [`pages`]: the views and their templates (`templates/console/`).
//! - [`flags`]: patterns worth a privacy officer's look, counted over a window.
//! - [`chart`]: the pictures, drawn here as SVG.
//! - [`words`]: the patient report's words in bokmål and English.

pub mod chart;
pub mod flags;
mod guard;
mod pages;
pub mod region;
pub mod words;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{error::ClientError, profile::Profile};

pub use region::Region;

/// One region the console reads: its node as the auditor's profile reaches it, and
/// the node's tree-head public key (or key history).
pub struct RegionSetup {
    pub profile: Profile,
    pub public_key: PathBuf,
}

/// What the console serves and from where.
pub struct ConsoleConfig {
    /// Must be a loopback address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The home region first (its node answers patient reports across every region),
    /// then any other regions the auditor may read.
    pub regions: Vec<RegionSetup>,
    /// Where the last head seen of each region's log is kept between runs.
    pub state_dir: PathBuf,
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the console listens on loopback only; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no region to read: give at least the home region's profile")]
    NoRegion,
    #[error("two regions are named {0}")]
    DuplicateRegion(String),
    #[error(transparent)]
    Region(#[from] region::RegionError),
    #[error("cannot use the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Shared by every request.
pub(crate) struct Console {
    pub regions: Vec<Region>,
    pub guard: guard::Guard,
}

impl Console {
    pub fn home(&self) -> &Region {
        &self.regions[0]
    }

    /// The region called `name`, or the home region for an empty name.
    pub fn region(&self, name: &str) -> Option<&Region> {
        if name.is_empty() {
            return Some(self.home());
        }
        self.regions.iter().find(|r| r.name == name)
    }

    pub fn region_names(&self) -> Vec<String> {
        self.regions.iter().map(|r| r.name.clone()).collect()
    }
}

/// A console serving until stopped.
pub struct RunningConsole {
    addr: SocketAddr,
    login_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningConsole {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address to open, with the one-time secret: it works once.
    pub fn login_url(&self) -> &str {
        &self.login_url
    }

    /// Stops serving and waits until the server has finished.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// Connects to every region, binds the listener and starts serving.
pub async fn start(config: ConsoleConfig) -> Result<RunningConsole, ConsoleError> {
    if !config.listen.ip().is_loopback() {
        return Err(ConsoleError::NotLoopback(config.listen));
    }
    if config.regions.is_empty() {
        return Err(ConsoleError::NoRegion);
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|source| ConsoleError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let mut regions: Vec<Region> = Vec::with_capacity(config.regions.len());
    for setup in &config.regions {
        let region = Region::connect(setup, &config.state_dir).await?;
        if regions.iter().any(|r| r.name == region.name) {
            return Err(ConsoleError::DuplicateRegion(region.name));
        }
        regions.push(region);
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ConsoleError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
        addr: config.listen,
        source,
    })?;
    let guard = guard::Guard::new(addr);
    let login_url = format!("http://{addr}/login/{}", guard.login_secret());
    let console = Arc::new(Console { regions, guard });
    let app = pages::router(console);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(RunningConsole {
        addr,
        login_url,
        stop: Some(stop),
        task,
    })
}
