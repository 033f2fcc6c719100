//! What the VM backends share: checking the guest image and the binaries
//! they run, running a helper process (a VMM, a vhost-user backend,
//! virtiofsd) in its own process group with its output in a log and its
//! exit watched, and ending the VM when a helper it needs dies.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

use super::select::find_program;
use super::virtiofsd;
use crate::{wait_exit, Error, GuestExit, GuestNic, SandboxSpec, VmSpec, BASE_KERNEL_PARAMS};

/// How long a VMM may take to finish exiting after a helper of its left.
/// A VMM closes its vhost-user sockets in its exit path just before
/// `exit_group`, and the kernel then needs a while to tear down its guest
/// memory and threads (8 ms on an idle host, hundreds under load), so the
/// helper is often seen gone first.
const VMM_LEAVING: Duration = Duration::from_secs(2);
/// How long a helper gets to leave after the VMM is gone.
pub(crate) const HELPER_GRACE: Duration = Duration::from_secs(1);

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// An `Error::Io` for something missing, with `why` in place of the OS's words.
pub(crate) fn missing(what: &'static str, path: &Path, why: &str) -> Error {
    io_err(what, path)(std::io::Error::new(std::io::ErrorKind::NotFound, why))
}

/// The VM part of `spec`, with its kernel and initrd present.
pub(crate) fn checked_vm<'a>(
    backend: &'static str,
    spec: &'a SandboxSpec,
) -> Result<&'a VmSpec, Error> {
    let Some(vm) = &spec.vm else {
        return Err(Error::NoVmSpec(backend));
    };
    for (what, path) in [
        ("the guest kernel", &vm.kernel),
        ("the guest initrd", &vm.initrd),
    ] {
        if !path.is_file() {
            return Err(missing(
                what,
                path,
                "does not exist; `kestrel image build` makes it",
            ));
        }
    }
    Ok(vm)
}

/// `program` as a path, or found on `PATH`.
pub(crate) fn find_binary(
    what: &'static str,
    program: &Path,
    hint: &str,
) -> Result<PathBuf, Error> {
    find_program(program).ok_or_else(|| missing(what, program, hint))
}

/// The guest kernel command line: ours first, then the configured extras.
pub(crate) fn kernel_cmdline(vm: &VmSpec) -> String {
    match vm.kernel_params.trim() {
        "" => BASE_KERNEL_PARAMS.to_string(),
        extra => format!("{BASE_KERNEL_PARAMS} {extra}"),
    }
}

/// A helper process of a sandbox.
#[derive(Debug)]
pub(crate) struct Child {
    name: &'static str,
    pid: Mutex<Option<u32>>,
    /// The sandbox it runs for, known once spawned: kills name it.
    sandbox_id: OnceLock<String>,
    exit_tx: watch::Sender<Option<GuestExit>>,
}

impl Child {
    pub fn new(name: &'static str) -> Child {
        Child {
            name,
            pid: Mutex::new(None),
            sandbox_id: OnceLock::new(),
            exit_tx: watch::channel(None).0,
        }
    }

    /// Starts `argv` with stdout and stderr in `log`.
    pub fn spawn(&self, sandbox_id: &str, argv: &[OsString], log: &Path) -> Result<(), Error> {
        self.spawn_in(sandbox_id, argv, log, None, &[])
    }

    /// [`Child::spawn`], the program inheriting the guest's taps (its
    /// command line names their descriptor numbers, which a fork keeps).
    pub fn spawn_with_nics(
        &self,
        sandbox_id: &str,
        argv: &[OsString],
        log: &Path,
        nics: &[GuestNic],
    ) -> Result<(), Error> {
        let taps: Vec<_> = nics.iter().map(|nic| nic.tap.as_raw_fd()).collect();
        self.spawn_in(sandbox_id, argv, log, None, &taps)
    }

