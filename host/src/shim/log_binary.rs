//! A `binary://` logging program, run as containerd's runc shim runs it
//! (`NewBinaryIO` in containerd's `pkg/process/io.go`): the process's
//! stdout arrives on the logger's fd 3 and its stderr on fd 4; fd 5 is the
//! write end of a "ready" pipe that the logger closes once it reads, and
//! until then nothing of the process's output flows. Its environment holds
//! only `CONTAINER_ID` (the exec id for an exec, as in containerd) and
//! `CONTAINER_NAMESPACE`; stdin, stdout and stderr are /dev/null.
//!
//! When the output ends, the shim closes its write ends and the logger
//! sees end-of-file on fds 3 and 4; it gets a bounded time to finish, then
//! is killed. A logger dropped without [`Logger::stop`] (a failed create,
//! a shim going down) is killed and reaped by tokio (`kill_on_drop`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

use super::log_uri::LoggerCommand;

/// The logger's descriptors, in order: stdout, stderr, ready.
const FIRST_FD: RawFd = 3;

/// Who the logger logs for: its environment.
#[derive(Debug, Clone, Copy)]
pub struct LoggerFor<'a> {
    /// The container id for an init, the exec id for an exec.
    pub id: &'a str,
    pub namespace: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("creating the logger's pipes")]
    Pipes(#[source] std::io::Error),
    #[error("starting {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not close fd 5 (ready) within {bound:?}; killed")]
    NotReady { program: PathBuf, bound: Duration },
    #[error("waiting for {program} to be ready")]
    Ready {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running logging program.
#[derive(Debug)]
pub struct Logger {
    child: Child,
    program: PathBuf,
}

/// The write ends the process's output is copied into.
#[derive(Debug)]
pub struct LoggerInputs {
    pub stdout: pipe::Sender,
    pub stderr: pipe::Sender,
}

impl Logger {
    /// Starts `command` and waits, at most `ready_bound`, for it to close
    /// fd 5. On any failure nothing is left running.
    pub async fn start(
        command: &LoggerCommand,
        logs_for: LoggerFor<'_>,
        ready_bound: Duration,
    ) -> Result<(Logger, LoggerInputs), LoggerError> {
        let (stdout_r, stdout_w) = pipe_pair()?;
        let (stderr_r, stderr_w) = pipe_pair()?;
        let (ready_r, ready_w) = pipe_pair()?;
        let passed = [
            stdout_r.as_raw_fd(),
            stderr_r.as_raw_fd(),
            ready_w.as_raw_fd(),
        ];
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .env_clear()
            .env("CONTAINER_ID", logs_for.id)
            .env("CONTAINER_NAMESPACE", logs_for.namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that killing it also ends what it
            // started (a shell logger's `cat`s).
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl and dup2, which are async-signal-safe, on descriptors
        // the parent keeps open until spawn returns.
        unsafe {
            cmd.pre_exec(move || install_fds(passed));
        }
        let child = cmd.spawn().map_err(|source| LoggerError::Spawn {
            program: command.program.clone(),
            source,
        })?;
        // Only the logger may hold these now: its fd 5 closing must be the
        // last write end of the ready pipe going away.
        drop((stdout_r, stderr_r, ready_w));
        let mut logger = Logger {
            child,
            program: command.program.clone(),
        };
        if let Err(e) = logger.wait_ready(ready_r, ready_bound).await {
            // kill_on_drop would leave the reaping to tokio; here it is
            // done before the error is returned.
            if let Err(kill) = logger.kill().await {
                tracing::warn!(program = %command.program.display(), error = %kill, "killing a logging binary that was not ready");
            }
            return Err(e);
        }
        let inputs = LoggerInputs {
            stdout: pipe::Sender::from_owned_fd(stdout_w).map_err(LoggerError::Pipes)?,
            stderr: pipe::Sender::from_owned_fd(stderr_w).map_err(LoggerError::Pipes)?,
        };
        Ok((logger, inputs))
    }

    /// A byte or end-of-file on the ready pipe: the logger closed fd 5 (or
    /// exited, as containerd also takes for ready).
    async fn wait_ready(&self, ready_r: OwnedFd, bound: Duration) -> Result<(), LoggerError> {
        let failed = |source| LoggerError::Ready {
            program: self.program.clone(),
            source,
        };
        let mut ready = pipe::Receiver::from_owned_fd(ready_r).map_err(failed)?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(bound, ready.read(&mut byte)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(LoggerError::NotReady {
                program: self.program.clone(),
                bound,
            }),
        }
    }

    /// Waits, at most `bound`, for the logger to exit on its own once its
    /// inputs are closed (the caller dropped [`LoggerInputs`]), then kills
    /// it. Either way it is reaped.
    pub async fn stop(mut self, bound: Duration, container_id: &str, exec_id: &str) {
        let program = self.program.display().to_string();
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {
                tracing::debug!(container_id, exec_id, program, "logging binary exited")
            }
            Ok(Ok(status)) => {
                tracing::warn!(container_id, exec_id, program, %status, "logging binary failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(container_id, exec_id, program, error = %e, "waiting for the logging binary")
            }
            Err(_) => {
                tracing::warn!(
                    container_id,
                    exec_id,
                    program,
                    ?bound,
                    "logging binary still running after its input ended; killing it"
                );
                if let Err(e) = self.kill().await {
                    tracing::warn!(container_id, exec_id, program, error = %e, "killing the logging binary");
                }
            }
        }
    }
}

impl Logger {
    /// Ends a logger whose process never came to be: killed and reaped.
    pub async fn abort(mut self, container_id: &str, exec_id: &str) {
        if let Err(e) = self.kill().await {
            tracing::warn!(container_id, exec_id, program = %self.program.display(), error = %e, "killing the logging binary");
        }
    }

    /// Kills the logger's process group and reaps the logger.
    async fn kill(&mut self) -> std::io::Result<()> {
        if let Some(pgid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // The group may already be gone; the kill below reports what
            // matters, the logger itself.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        self.child.kill().await
    }
}

/// A pipe whose ends are close-on-exec: only the logger, through
/// [`install_fds`], gets copies that survive exec.
fn pipe_pair() -> Result<(OwnedFd, OwnedFd), LoggerError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| LoggerError::Pipes(e.into()))
}

/// In the child: `fds` become 3, 4 and 5. Each is first copied above 9,
/// so that no source is overwritten by an earlier target, and the dup2
/// onto the target clears close-on-exec.
fn install_fds(fds: [RawFd; 3]) -> std::io::Result<()> {
    let mut high = [0; 3];
    for (slot, fd) in high.iter_mut().zip(fds) {
        // SAFETY: fcntl on a descriptor this process holds; no memory is
        // touched.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        *slot = copy;
    }
    for (target, fd) in (FIRST_FD..).zip(high) {
        // SAFETY: dup2 between descriptor numbers; no memory is touched.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use tokio::io::AsyncWriteExt;

    use super::*;

    const FOR: LoggerFor<'static> = LoggerFor {
        id: "c1",
        namespace: "ns1",
    };

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("logger.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn command(program: PathBuf, args: &[&str]) -> LoggerCommand {
        LoggerCommand {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    }

    #[tokio::test]
    async fn a_script_logger_gets_args_env_and_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let body = format!(
            "echo \"$* $CONTAINER_ID $CONTAINER_NAMESPACE\" > {out}.args\n\
             exec 5>&-\n\
             cat <&3 > {out}.stdout\n\
             cat <&4 > {out}.stderr",
            out = out.display()
        );
        let cmd = command(script(dir.path(), &body), &["key", "value"]);
        let (logger, mut inputs) = Logger::start(&cmd, FOR, Duration::from_secs(10))
            .await
            .unwrap();
        inputs.stdout.write_all(b"to stdout\n").await.unwrap();
        inputs.stderr.write_all(b"to stderr\n").await.unwrap();
        drop(inputs);
        let pid = logger.child.id().unwrap();
        logger.stop(Duration::from_secs(10), "c1", "").await;
        assert!(!alive(pid), "the logger still runs");
        let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", out.display())).unwrap();
        assert_eq!(read("args"), "key value c1 ns1\n");
        assert_eq!(read("stdout"), "to stdout\n");
        assert_eq!(read("stderr"), "to stderr\n");
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_start() {
        let cmd = command("/nonexistent/logger".into(), &[]);
        let err = Logger::start(&cmd, FOR, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, LoggerError::Spawn { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_logger_that_never_signals_ready_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let helper_file = dir.path().join("helper");
        let cmd = command(
            script(
                dir.path(),
                &format!(
                    "echo $$ > {}; sleep 100 & echo $! > {}; wait",
                    pid_file.display(),
                    helper_file.display()
                ),
            ),
            &[],
        );
        let err = Logger::start(&cmd, FOR, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(err, LoggerError::NotReady { .. }), "{err:?}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the logger still runs or was not reaped"
        );
        let helper: u32 = std::fs::read_to_string(&helper_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The helper is the init's to reap once killed.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(helper) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(helper), "what the logger started still runs");
    }

    #[tokio::test]
    async fn a_logger_that_ignores_end_of_input_is_killed_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = command(
            script(dir.path(), "exec 5>&- 3<&- 4<&-; exec sleep 100"),
            &[],
        );
        let (logger, inputs) = Logger::start(&cmd, FOR, Duration::from_secs(10))
            .await
            .unwrap();
        drop(inputs);
        let pid = logger.child.id().unwrap();
        let started = std::time::Instant::now();
        logger.stop(Duration::from_millis(300), "c1", "").await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "not reaped");
    }
}
