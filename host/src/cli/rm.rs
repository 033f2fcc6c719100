//! `kestrel rm`: a container deleted, its shim stopped, its network taken
//! down, its directory gone.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use containerd_shim_protos::types::task::Status;

use super::containers::Container;
use super::network;
use super::shim::Shim;

/// How long `rm -f` waits for a killed container to stop.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    pub force: bool,
    /// The container's id.
    pub id: String,
}

pub async fn run(args: RmArgs) -> Result<ExitCode> {
    let container = Container::open(&args.id)?;
    let shim = match Shim::open(&container).await {
        Ok(shim) => shim,
        // The shim is gone; its sandbox may not be: the shim's `delete`
        // action stops what it left, as containerd would have it do.
        Err(_) => {
            super::shim::clean_up(&container)?;
            network::detach(&container, args.force).await?;
            container.remove()?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let state = shim.state("").await?;
    let status = state.status.enum_value_or(Status::UNKNOWN);
    if matches!(status, Status::RUNNING | Status::PAUSED | Status::PAUSING) {
        if !args.force {
            bail!("container {} is running (use -f)", args.id);
        }
        shim.kill("", libc::SIGKILL as u32).await?;
        if tokio::time::timeout(KILL_WAIT, shim.wait(""))
            .await
            .is_err()
        {
            bail!("container {} did not stop after SIGKILL", args.id);
        }
    }
    shim.delete("").await?;
    shim.shutdown().await?;
    // After the sandbox is gone: nothing uses the network any more.
    network::detach(&container, args.force).await?;
    container.remove()?;
    Ok(ExitCode::SUCCESS)
}
