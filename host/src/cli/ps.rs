//! `kestrel ps`: the CLI's containers and what their shims say of them.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::containers::Container;
use super::shim::{status_name, Shim};
use containerd_shim_protos::types::task::Status;

const NOT_ANSWERING: &str = "UNKNOWN (shim not answering)";

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One container as `ps` and `events` see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub id: String,
    pub status: String,
    pub pid: u32,
    /// The exit status of a stopped container.
    pub exit: Option<u32>,
    pub image: String,
}

/// Asks the container's shim for its state.
pub async fn row(container: &Container) -> Row {
    let mut row = Row {
        id: container.id.clone(),
        status: NOT_ANSWERING.into(),
        pid: 0,
        exit: None,
        image: container.rootfs(),
    };
    let Ok(shim) = Shim::open(container).await else {
        return row;
    };
    if let Ok(state) = shim.state("").await {
        row.status = status_name(&state).into();
        row.pid = state.pid;
        if state.status.enum_value_or(Status::UNKNOWN) == Status::STOPPED {
            row.exit = Some(state.exit_status);
        }
    }
    row
}

pub async fn run(args: PsArgs) -> Result<ExitCode> {
    let mut rows = Vec::new();
    for container in Container::list()? {
        rows.push(row(&container).await);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<30} {:>8} {:>5}  IMAGE",
        "ID", "STATUS", "PID", "EXIT"
    );
    for r in rows {
        let exit = r.exit.map(|e| e.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<30} {:>8} {:>5}  {}",
            r.id, r.status, r.pid, exit, r.image
        );
    }
    Ok(ExitCode::SUCCESS)
}
