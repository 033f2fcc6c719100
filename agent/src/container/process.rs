//! Starting processes in a container: cloning the setup helper, talking to
//! it over its control socket, and the [`Process`] the agent keeps.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::cgroup::Cgroup;
use super::console::{ConsoleSocket, CONSOLE_FD};
use super::namespaces::{with_joined, Join, Shared};
use super::setup::{CONTROL_FD, SETUP_ARG};
use super::spec::SetupConfig;
use crate::error::{Error, Result};
use crate::reaper::{ExitStatus, ExitWatch, Reaper};
use crate::stdio::{ChildStdio, ProcessIo};

/// `clone(2)` with fork semantics (no new stack): returns the child's pid
/// in the parent and `None` in the child.
pub fn clone_process(flags: CloneFlags) -> nix::Result<Option<Pid>> {
    let flags = flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: with a NULL stack clone behaves like fork; the child gets a
    // copy of the caller's memory and continues from here.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

/// A process the agent started in a container.
pub struct Process {
    pub exec_id: String,
    pub pid: Pid,
    pub io: ProcessIo,
    exit: ExitWatch,
}

impl Process {
    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the process to exit; returns at once if it has.
    pub async fn wait(&self) -> ExitStatus {
        let mut exit = self.exit.clone();
        // The reaper never drops a registered sender before sending.
        let status = exit.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        status.unwrap_or(255)
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        let gone = || Error::NotFound(format!("process {} has already exited", self.exec_id));
        if self.exit_status().is_some() {
            return Err(gone());
        }
        send_signal(self.pid, signal).map_err(|e| match e {
            Errno::ESRCH => gone(),
            e => Error::internal(format!("signalling process {}", self.exec_id), e),
        })
    }
}

/// kill(2) with a raw signal number: nix's `Signal` has no real-time signals.
pub fn send_signal(pid: Pid, signal: i32) -> nix::Result<()> {
    // SAFETY: kill takes plain integers.
    Errno::result(unsafe { libc::kill(pid.as_raw(), signal) }).map(drop)
}

/// The helper's control socket while the agent waits for StartContainer.
pub struct Control {
    stream: BufReader<UnixStream>,
}

impl Control {
    async fn line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .await
            .map_err(|e| Error::internal("reading from the setup helper", e))?;
        Ok((n > 0).then(|| line.trim_end().to_string()))
    }

    /// Lets a created init process execute its program and waits until it
    /// has (the socket closes on exec) or has failed to.
    pub async fn start(mut self) -> Result<()> {
        self.stream
            .get_mut()
            .write_all(b"s")
            .await
            .map_err(|e| Error::internal("starting the container process", e))?;
        match self.line().await? {
            None => Ok(()),
            Some(line) => Err(helper_error(&line)),
        }
    }
}

fn helper_error(line: &str) -> Error {
    match line.split_once(' ') {
        Some(("invalid", msg)) => Error::InvalidArgument(msg.to_string()),
        Some(("internal", msg)) => Error::Internal(msg.to_string()),
        Some(("failed", msg)) => Error::FailedPrecondition(msg.to_string()),
        Some(("deadline", msg)) => Error::DeadlineExceeded(msg.to_string()),
        _ => Error::Internal(format!("unexpected answer from the setup helper: {line:?}")),
    }
}

/// What to start and where.
pub struct Launch<'a> {
    pub exec_id: &'a str,
    pub config: &'a SetupConfig,
    pub flags: CloneFlags,
    /// The pod's namespaces to enter before cloning (see `namespaces.rs`).
    pub join: &'a [Join<'a>],
    pub cgroup: &'a Cgroup,
}

