//! `kestrel exec`: another process in a running container.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::bundle;
use super::containers::Container;
use super::run::{exit_code, wait_forwarding};
use super::shim::Shim;
use super::stdio::Fifos;
use super::terminal::WindowSize;

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and copy ours to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// The container's id.
    pub id: String,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn run(args: ExecArgs) -> Result<ExitCode> {
    let container = Container::open(&args.id)?;
    let shim = Shim::open(&container).await?;
    // Watched from before its size is read: a change in between then
    // reaches the process too.
    let mut window = args.tty.then(WindowSize::watch).flatten();
    let size = window.as_ref().and_then(WindowSize::current);
    let mut process = bundle::exec_process(&args.command, args.tty, size);
    super::security::inherit_from_container(&mut process, &container.dir)?;
    let exec_id = format!("exec-{}", std::process::id());
    let fifos = Fifos::make(&container.dir, &exec_id, args.interactive, args.tty)?;
    let result = exec(&shim, &exec_id, &fifos, &args, &process, window.as_mut()).await;
    fifos.remove();
    let _ = shim.delete(&exec_id).await;
    result
}

async fn exec(
    shim: &Shim,
    exec_id: &str,
    fifos: &Fifos,
    args: &ExecArgs,
    process: &serde_json::Value,
    window: Option<&mut WindowSize>,
) -> Result<ExitCode> {
    let outputs = fifos.copy_outputs()?;
    shim.exec(exec_id, process, &fifos.paths).await?;
    fifos.copy_stdin();
    // Raw before the process starts: its first output must not pass
    // through our line discipline too (a second CR before each LF).
    let raw = args.tty.then(super::terminal::RawMode::enter).flatten();
    shim.start(exec_id).await?;
    let status = wait_forwarding(shim, exec_id, window).await?;
    outputs.drain().await;
    drop(raw);
    Ok(exit_code(status))
}
