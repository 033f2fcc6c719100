//! Kestrel's VM layer: the [`Hypervisor`] trait a sandbox runs on, and its
//! backends.
//!
//! A backend owns whatever isolates the guest (a VM process, or nothing at
//! all for the `process` backend) and tells the runtime where the guest's
//! agent listens. The runtime never cares which backend it got: it prepares,
//! starts, dials [`Hypervisor::agent_address`], watches
//! [`Hypervisor::exit_watch`] to learn of the guest's death, and stops.
//!
//! Backends ([`backend::Backend`]): `builtin` (our `kestrel-vmm` binary),
//! `qemu` (QEMU microvm with `kestrel-vmm vhost-user-vsock` serving its
//! vsock), `cloud-hypervisor`, and `process` (the agent on the host, no VM,
//! for development and tests); `auto` picks builtin or qemu by what KVM can
//! do here ([`backend::select`]).
//!
//! This crate only launches: the VMM itself lives in the `kestrel-vmm`
//! crate, so the shim and the CLI link no KVM or vhost-user code.

pub mod backend;
pub mod state_dir;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
pub use kestrel_guest_image::VmShape;
use tokio::sync::watch;

/// What a backend needs to know about the sandbox it runs.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The sandbox id (a pod's id, or its only container's).
    pub id: String,
    /// A directory owned by this sandbox: sockets, logs, the shared dir.
    /// Created by `prepare`, removed by `stop`.
    pub state_dir: PathBuf,
    /// The agent binary (for the process backend; VM backends boot it as
    /// the guest's /init instead).
    pub agent_path: PathBuf,
    /// The agent's log level (`error`, `warn`, `info`, `debug`, `trace`).
    pub agent_log_level: String,
    /// The guest VM's shape; VM backends refuse a spec without one, the
    /// process backend ignores it.
    pub vm: Option<VmSpec>,
    /// The network namespace on the host that the pod's network lives in
    /// (a CRI pod's CNI namespace). The process backend runs its agent in
    /// it, so a pod on the host gets the pod's network and never the host's.
    pub netns: Option<PathBuf>,
    /// The guest's network cards, in order (the first is the guest's
    /// `eth0` until the agent renames it). Empty: the guest has only
    /// loopback. The process backend refuses none of them and uses none:
    /// its agent already lives in `netns`.
    pub nics: Vec<GuestNic>,
    /// A host directory the guest mounts over virtio-fs, served by a
    /// virtiofsd the backend starts (VM backends only; the process backend
    /// ignores it, its agent sees the host). `None`: the guest sees no host
    /// files, and root filesystems are copied in.
    pub shared_fs: Option<SharedFs>,
}

/// A host directory shared with the guest over virtio-fs.
///
/// The VM backends start virtiofsd on it before the VMM (socket
/// `<state_dir>/virtiofsd.sock`, log `<state_dir>/virtiofsd.log`), give the
/// guest a virtio-fs device with `tag`, and stop virtiofsd after the VMM.
/// virtiofsd's death while the VMM runs ends the sandbox like the guest's
/// own: the exit watch fires, and containers go STOPPED with status 255.
///
/// The runtime owns the directory's contents: it creates the directory
/// before `prepare`, bind-mounts each container's rootfs (and volumes)
/// under it whenever it likes (virtiofsd is chrooted in the host's mount
/// namespace, so later mounts reach the guest at once), and unmounts them
/// before `stop`, which removes the state directory (a directory inside it
/// included) with everything still in it. In the guest the agent mounts
/// it with `mount -t virtiofs <tag> <mount point>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFs {
    /// The host directory; it must exist when the sandbox is prepared.
    pub dir: PathBuf,
    /// The virtio-fs tag the guest mounts by: 1 to [`SharedFs::MAX_TAG_LEN`]
    /// bytes, no whitespace, commas or control characters.
    pub tag: String,
    /// How much the guest may cache.
    pub cache: FsCache,
}

impl SharedFs {
    /// virtio-fs's tag field: 36 bytes.
    pub const MAX_TAG_LEN: usize = 36;

    /// Whether every VMM's command line and the guest's `mount` can carry
    /// the tag.
    pub fn tag_is_valid(&self) -> bool {
        (1..=Self::MAX_TAG_LEN).contains(&self.tag.len())
            && !self
                .tag
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    }
}

/// virtiofsd's `--cache` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsCache {
    /// The guest caches nothing: every access asks the host, so changes
    /// made on the host (a bind mount added, a file written) are seen at
    /// once. The safe choice for directories the host also writes.
    #[default]
    Never,
    /// The guest caches attributes and data for about a second: faster,
    /// for directories only the guest writes (a container's rootfs).
    Auto,
}

