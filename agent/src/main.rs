//! `kestrel-agent`: the guest agent. As the guest's PID 1 it sets the guest
//! up and serves the Kata agent API on vsock port 1024; with
//! `--listen unix://PATH` it runs on the host without a VM (host mode).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kestrel_protocols::ttrpc::r#async::transport::Listener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::level_filters::LevelFilter;

use kestrel_agent::reaper::Reaper;
use kestrel_agent::sandbox::Sandbox;
use kestrel_agent::{container, init, server, VERSION};

/// How long the server lets in-flight replies (DestroySandbox's own among
/// them) go out when it stops. A runtime's long polls (WaitProcess,
/// GetOOMEvent) never finish on their own, so this is a short, fixed wait.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

#[derive(Parser, Debug)]
#[command(
    name = "kestrel-agent",
    version,
    about = "Kestrel guest agent: the Kata agent API over ttrpc"
)]
struct Args {
    /// Address to serve on: vsock://CID:PORT (CID -1 = any) or unix:///path.
    #[arg(long, default_value_t = format!("vsock://-1:{}", kestrel_protocols::AGENT_VSOCK_PORT))]
    listen: String,
    /// Directory CopyFile may write into; relative rootfs paths start here.
    #[arg(long, default_value = kestrel_protocols::GUEST_SHARED_DIR)]
    shared_dir: PathBuf,
    /// Log level: error, warn, info, debug or trace (or env KESTREL_LOG).
    #[arg(long)]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == container::setup::SETUP_ARG)
    {
        container::setup::run();
    }
    let pid1 = init::is_pid1();
    let args = match Args::try_parse() {
        Ok(args) => args,
        // The kernel hands init whatever command-line words it did not
        // understand; PID 1 must not die over them.
        Err(e) if pid1 => {
            eprintln!("kestrel-agent: ignoring arguments: {e}");
            Args::parse_from(["kestrel-agent"])
        }
        Err(e) => e.exit(),
    };
    let level = args
        .log_level
        .clone()
        .or_else(|| std::env::var("KESTREL_LOG").ok())
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    init::ensure_std_fds();
    if pid1 {
        init::setup_guest();
    } else if let Err(e) = init::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(args, pid1));
    if pid1 {
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "agent failed");
        }
        init::power_off();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kestrel-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args, pid1: bool) -> anyhow::Result<()> {
    let reaper = Reaper::default();
    reaper.start().context("installing the SIGCHLD handler")?;
    let sandbox = Arc::new(Sandbox::new(reaper, args.shared_dir.clone(), pid1));
    let socket = args.listen.strip_prefix("unix://").map(PathBuf::from);
    if let Some(path) = &socket {
        prepare_socket_path(path)?;
    }
    let listener =
        Listener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let mut server = server::server(listener, Arc::clone(&sandbox));
    server.start().await.context("starting the ttrpc server")?;
    tracing::info!(address = %args.listen, version = VERSION, pid1, "agent serving");

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = sandbox.shutdown_requested() => tracing::info!("DestroySandbox: shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    sandbox.teardown().await;
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Refuses a socket another agent is serving on; clears a stale one.
fn prepare_socket_path(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another process is already serving on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}