/// Starts the setup helper for `launch`. For an init process returns once
/// the container is built and waiting for StartContainer (with the
/// [`Control`] to start it); for an exec once the program runs.
pub async fn launch(reaper: &Reaper, launch: Launch<'_>) -> Result<(Process, Option<Control>)> {
    // A terminal process opens its pty in the container (`console.rs`):
    // until then its stdio is /dev/null.
    let (pipes, child_stdio) = if launch.config.process.terminal {
        (None, ChildStdio::null()?)
    } else {
        let (io, child) = ProcessIo::pipes()?;
        (Some(io), child)
    };
    let (console, console_helper_end) =
        ConsoleSocket::pair().map_err(|e| Error::internal("starting a container process", e))?;
    let (agent_end, helper_end) =
        StdUnixStream::pair().map_err(|e| Error::internal("socketpair", e))?;
    let into_pod_pid = launch.join.iter().any(|j| j.kind == Shared::Pid);
    let (helper_pid, helper_exit) = with_joined(launch.join, || {
        clone_helper(
            reaper,
            launch.flags,
            &child_stdio,
            helper_end.into(),
            console_helper_end,
        )?
        .map_err(|e| match e {
            // setns into a PID namespace whose init has died succeeds; the
            // kernel refuses the process itself.
            Errno::ENOMEM if into_pod_pid => Error::FailedPrecondition(
                "the pod's PID namespace takes no new processes: its first container has exited"
                    .into(),
            ),
            e => Error::internal("cloning the container process", e),
        })
    })?;
    drop(child_stdio);

    let kill_helper = |e: Error| {
        let _ = kill(helper_pid, Signal::SIGKILL);
        e
    };
    agent_end
        .set_nonblocking(true)
        .map_err(|e| kill_helper(Error::internal("control socket", e)))?;
    let stream = UnixStream::from_std(agent_end)
        .map_err(|e| kill_helper(Error::internal("control socket", e)))?;
    let mut control = Control {
        stream: BufReader::new(stream),
    };
    launch.cgroup.add(helper_pid).map_err(kill_helper)?;
    let body = serde_json::to_vec(launch.config)
        .map_err(|e| kill_helper(Error::internal("encoding setup", e)))?;
    let len = u32::try_from(body.len())
        .map_err(|e| kill_helper(Error::internal("setup too large", e)))?;
    let sent = async {
        let w = control.stream.get_mut();
        w.write_all(&len.to_le_bytes()).await?;
        w.write_all(&body).await
    };
    sent.await
        .map_err(|e| kill_helper(Error::internal("sending setup to the helper", e)))?;

    let is_init = matches!(launch.config.role, super::spec::Role::Init(_));
    let mut pid = is_init.then_some(helper_pid);
    let mut exit = is_init.then(|| helper_exit.clone());
    let mut failure = None;
    let mut ready = false;
    while let Some(line) = control.line().await.map_err(kill_helper)? {
        if line == "ok" && is_init {
            ready = true;
            break;
        } else if let Some(p) = line.strip_prefix("pid ").and_then(|p| p.parse().ok()) {
            let p = Pid::from_raw(p);
            exit = Some(reaper.lock().register(p));
            pid = Some(p);
        } else {
            failure = Some(helper_error(&line));
        }
    }
    if !is_init {
        // EOF: the exec'd program replaced the process holding the socket.
        ready = pid.is_some();
    }
    let outcome = match (ready, failure, pid, exit) {
        (true, None, Some(pid), Some(exit)) => match pipes {
            Some(io) => Ok(io),
            None => console
                .receive_master()
                .map_err(|e| Error::internal("the container's terminal", e))
                .and_then(ProcessIo::terminal),
        }
        .map(|io| (pid, exit, io))
        .map_err(|e| (Some(pid), Some(e))),
        (_, failure, pid, _) => Err((pid, failure)),
    };
    let (pid, exit, io) = match outcome {
        Ok(started) => started,
        Err((pid, failure)) => {
            if let Some(pid) = pid {
                let _ = kill(pid, Signal::SIGKILL);
            }
            let _ = kill(helper_pid, Signal::SIGKILL);
            let status = helper_exit
                .clone()
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|s| *s);
            return Err(failure.unwrap_or_else(|| {
                Error::Internal(format!(
                    "the container setup helper exited early (status {status:?})"
                ))
            }));
        }
    };
    let process = Process {
        exec_id: launch.exec_id.to_string(),
        pid,
        io,
        exit,
    };
    Ok((process, is_init.then_some(control)))
}

/// Clones a child into `flags`' namespaces that re-executes the agent as the
/// setup helper, with the given stdio on 0-2, `control` on fd 3 and the
/// console socket's helper end on fd 4.
fn clone_helper(
    reaper: &Reaper,
    flags: CloneFlags,
    stdio: &ChildStdio,
    control: OwnedFd,
    console: OwnedFd,
) -> Result<nix::Result<(Pid, ExitWatch)>> {
    // Everything the child touches is prepared here: between clone and
    // execve a child of a multi-threaded process may not allocate.
    let exe = CString::new("/proc/self/exe").map_err(|e| Error::internal("exe path", e))?;
    let arg0 = CString::new("kestrel-agent").map_err(|e| Error::internal("argv", e))?;
    let arg1 = CString::new(SETUP_ARG).map_err(|e| Error::internal("argv", e))?;
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    let fds = [
        stdio.stdin.as_raw_fd(),
        stdio.stdout.as_raw_fd(),
        stdio.stderr.as_raw_fd(),
        control.as_raw_fd(),
        console.as_raw_fd(),
    ];
    debug_assert_eq!(fds.len() as i32, CONTROL_FD + 2);
    debug_assert_eq!(CONSOLE_FD, CONTROL_FD + 1);

    let mut children = reaper.lock();
    match clone_process(flags) {
        Err(e) => Ok(Err(e)),
        // SAFETY: we are the freshly cloned child; `exec_child` only makes
        // async-signal-safe calls on memory prepared before the clone.
        Ok(None) => unsafe { exec_child(&fds, &exe, &argv, &envp) },
        Ok(Some(pid)) => Ok(Ok((pid, children.register(pid)))),
    }
}

/// # Safety
/// Call only in a freshly cloned child; never returns.
unsafe fn exec_child(
    fds: &[RawFd; 5],
    exe: &CStr,
    argv: &[*const libc::c_char; 3],
    envp: &[*const libc::c_char; 1],
) -> ! {
    // SAFETY: plain syscalls on descriptors we own and pointers that stay
    // valid (they were built before clone); _exit on any failure.
    unsafe {
        // Move every source above the targets first so placing one cannot
        // clobber another; the copies are close-on-exec.
        let mut high = [0; 5];
        for (i, fd) in fds.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            if high[i] < 0 {
                libc::_exit(126);
            }
        }
        for (target, fd) in high.iter().enumerate() {
            if libc::dup2(*fd, target as RawFd) < 0 {
                libc::_exit(126);
            }
        }
        libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}
