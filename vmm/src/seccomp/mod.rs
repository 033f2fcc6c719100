//! Seccomp filters: every kestrel-vmm thread confines itself to the system
//! calls it needs, after Firecracker's per-thread filters.
//!
//! Each kind of thread ([`ThreadKind`]) has its own allow list, built with
//! `seccompiler`. A thread installs its [`Filter`] on itself as it starts
//! ([`spawn_confined`]), without TSYNC: a vCPU thread never gets the main
//! thread's system calls, nor the other way round. The kernel copies a
//! thread's filters to the threads it starts later, which is how the
//! vhost-user protocol thread, which `vhost-user-backend` starts with no
//! hook of ours to run first, gets its filter (see [`crate::vhost_user`]).
//!
//! A call outside the list raises SIGSYS (`SeccompAction::Trap`); the
//! handler writes one line to stderr,
//!
//! ```text
//! kestrel-vmm: seccomp: thread NAME made a disallowed syscall NR (SYSCALL); exiting
//! ```
//!
//! (`(SYSCALL)` only where libc names the number) and ends the process with
//! [`EXIT_STATUS`], 148 as in Firecracker. One exception: a thread that has
//! SIGSYS blocked when it makes the call (glibc blocks every signal inside
//! `pthread_create` and `pthread_kill`) cannot run the handler, so the
//! kernel ends the process with SIGSYS itself and nothing is written.
//! `--no-seccomp` (on `kestrel-vmm` and on `kestrel-vmm vhost-user-vsock`)
//! installs nothing, for debugging.
//!
//! Two calls fail with ENOSYS rather than kill, answered by a second, small
//! filter installed with each allow list (where two filters answer, the
//! kernel keeps the error over the allow, and the trap over both):
//! - `openat`: glibc's malloc opens `/proc/sys/vm/overcommit_memory` the
//!   first time any thread's heap shrinks, at a moment no one chooses, and
//!   does without it when it cannot; a kill there would end a healthy VMM.
//! - `clone3`: glibc then starts threads with `clone`, whose flags are
//!   registers a filter can read (`clone3` passes them in memory), so a
//!   thread allowed to start threads cannot start processes.

mod allowlists;
mod sigsys;
mod syscall_names;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The exit status of a process that a seccomp filter stopped.
pub const EXIT_STATUS: i32 = 148;

/// The kinds of thread, each with its own allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The builtin VMM's main thread once the vCPUs run: waits for the
    /// guest's end or a stop signal, kicks and joins the vCPU threads,
    /// removes the vsock socket.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the port and MMIO exits it hands to the
    /// devices (console output, interrupts, the vsock device's activation).
    Vcpu,
    /// The thread that runs the vsock core: the builtin VMM's vsock device
    /// thread, or vhost-user-backend's vring worker. It moves packets
    /// between guest memory and the hybrid vsock's Unix sockets.
    Vsock,
    /// A virtio-net device thread: moves frames between guest memory and
    /// its tap, and sets the tap's offloads when the guest's driver starts
    /// the device.
    Net,
    /// A virtio-fs device thread: tells the vhost-user-fs backend
    /// (virtiofsd) about the guest's memory and rings when the guest's
    /// driver starts or resets the device, and turns the backend's
    /// used-buffer events into interrupts.
    Fs,
    /// `kestrel-vmm vhost-user-vsock`'s main thread once the backend is set
    /// up, and the vhost-user protocol thread it starts: accepts QEMU,
    /// maps the guest memory QEMU sends, starts threads.
    VhostUser,
    /// `kestrel-vmm vhost-user-vsock`'s stop-signal thread: reads the
    /// signalfd, removes the sockets, exits.
    Signals,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Vsock,
        ThreadKind::Net,
        ThreadKind::Fs,
        ThreadKind::VhostUser,
        ThreadKind::Signals,
    ];
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Net => "net",
            ThreadKind::Fs => "fs",
            ThreadKind::VhostUser => "vhost-user",
            ThreadKind::Signals => "signals",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the {kind} thread's seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} thread's seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("starting the thread {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// One kind of thread's filters, compiled and ready to install.
#[derive(Debug, Clone)]
pub struct Filter {
    kind: ThreadKind,
    /// The calls answered with an error rather than allowed.
    errors: BpfProgram,
    /// The allow list; everything else traps.
    allow: BpfProgram,
}

impl Filter {
    /// Compiles `kind`'s filters for x86_64, the only architecture the VMM
    /// boots.
    pub fn new(kind: ThreadKind) -> Result<Filter, Error> {
        let build = |source| Error::Build { kind, source };
        let errors = ANSWERED_WITH_ENOSYS.map(|nr| (nr, Vec::new())).into();
        let errors = compile(
            errors,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )
        .map_err(build)?;
        let allow = allowlists::rules(kind).map_err(build)?;
        let allow = compile(allow, SeccompAction::Trap, SeccompAction::Allow).map_err(build)?;
        Ok(Filter {
            kind,
            errors,
            allow,
        })
    }

    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// Confines the calling thread, and the threads it starts from now on.
    /// Filters only add up: nothing can lift them.
    pub fn install(&self) -> Result<(), Error> {
        sigsys::install_handler().map_err(Error::Handler)?;
        let install = |program: &BpfProgram| {
            seccompiler::apply_filter(program).map_err(|source| Error::Install {
                kind: self.kind,
                source,
            })
        };
        install(&self.errors)?;
        install(&self.allow)
    }
}

/// Starts a thread named `name` that confines itself with `filter` (not
/// at all with `None`) and then runs `body`. Returns once the thread is
/// confined, or with the reason it could not be; then `body` never runs,
/// and the thread ends with `None`.
pub fn spawn_confined<T, F>(
    name: &str,
    filter: Option<Filter>,
    body: F,
) -> Result<JoinHandle<Option<T>>, Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let spawn_err = |source| Error::Spawn {
        name: name.to_string(),
        source,
    };
    let (confined, outcome) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let installed = filter.as_ref().map_or(Ok(()), Filter::install);
            let go_on = installed.is_ok();
            let _ = confined.send(installed);
            go_on.then(body)
        })
        .map_err(spawn_err)?;
    match outcome.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(spawn_err(std::io::Error::other(
            "it ended before it confined itself",
        ))),
    }
}

/// The calls the errors filter answers with ENOSYS, as if this kernel
/// had no such call: glibc then falls back (`clone` for `clone3`) or does
/// without (its malloc's `openat`). Every allow list lists them too, or the
/// allow list's trap would win over the error.
const ANSWERED_WITH_ENOSYS: [i64; 2] = [libc::SYS_openat, libc::SYS_clone3];

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, seccompiler::BackendError> {
    BpfProgram::try_from(SeccompFilter::new(
        rules,
        mismatch,
        matched,
        TargetArch::x86_64,
    )?)
}
