//! `kestrel agent ...`: direct checks against an agent.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use kestrel_host::agent_client;
use kestrel_host::dial::Address;

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Ask an agent whether it is serving, and its version.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// unix:///PATH, vsock://CID:PORT or hvsock://PATH:PORT (hybrid vsock).
    #[arg(long)]
    pub address: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cmd: AgentCommand) -> Result<ExitCode> {
    match cmd {
        AgentCommand::Check(args) => check(args).await,
    }
}

async fn check(args: CheckArgs) -> Result<ExitCode> {
    let address: Address = args.address.parse()?;
    let health = agent_client::check(&address, Duration::from_secs(args.timeout)).await?;
    if args.json {
        println!("{}", serde_json::to_string(&health)?);
    } else {
        println!("{}", health.status);
        println!(
            "agent version {} ({})",
            health.agent_version, health.api_version
        );
    }
    Ok(if health.serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