impl FsCache {
    /// The value virtiofsd's `--cache` takes.
    pub fn name(self) -> &'static str {
        match self {
            FsCache::Never => "never",
            FsCache::Auto => "auto",
        }
    }
}

/// One virtio-net card of the guest, backed by a tap on the host.
#[derive(Debug, Clone)]
pub struct GuestNic {
    /// The tap, opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (frames
    /// carry a virtio-net header) in the pod's network namespace. The VMM
    /// inherits this descriptor; the tap lives as long as one is open.
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    /// The card's MAC address as the guest sees it: the CNI interface's,
    /// so the pod's neighbours need not learn a new one.
    pub mac: [u8; 6],
    /// The MTU of the interface it stands for.
    pub mtu: u32,
    /// Whether the card offers checksum and segmentation offloads (the
    /// tap carries them through to the host's stack).
    pub offload: bool,
}

impl GuestNic {
    /// The MAC as `aa:bb:cc:dd:ee:ff`, the form every VMM's command line takes.
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// What a VM backend boots: our guest image and the VM's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The guest kernel: an uncompressed `vmlinux` ELF (every backend boots
    /// it without firmware).
    pub kernel: PathBuf,
    /// The initramfs whose /init is the agent.
    pub initrd: PathBuf,
    /// Guest memory and vCPUs.
    pub shape: VmShape,
    /// Extra kernel command-line parameters, appended after the backend's own.
    pub kernel_params: String,
}

/// The kernel command line every VM backend starts from: the guest image's.
pub use kestrel_guest_image::KERNEL_PARAMS as BASE_KERNEL_PARAMS;

/// How the guest (VM or agent process) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The process exited with this code.
    Exited(i32),
    /// The process was killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::Exited(code) => write!(f, "exited with status {code}"),
            GuestExit::Signaled(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("refusing to touch {0}: it is not a sandbox directory Kestrel created (no {marker} in it)", marker = state_dir::MARKER)]
    NotOurs(PathBuf),
    #[error("refusing to remove {}: {} is still mounted below it (removing would delete what the mount shows)", dir.display(), mounts.first().map(|m| m.display().to_string()).unwrap_or_default())]
    StillMounted { dir: PathBuf, mounts: Vec<PathBuf> },
    #[error("the {0} backend needs a VM spec (kernel, initrd, size); none was given")]
    NoVmSpec(&'static str),
    #[error("the agent binary {0} does not exist or is not executable")]
    AgentMissing(PathBuf),
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {0} backend was asked to {1} before it was prepared")]
    NotPrepared(&'static str, &'static str),
    #[error("the {0} backend was asked to {1} but it is already running")]
    AlreadyStarted(&'static str, &'static str),
    #[error("{helper} exited before the VM started: {exit} (its log: {log})")]
    HelperExit {
        helper: &'static str,
        exit: GuestExit,
        log: PathBuf,
    },
    #[error("the {backend} guest exited before its agent was reachable: {exit}")]
    EarlyExit {
        backend: &'static str,
        exit: GuestExit,
    },
}

/// A way to run a sandbox's guest.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Which backend this is.
    fn backend(&self) -> backend::Backend;

    /// The backend's configuration name (`process`, `builtin`, `qemu`, ...).
    fn name(&self) -> &'static str {
        self.backend().name()
    }

    /// Checks what the backend needs and lays out the sandbox's files;
    /// nothing runs yet.
    async fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error>;

    /// Starts the guest. Returns once the guest runs; the agent may still be
    /// booting, so callers dial with retries.
    async fn start(&mut self) -> Result<(), Error>;

    /// Where the guest's agent listens, as `unix://PATH`,
    /// `vsock://CID:PORT` or `hvsock://PATH:PORT`. Known after `prepare`.
    fn agent_address(&self) -> Option<String>;

    /// The pid of the process that embodies the guest, once started.
    fn pid(&self) -> Option<u32>;

    /// Holds `None` while the guest runs and `Some(exit)` once it ended,
    /// whatever the reason (stop, crash, kill from outside).
    fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>>;

    /// Stops the guest: a polite request first, then a kill after `grace`;
    /// removes the sandbox's state directory. Stopping a guest that already
    /// ended only cleans up. Returns how the guest ended.
    async fn stop(&self, grace: Duration) -> Result<Option<GuestExit>, Error>;
}

/// Waits until `watch` reports the guest's exit.
pub async fn wait_exit(mut watch: watch::Receiver<Option<GuestExit>>) -> Option<GuestExit> {
    let seen = watch.wait_for(Option::is_some).await.map(|exit| *exit);
    // Err: the backend is gone; whatever it last saw is all we will know.
    seen.unwrap_or_else(|_| *watch.borrow())
}
