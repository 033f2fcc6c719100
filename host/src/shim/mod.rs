//! `containerd-shim-kestrel-v2`: the containerd shim v2 for runtime
//! `io.containerd.kestrel.v2`.
//!
//! containerd runs the binary three ways: `start` (spawn or reuse the shim
//! server for the container's sandbox and print its address), `delete`
//! (clean up after a shim containerd can no longer reach), and, from
//! `start`, the long-running server that serves the Task API.
//!
//! We drive containerd-shim's pieces (flag parsing, spawning, the FIFO
//! logger) from our own bootstrap rather than `containerd_shim::run`,
//! because that crate speaks only the task v3 API and answers `start` in
//! containerd 2's format. Debian's containerd 1.6 calls
//! `containerd.task.v2.Task` and expects a bare address; v3 is a renamed
//! copy of v2, so the one service is registered under both names and
//! `start` prints a bare address, which containerd 2 also accepts.
//!
//! The rooms: [`task`] (the ttrpc Task service, conversions only),
//! [`service`] (the runtime's Task operations), `pool` (sandboxes by id),
//! `exits` (how exits are learned), `teardown` (Delete), `relist_view`
//! (what the relister asks the agent), [`mount`] (the rootfs a container
//! mounts on the host), [`stdio`] (output and input copiers), `log_uri`
//! (what a stdio string names: FIFO, `file://`, `binary://`), `log_binary`
//! (a `binary://` logging program), [`publish`] (events to containerd) and
//! [`error`] (every failure and its wire code).

