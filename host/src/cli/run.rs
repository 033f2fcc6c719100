//! `kestrel run`: a container from a rootfs directory, through the Kestrel
//! shim started as containerd would start it, with our stdio attached.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::bundle;
use super::containers::Container;
use super::network;
use super::shim::{self, Shim};
use super::stdio::Fifos;
use super::terminal::WindowSize;
use kestrel_host::config::Config;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The backend to run the sandbox with (process, qemu, builtin,
    /// cloud-hypervisor, auto); default: the config's `[sandbox] hypervisor`.
    #[arg(long)]
    pub hypervisor: Option<String>,
    /// Delete the container and stop its shim when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Print the id and return once the container started.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep stdin open and copy ours to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short, long)]
    pub tty: bool,
    #[command(flatten)]
    pub security: super::security::SecurityArgs,
    #[command(flatten)]
    pub network: network::NetworkArgs,
    /// The container's root filesystem: a directory.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// The container's id.
    pub id: String,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    if args.detach && args.rm {
        bail!("--rm and -d cannot be combined: nothing would be left to wait for the exit");
    }
    args.network.check()?;
    if !args.rootfs.is_dir() {
        bail!("rootfs {}: not a directory", args.rootfs.display());
    }
    let rootfs = std::fs::canonicalize(&args.rootfs)
        .with_context(|| format!("rootfs {}", args.rootfs.display()))?;
    // The shim reads the same configuration: say what is wrong with it here,
    // where the user sees it, rather than in the shim's log.
    let config = match &args.hypervisor {
        Some(hypervisor) => Config::load()?.with_hypervisor(hypervisor)?,
        None => Config::load()?,
    };
    let container = Container::create(&args.id)?;
    let result = start_and_wait(&args, &config, &container, &rootfs).await;
    if result.is_err() {
        // Nothing the user could attach to again: take it all down.
        if let Ok(shim) = Shim::open(&container).await {
            let _ = shim.delete("").await;
            let _ = shim.shutdown().await;
        }
        match network::detach(&container, true).await {
            Ok(()) => {
                let _ = container.remove();
            }
            Err(e) => eprintln!("kestrel: {e:#}"),
        }
    }
    result
}

async fn start_and_wait(
    args: &RunArgs,
    config: &Config,
    container: &Container,
    rootfs: &std::path::Path,
) -> Result<ExitCode> {
    // Watched from before its size is read: a change in between then
    // reaches the container too.
    let mut window = args.tty.then(WindowSize::watch).flatten();
    let size = window.as_ref().and_then(WindowSize::current);
    let mut spec = bundle::spec(&container.id, rootfs, &args.command, args.tty, size);
    args.security.apply(&mut spec)?;
    let attached = network::attach(container, &args.network, config).await?;
    network::apply(&mut spec, &container.dir, attached.as_ref())?;
    bundle::write(&container.dir, &spec).context("writing the bundle")?;

    let spinner = Spinner::start("starting the shim");
    let address = {
        let container = container.clone();
        let hypervisor = args.hypervisor.clone();
        tokio::task::spawn_blocking(move || shim::start(&container, hypervisor.as_deref()))
            .await??
    };
    let shim = Shim::connect(&container.id, &address).await?;

    let fifos = if args.detach {
        None
    } else {
        Some(Fifos::make(
            &container.dir,
            "init",
            args.interactive,
            args.tty,
        )?)
    };
    let outputs = match &fifos {
        Some(fifos) => Some(fifos.copy_outputs()?),
        None => None,
    };
    spinner.set_message("booting the sandbox");
    let stdio = fifos.as_ref().map(|f| f.paths.clone()).unwrap_or_default();
    shim.create(&container.dir, &stdio).await?;
    if let Some(fifos) = &fifos {
        fifos.copy_stdin();
    }
    // Raw before the process starts: its first output must not pass
    // through our line discipline too (a second CR before each LF).
    let raw = (args.tty && !args.detach)
        .then(super::terminal::RawMode::enter)
        .flatten();
    shim.start("").await?;
    spinner.finish();
    if args.detach {
        println!("{}", container.id);
        return Ok(ExitCode::SUCCESS);
    }

    let status = wait_forwarding(&shim, "", window.as_mut()).await?;
    if let Some(outputs) = outputs {
        outputs.drain().await;
    }
    drop(raw);
    if let Some(fifos) = &fifos {
        fifos.remove();
    }
    if args.rm {
        shim.delete("").await?;
        shim.shutdown().await?;
        network::detach(container, false).await?;
        container.remove()?;
    }
    Ok(exit_code(status))
}

/// Waits for a process of the container (the init for an empty exec id):
/// SIGINT and SIGTERM to us become SIGTERM to it, and our terminal's size
/// changes, with `window`, resize its terminal.
pub async fn wait_forwarding(
    shim: &Shim,
    exec_id: &str,
    mut window: Option<&mut WindowSize>,
) -> Result<u32> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let wait = shim.wait(exec_id);
    tokio::pin!(wait);
    loop {
        let resized = async {
            match window.as_deref_mut() {
                Some(window) => window.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = &mut wait => return Ok(status?),
            _ = interrupt.recv() => shim.kill(exec_id, libc::SIGTERM as u32).await?,
            _ = terminate.recv() => shim.kill(exec_id, libc::SIGTERM as u32).await?,
            Some((rows, cols)) = resized => {
                // A resize that races the process's exit fails; the exit
                // is what the user gets to see, so the failure is dropped.
                let _ = shim.resize_pty(exec_id, rows, cols).await;
            }
        }
    }
}

/// Our exit status for a process's: the same, where it fits.
pub fn exit_code(status: u32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX))
}

/// A spinner on stderr while the sandbox starts, only where stderr is a terminal.
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn start(message: &'static str) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let bar = indicatif::ProgressBar::new_spinner().with_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(bar))
    }

    fn set_message(&self, message: &'static str) {
        if let Some(bar) = &self.0 {
            bar.set_message(message);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.finish();
    }
}
