//! `pil console`: starts the auditor console and prints the address to open.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use crate::{
    console::{self, ConsoleConfig, RegionSetup},
    profile::Profile,
};

#[derive(Args)]
pub struct ConsoleArgs {
    /// The home region's tree-head public key (PEM), or its key history; the home
    /// region is the one --profile reaches, and answers patient reports for all.
    #[arg(long)]
    public_key: PathBuf,
    /// Another region to read: PROFILE,PUBLIC_KEY — the auditor's profile for that
    /// region's node and the node's public key (repeatable).
    #[arg(long = "region", value_name = "PROFILE,PUBLIC_KEY")]
    regions: Vec<String>,
    /// Where to listen: a loopback address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where the last head seen of each log is kept between runs (default:
    /// $XDG_STATE_HOME/pil/console or ~/.local/state/pil/console).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Ok(PathBuf::from(dir).join("pil/console"));
    }
    let home = std::env::var_os("HOME").context("no HOME: pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/pil/console"))
}

/// Runs the console until Ctrl-C.
pub async fn run(profile: &std::path::Path, args: ConsoleArgs) -> anyhow::Result<()> {
    let mut regions = vec![RegionSetup {
        profile: Profile::load(profile)?,
        public_key: args.public_key,
    }];
    for spec in &args.regions {
        let Some((profile, key)) = spec.split_once(',') else {
            bail!("--region {spec:?}: expected PROFILE,PUBLIC_KEY");
        };
        regions.push(RegionSetup {
            profile: Profile::load(std::path::Path::new(profile))?,
            public_key: PathBuf::from(key),
        });
    }
    let state_dir = match args.state_dir {
        Some(dir) => dir,
        None => state_dir()?,
    };
    let running = console::start(ConsoleConfig {
        listen: args.listen,
        regions,
        state_dir,
    })
    .await?;
    println!(
        "open {} in your browser (the address works once, and only from this machine); \
         Ctrl-C stops the console",
        running.login_url()
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    running.stop().await.context("stopping the console")?;
    Ok(())
}