    /// [`Child::spawn`], with the program in the network namespace `netns`
    /// (a file such as `/var/run/netns/cni-…`) when one is given, and the
    /// descriptors `inherit` left open across its exec.
    pub fn spawn_in(
        &self,
        sandbox_id: &str,
        argv: &[OsString],
        log: &Path,
        netns: Option<&Path>,
        inherit: &[RawFd],
    ) -> Result<(), Error> {
        if self.pid().is_some() {
            return Err(Error::AlreadyStarted(self.name, "start"));
        }
        let netns = netns
            .map(|path| {
                std::fs::File::open(path).map_err(|source| Error::Io {
                    what: "opening the pod's network namespace",
                    path: path.to_path_buf(),
                    source,
                })
            })
            .transpose()?;
        let out = std::fs::File::create(log).map_err(io_err("creating", log))?;
        let err = out.try_clone().map_err(io_err("duplicating", log))?;
        tracing::info!(sandbox_id, command = ?argv, "starting {}", self.name);
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for whoever started the
            // runtime must not take the sandbox down behind its back.
            .process_group(0);
        if !inherit.is_empty() {
            let inherit = inherit.to_vec();
            // SAFETY: fcntl(2) is async-signal-safe; the descriptors are the
            // caller's, open for as long as this call runs.
            unsafe {
                command.pre_exec(move || {
                    for &fd in &inherit {
                        if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(netns) = netns {
            // SAFETY: setns(2) is async-signal-safe; the closure only reads
            // a descriptor opened before the fork.
            unsafe {
                command.pre_exec(move || {
                    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            what: format!("{} {}", self.name, Path::new(&argv[0]).display()),
            source,
        })?;
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = child.id();
        let _ = self.sandbox_id.set(sandbox_id.to_string());
        let exit_tx = self.exit_tx.clone();
        let (name, sandbox_id) = (self.name, sandbox_id.to_string());
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => GuestExit::Exited(code),
                        (None, Some(signal)) => GuestExit::Signaled(signal),
                        (None, None) => GuestExit::Exited(255),
                    }
                }
                Err(e) => {
                    tracing::error!(sandbox_id, error = %e, "waiting for {name}");
                    GuestExit::Exited(255)
                }
            };
            tracing::info!(sandbox_id, %exit, "{name} ended");
            exit_tx.send_replace(Some(exit));
        });
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.exit_tx.subscribe()
    }

    pub fn has_exited(&self) -> bool {
        self.exit_tx.borrow().is_some()
    }

    pub fn signal(&self, signal: Signal) {
        // Only while the exit is unseen: after it, the pid may be reused.
        if self.has_exited() {
            return;
        }
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGKILLs the process, logging `why`: a kill is never silent, so the
    /// log tells a guest that ended by itself from one we killed (a kill
    /// can land while the process is already exiting and leave no trace in
    /// its exit status).
    pub fn kill(&self, why: &str) {
        if self.has_exited() {
            return;
        }
        let sandbox_id = self.sandbox_id.get().map_or("", String::as_str);
        tracing::warn!(sandbox_id, "killing {}: {why}", self.name);
        self.signal(Signal::SIGKILL);
    }

    /// Waits for the exit until `deadline`, then kills. `polite`, if any,
    /// is sent first. Returns how it ended (`None` if it never started).
    pub async fn stop(&self, polite: Option<Signal>, deadline: Instant) -> Option<GuestExit> {
        self.pid()?;
        if let Some(signal) = polite.filter(|_| !self.has_exited()) {
            let sandbox_id = self.sandbox_id.get().map_or("", String::as_str);
            tracing::info!(sandbox_id, "stopping {} with {signal}", self.name);
            self.signal(signal);
        }
        let watch = self.exit_watch();
        match tokio::time::timeout_at(deadline, wait_exit(watch.clone())).await {
            Ok(exit) => exit,
            Err(_) => {
                self.kill("it did not stop in time");
                wait_exit(watch).await
            }
        }
    }
}

/// Without a helper (the vsock backend, virtiofsd) the guest has lost a
/// device it cannot do without: a helper that dies under a running VMM
/// takes the VMM down, as the agent's death would, so the sandbox's exit
/// watch (the VMM's) fires.
///
/// A helper also leaves, with status 0, whenever the VMM hangs up on it,
/// and the VMM does that while it exits (the guest powered off, or `stop`
/// sent SIGTERM) but before its own exit is seen; so a status-0 exit is a
/// death only when `stop` has not begun and the VMM is still there
/// [`VMM_LEAVING`] later. Any other exit (a kill, a failure) is a death at
/// once unless the stop already began.
pub(crate) async fn watch_helper(
    helper: &'static str,
    sandbox_id: String,
    mut helper_exit: watch::Receiver<Option<GuestExit>>,
    vmm: Arc<Child>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut vmm_exit = vmm.exit_watch();
    // Each wait also ends if its sender is gone: nothing left to watch.
    let exit = tokio::select! {
        exit = helper_exit.wait_for(Option::is_some) => match exit.map(|exit| *exit) {
            Ok(Some(exit)) => exit,
            _ => return,
        },
        _ = vmm_exit.wait_for(Option::is_some) => return,
        _ = stopping.wait_for(|stopping| *stopping) => return,
    };
    // Only a helper that ended by itself (status 0) may be leaving with
    // the VMM; killed, or failing, it died, and the guest must not wait
    // for the VMM to notice.
    let expected = if exit == GuestExit::Exited(0) {
        tokio::time::timeout(VMM_LEAVING, async {
            tokio::select! {
                _ = vmm_exit.wait_for(Option::is_some) => {}
                _ = stopping.wait_for(|stopping| *stopping) => {}
            }
        })
        .await
        .is_ok()
    } else {
        *stopping.borrow() || vmm.has_exited()
    };
    if expected {
        tracing::info!(sandbox_id, helper_exit = %exit, "{helper} left with the VMM");
        return;
    }
    tracing::error!(
        sandbox_id,
        helper_exit = %exit,
        "{helper} died under a running VMM; stopping the VMM"
    );
    vmm.kill(&format!("{helper} died"));
}

/// The vsock port the agent listens on in the guest.
pub(crate) const AGENT_PORT: u32 = kestrel_protocols::AGENT_VSOCK_PORT;

/// The hybrid vsock socket of a VM sandbox: the host's side of the guest's
/// vsock device, in the sandbox's state directory.
pub(crate) fn vsock_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("vsock")
}

/// A sandbox whose guest one VMM process runs, its agent reached through
/// the hybrid socket: what `builtin` and `cloud-hypervisor` share.
#[derive(Debug)]
pub(crate) struct SingleVmm {
    backend: &'static str,
    what: &'static str,
    binary: PathBuf,
    hint: &'static str,
    /// virtiofsd, as configured (a path or a name on `PATH`).
    virtiofsd_binary: PathBuf,
    /// What `prepare` accepted: the spec, the binary found for it, and
    /// virtiofsd's when the spec shares a directory.
    prepared: Option<(SandboxSpec, PathBuf, Option<PathBuf>)>,
    pub vmm: Arc<Child>,
    virtiofsd: Child,
    /// Set once `stop` began: from then on helpers' exits are expected.
    stopping: watch::Sender<bool>,
}

impl SingleVmm {
    /// `process` names the running VMM in the log, `what` names the
    /// binary in errors, `hint` says how to get it.
    pub fn new(
        backend: &'static str,
        process: &'static str,
        what: &'static str,
        binary: PathBuf,
        hint: &'static str,
    ) -> Self {
        SingleVmm {
            backend,
            what,
            binary,
            hint,
            virtiofsd_binary: PathBuf::from(virtiofsd::DEFAULT_BINARY),
            prepared: None,
            vmm: Arc::new(Child::new(process)),
            virtiofsd: Child::new("virtiofsd"),
            stopping: watch::channel(false).0,
        }
    }

    /// Runs `binary` as virtiofsd for sandboxes that share a directory.
    pub fn with_virtiofsd(mut self, binary: PathBuf) -> Self {
        self.virtiofsd_binary = binary;
        self
    }

    /// Checks the image and the binary, lays out the state directory.
    pub fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        checked_vm(self.backend, spec)?;
        let binary = find_binary(self.what, &self.binary, self.hint)?;
        let virtiofsd = virtiofsd::check(spec, &self.virtiofsd_binary)?;
        crate::state_dir::create(&spec.state_dir)?;
        self.prepared = Some((spec.clone(), binary, virtiofsd));
        Ok(())
    }

    /// Starts virtiofsd where the spec shares a directory, then the VMM
    /// with the command line `argv` builds (program first), logging to
    /// `vmm.log`.
    pub async fn start(
        &self,
        argv: fn(&Path, &SandboxSpec, &VmSpec) -> Vec<OsString>,
    ) -> Result<(), Error> {
        let (spec, binary, virtiofsd) = self
            .prepared
            .as_ref()
            .ok_or(Error::NotPrepared(self.backend, "start"))?;
        let vm = spec
            .vm
            .as_ref()
            .ok_or(Error::NotPrepared(self.backend, "start"))?;
        if let (Some(fs), Some(virtiofsd)) = (&spec.shared_fs, virtiofsd) {
            virtiofsd::start(&self.virtiofsd, virtiofsd, spec, fs).await?;
        }
        if let Err(e) = self.vmm.spawn_with_nics(
            &spec.id,
            &argv(binary, spec, vm),
            &spec.state_dir.join("vmm.log"),
            &spec.nics,
        ) {
            self.virtiofsd.kill("the VMM did not start");
            return Err(e);
        }
        if self.virtiofsd.pid().is_some() {
            tokio::spawn(watch_helper(
                "virtiofsd",
                spec.id.clone(),
                self.virtiofsd.exit_watch(),
                Arc::clone(&self.vmm),
                self.stopping.subscribe(),
            ));
        }
        Ok(())
    }

    /// Marks the stop as begun: helpers that leave from now on are not
    /// deaths. Call before stopping the VMM.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Waits for virtiofsd, which leaves once the VMM hung up; kills it if
    /// it does not. Call after the VMM is gone.
    pub async fn stop_helpers(&self) {
        self.virtiofsd
            .stop(None, Instant::now() + HELPER_GRACE)
            .await;
    }

    pub fn spec(&self) -> Option<&SandboxSpec> {
        self.prepared.as_ref().map(|(spec, ..)| spec)
    }

    pub fn agent_address(&self) -> Option<String> {
        let spec = self.spec()?;
        Some(format!(
            "hvsock://{}:{AGENT_PORT}",
            vsock_socket(&spec.state_dir).display()
        ))
    }
}