pub mod error;
mod exits;
mod log_binary;
mod log_uri;
mod logging;
pub mod mount;
mod pool;
pub mod publish;
mod relist_view;
mod runtime_options;
pub mod service;
pub mod stdio;
pub mod task;
mod teardown;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use containerd_shim::{ExitSignal, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::Server;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::lifecycle::events::EventStream;
use crate::sandbox::clean_up_orphan;
use service::Runtime;
use task::TaskService;

/// The runtime name containerd knows the shim by.
pub const RUNTIME_NAME: &str = "io.containerd.kestrel.v2";
const TASK_V3: &str = "containerd.task.v3.Task";
const TASK_V2: &str = "containerd.task.v2.Task";
/// Exit status reported for a container whose shim was lost: it was killed.
const LOST_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// The shim binary's main.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("containerd-shim-kestrel-v2: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!(
            "containerd-shim-kestrel-v2 {} ({RUNTIME_NAME})",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-kestrel-v2: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        check_ids(&flags)?;
        match flags.action.as_str() {
            "start" => start(&flags).await,
            "delete" => delete(&flags),
            "" => serve(&flags).await,
            other => Err(anyhow::anyhow!(
                "unknown action {other:?}: expected start or delete"
            )),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "shim failed");
            eprintln!("containerd-shim-kestrel-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bundle_dir(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    }
}

/// The ids containerd hands every action: they name the shim's socket, the
/// sandbox's state directory and the agent's objects, so they pass the
/// shared id rule before anything is created, joined or removed.
fn check_ids(flags: &Flags) -> anyhow::Result<()> {
    kestrel_protocols::id::validate("container id (-id)", &flags.id)?;
    kestrel_protocols::id::validate("namespace (-namespace)", &flags.namespace)?;
    Ok(())
}

/// The sandbox a container's bundle asks for (its own id if the spec cannot
/// be read), checked against the id rule.
fn sandbox_of_bundle(bundle: &Path, id: &str) -> anyhow::Result<String> {
    let sandbox = match crate::oci::load_bundle_spec(bundle) {
        Ok(spec) => crate::oci::sandbox_id(&spec, id).to_string(),
        Err(_) => id.to_string(),
    };
    kestrel_protocols::id::validate("sandbox id", &sandbox)
        .map_err(|e| anyhow::anyhow!("annotation {}: {e}", crate::oci::SANDBOX_ID_ANNOTATION))?;
    Ok(sandbox)
}

/// `start`: one shim server per sandbox. containerd-shim's `spawn` starts
/// the server (or finds the sandbox's running one) and returns its address.
///
/// The configuration is loaded here first, though only the server uses it:
/// containerd passes this action's stderr on to the user, while a server
/// that fails to load it only reaches containerd's log, and containerd then
/// reports just the address nobody serves.
async fn start(flags: &Flags) -> anyhow::Result<()> {
    Config::load()?;
    let bundle = bundle_dir(flags);
    let grouping = sandbox_of_bundle(&bundle, &flags.id)?;
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    let address = containerd_shim::spawn(opts, &grouping, Vec::new()).await?;
    std::fs::write(bundle.join("address"), &address)?;
    print!("{address}");
    Ok(())
}

/// `delete`: containerd lost the shim. Kill the sandbox's guest if it is
/// still there, unmount the rootfs, and report the container as killed.
fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = bundle_dir(flags);
    let config = config_of_bundle(&bundle).unwrap_or_else(|e| {
        eprintln!(
            "containerd-shim-kestrel-v2: {}; cleaning up with the defaults",
            crate::error_chain(&e)
        );
        Config::default()
    });
    let sandbox_id = sandbox_of_bundle(&bundle, &flags.id)?;
    // containerd 1.6 also runs `delete` after every normal task delete. If
    // the sandbox's shim still serves (other containers of the pod), the
    // sandbox is not orphaned and must be left alone.
    let record = if shim_serves(&bundle) {
        None
    } else {
        clean_up_orphan(&config, &sandbox_id)?
    };
    let rootfs = bundle.join("rootfs");
    if is_mount_point(&rootfs) {
        nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH)?;
    }
    let response = DeleteResponse {
        pid: record.map(|r| r.pid).unwrap_or(0),
        exit_status: LOST_STATUS,
        exited_at: MessageField::some(task::timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    use std::io::Write;
    std::io::stdout().write_all(&response.write_to_bytes()?)?;
    Ok(())
}

/// The file in a bundle that names the configuration its Create's runtime
/// options gave (`ConfigPath`), for the `delete` action, which gets no
/// options but must find the sandbox where that configuration put it.
pub const CONFIG_PATH_FILE: &str = "kestrel-config-path";

/// The configuration a container's sandbox ran with: the one its runtime
/// options named, else the default one.
fn config_of_bundle(bundle: &Path) -> Result<Config, crate::config::ConfigError> {
    match std::fs::read_to_string(bundle.join(CONFIG_PATH_FILE)) {
        Ok(path) => Config::from_file(Path::new(path.trim())),
        Err(_) => Config::load(),
    }
}

/// Whether the shim server whose address `start` wrote in the bundle still
/// accepts connections.
fn shim_serves(bundle: &Path) -> bool {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return false;
    };
    let path = address.trim().trim_start_matches("unix://");
    !path.is_empty() && std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

/// The server: serve the Task API on `-socket` until Shutdown, SIGTERM or
/// SIGINT, then stop every sandbox and remove the socket.
async fn serve(flags: &Flags) -> anyhow::Result<()> {
    if let Err(e) = logging::init(flags.debug) {
        eprintln!("containerd-shim-kestrel-v2: no log FIFO ({e}); logging to stderr");
    }
    let config = Config::load()?;
    let socket = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    let Some(listener) = bind(&socket)? else {
        // Another server already serves this sandbox: containerd uses it.
        signal_started();
        return Ok(());
    };
    // Before anyone can know we are up: a SIGTERM (containerd, systemd, an
    // admin) must take the path Shutdown takes, not the default one that
    // leaves the socket and the sandboxes' VMs behind.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let (events, rx) = EventStream::new();
    let flush = Arc::new(tokio::sync::Notify::new());
    let forwarder = tokio::spawn(publish::forward(
        publish::Destination::from_env(),
        flags.namespace.clone(),
        rx,
        Arc::clone(&flush),
    ));
    let runtime = Runtime::new(config, &flags.namespace, events);
    let exit = Arc::new(ExitSignal::default());
    let service: Arc<TaskService> =
        Arc::new(TaskService::new(Arc::clone(&runtime), Arc::clone(&exit)));

    use containerd_shim_protos::ttrpc::r#async::transport::Listener;
    let mut server = Server::new().add_listener(Listener::try_from(listener)?);
    server = register_task_service(server, service);
    server.start().await?;
    signal_started();
    tracing::info!(socket, "shim serving");

    let why = tokio::select! {
        _ = exit.wait() => "Shutdown",
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(on = why, "shim shutting down");
    // First the socket: a `start` for this sandbox from now on must spawn a
    // new shim rather than reuse this one.
    let _ = std::fs::remove_file(&socket);
    runtime.stop_all().await;
    flush.notify_one();
    let _ = tokio::time::timeout(publish::FLUSH_TIMEOUT, forwarder).await;
    let _ = server.shutdown().await;
    Ok(())
}

/// Registers the Task service under the v3 name and, for containerd 1.x,
/// the v2 name.
pub fn register_task_service(mut server: Server, service: Arc<TaskService>) -> Server {
    server = server.register_service(create_task(service.clone()));
    let mut v2 = create_task(service);
    if let Some(task) = v2.remove(TASK_V3) {
        v2.insert(TASK_V2.to_string(), task);
    }
    server.register_service(v2)
}

/// Binds the shim socket; `None` when a live server already holds it.
fn bind(path: &str) -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    use std::os::unix::net::{UnixListener, UnixStream};
    if let Some(parent) = Path::new(path).parent() {
        std::fs::create_dir_all(parent)?;
    }
    match UnixListener::bind(path) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(path)?;
            Ok(Some(UnixListener::bind(path)?))
        }
        Err(e) => Err(anyhow::anyhow!("binding the shim socket {path}: {e}")),
    }
}

/// `spawn` in the parent reads our stdout until it closes: point stdout at
/// stderr (containerd gives the server a null stderr) to say we are up.
fn signal_started() {
    // SAFETY: dup2 on the process's own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
