//! `kestrel ps`: the CLI's containers and what their shims say of them.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::containers::Container;
use super::network;
use super::shim::{status_name, Shim};
use containerd_shim_protos::types::task::Status;
use kestrel_host::config::Config;
use kestrel_host::sandbox;

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
    /// Whether its sandbox's relister keeps relisting (`ps` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_health: Option<String>,
    /// Its addresses on its CNI network (`ps` only; none without one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
}

/// Asks the container's shim for its state.
pub async fn row(container: &Container) -> Row {
    let mut row = Row {
        id: container.id.clone(),
        status: NOT_ANSWERING.into(),
        pid: 0,
        exit: None,
        image: container.rootfs(),
        sandbox_health: None,
        ips: Vec::new(),
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
    // Without a readable configuration the sandboxes' directory is unknown:
    // list the containers all the same.
    let config = Config::load().ok();
    let mut rows = Vec::new();
    for container in Container::list()? {
        let mut row = row(&container).await;
        row.ips = network::ips(&container.dir)
            .iter()
            .map(ToString::to_string)
            .collect();
        if let Some(config) = &config {
            row.sandbox_health = Some(sandbox::health(config, &container.sandbox_id()).to_string());
        }
        rows.push(row);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<30} {:>8} {:>5}  {:<10} {:<15} IMAGE",
        "ID", "STATUS", "PID", "EXIT", "SANDBOX", "IP"
    );
    for r in rows {
        let exit = r.exit.map(|e| e.to_string()).unwrap_or_else(|| "-".into());
        let health = r.sandbox_health.as_deref().unwrap_or("unknown");
        let ip = if r.ips.is_empty() {
            "-".to_string()
        } else {
            r.ips.join(",")
        };
        println!(
            "{:<20} {:<30} {:>8} {:>5}  {:<10} {:<15} {}",
            r.id, r.status, r.pid, exit, health, ip, r.image
        );
    }
    Ok(ExitCode::SUCCESS)
}
