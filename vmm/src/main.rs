//! `kestrel-vmm`: boots a Linux guest on KVM with a serial console, a
//! Firecracker-compatible hybrid vsock socket, NICs on inherited taps, and
//! shared directories served by virtiofsd.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kestrel_vmm::seccomp::{self, Filter, ThreadKind};
use kestrel_vmm::vm::virtio::fs::FsConfig;
use kestrel_vmm::vm::virtio::net::NetConfig;
use kestrel_vmm::vm::{SerialOut, Vm, VmConfig, VmExit, VmShape, DEFAULT_CMDLINE};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

#[derive(Parser, Debug)]
#[command(
    name = "kestrel-vmm",
    version,
    about = "Kestrel's minimal KVM VMM",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The guest kernel: a vmlinux ELF (preferred) or a bzImage.
    #[arg(long, value_name = "FILE", required = true)]
    kernel: Option<PathBuf>,
    /// An initramfs to hand the kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// The kernel command line (`acpi=off`, unless it has an `acpi=` option,
    /// and the virtio-mmio devices are appended to it).
    #[arg(long, value_name = "S", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = VmShape::default().memory_mib)]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = VmShape::default().vcpus)]
    vcpus: u8,
    /// Hybrid vsock socket: `CONNECT <port>\n` to reach the guest; guest
    /// connections to port P go to PATH_P. No vsock device without it.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long, value_name = "CID", default_value_t = kestrel_vmm::vsock::DEFAULT_GUEST_CID)]
    vsock_cid: u64,
    /// A guest NIC on a tap this process inherited, opened by the caller
    /// with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; repeat for more NICs, the
    /// first is the guest's eth0. mtu defaults to 1500, offload (checksum,
    /// TSO, UFO, passed through to the tap) to on.
    #[arg(
        long = "net",
        value_name = "tap-fd=N,mac=aa:bb:cc:dd:ee:ff[,mtu=N][,offload=on|off]"
    )]
    nets: Vec<NetConfig>,
    /// A shared directory: a virtio-fs device whose requests the
    /// vhost-user-fs backend (virtiofsd) listening on `socket` serves; the
    /// guest mounts it with `mount -t virtiofs TAG DIR`. The backend must
    /// listen before the VMM starts. queue-size (each of the two queues'
    /// largest size, a power of two) defaults to 1024. Repeat for more.
    #[arg(long = "fs", value_name = "socket=PATH,tag=TAG[,queue-size=N]")]
    filesystems: Vec<FsConfig>,
    /// Where the serial console goes: a file, or `stdout`.
    #[arg(long, value_name = "FILE|stdout", default_value = "stdout")]
    serial: String,
    /// Log level for the VMM's own messages (on stderr).
    #[arg(long, default_value = "warn", global = true)]
    log_level: tracing::Level,
    /// Run without seccomp filters, for debugging. By default each thread
    /// confines itself to the system calls it needs, and any other call
    /// ends kestrel-vmm with exit status 148 after a line on stderr naming
    /// the thread and the call.
    #[arg(long, global = true)]
    no_seccomp: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Serve our vsock device to another VMM (QEMU's
    /// vhost-user-vsock-device) until it disconnects.
    VhostUserVsock {
        /// The vhost-user socket to listen on (QEMU connects to it).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The hybrid vsock socket host programs connect to.
        #[arg(long, value_name = "PATH")]
        uds: PathBuf,
        /// The guest's vsock context id.
        #[arg(long, value_name = "CID", default_value_t = kestrel_vmm::vsock::DEFAULT_GUEST_CID)]
        guest_cid: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(args.log_level)
        .with_target(false)
        .init();
    if let Some(Command::VhostUserVsock {
        socket,
        uds,
        guest_cid,
    }) = args.command
    {
        return match serve_vhost_user(&socket, &uds, guest_cid, !args.no_seccomp) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kestrel-vmm vhost-user-vsock: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(VmExit::Failed { .. }) => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kestrel-vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<VmExit> {
    if args.vcpus == 0 {
        anyhow::bail!("--vcpus must be at least 1");
    }
    let stop = stop_signal_fd()?;

    let Some(kernel) = args.kernel else {
        anyhow::bail!("--kernel is required");
    };
    let config = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        shape: VmShape {
            memory_mib: args.memory,
            vcpus: args.vcpus,
        },
        vsock_uds: args.vsock_uds,
        vsock_cid: args.vsock_cid,
        nets: args.nets,
        filesystems: args.filesystems,
        serial: match args.serial.as_str() {
            "stdout" => SerialOut::Stdout,
            path => SerialOut::File(path.into()),
        },
        seccomp: !args.no_seccomp,
    };
    let vm = Vm::new(&config)?;
    let exit = vm.run(Some(stop.as_fd()))?;
    match &exit {
        VmExit::Failed { .. } => eprintln!("kestrel-vmm: the VM stopped: {exit}"),
        other => tracing::info!("the VM ended: {other}"),
    }
    Ok(exit)
}

/// SIGTERM and SIGINT stop the VMM: blocked here, before any thread exists,
/// so every thread inherits the mask and only the returned fd sees them.
fn stop_signal_fd() -> anyhow::Result<SignalFd> {
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    stop_signals
        .thread_block()
        .context("blocking SIGTERM/SIGINT")?;
    SignalFd::with_flags(&stop_signals, SfdFlags::SFD_CLOEXEC)
        .context("creating a signalfd for SIGTERM/SIGINT")
}

/// Serves the vsock device until QEMU disconnects, or until SIGTERM /
/// SIGINT; either way the sockets are removed.
fn serve_vhost_user(socket: &Path, uds: &Path, cid: u64, seccomp: bool) -> anyhow::Result<()> {
    let stop = stop_signal_fd()?;
    let (socket_path, uds_path) = (socket.to_path_buf(), uds.to_path_buf());
    let filter = seccomp
        .then(|| Filter::new(ThreadKind::Signals))
        .transpose()?;
    seccomp::spawn_confined("stop-signals", filter, move || {
        if stop.read_signal().is_ok() {
            let _ = std::fs::remove_file(&socket_path);
            let _ = std::fs::remove_file(&uds_path);
            std::process::exit(0);
        }
    })?;
    kestrel_vmm::vhost_user::serve(socket, uds, cid, seccomp)?;
    Ok(())
}
