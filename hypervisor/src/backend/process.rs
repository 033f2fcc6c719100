//! The `process` backend: the agent runs on the host, in host mode, with no
//! VM around it. Containers still get their own namespaces and cgroups, but
//! they share the host kernel, so this backend is for development and for
//! testing the runtime without a hypervisor; it says so in the log.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use crate::{wait_exit, Error, GuestExit, Hypervisor, SandboxSpec};

const NAME: &str = "process";

/// The agent as a host process.
pub struct Process {
    spec: Option<SandboxSpec>,
    pid: Mutex<Option<u32>>,
    exit_tx: watch::Sender<Option<GuestExit>>,
}

impl Default for Process {
    fn default() -> Self {
        Self::new()
    }
}

impl Process {
    pub fn new() -> Self {
        Process {
            spec: None,
            pid: Mutex::new(None),
            exit_tx: watch::channel(None).0,
        }
    }

    fn socket_path(state_dir: &Path) -> PathBuf {
        state_dir.join("agent.sock")
    }

    fn signal(&self, signal: Signal) {
        // Only while the exit is unseen: after it, the pid may be reused.
        if self.exit_tx.borrow().is_some() {
            return;
        }
        if let Some(pid) = *self.pid.lock().unwrap_or_else(|e| e.into_inner()) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

#[async_trait]
impl Hypervisor for Process {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        let executable = std::fs::metadata(&spec.agent_path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if !executable {
            return Err(Error::AgentMissing(spec.agent_path.clone()));
        }
        let shared = spec.state_dir.join("shared");
        std::fs::create_dir_all(&shared).map_err(io_err("creating", &shared))?;
        self.spec = Some(spec.clone());
        Ok(())
    }

    async fn start(&mut self) -> Result<(), Error> {
        let spec = self
            .spec
            .as_ref()
            .ok_or(Error::NotPrepared(NAME, "start"))?;
        if self.pid().is_some() {
            return Err(Error::AlreadyStarted(NAME, "start"));
        }
        let log_path = spec.state_dir.join("agent.log");
        let log = std::fs::File::create(&log_path).map_err(io_err("creating", &log_path))?;
        let log_err = log.try_clone().map_err(io_err("duplicating", &log_path))?;
        tracing::warn!(
            sandbox_id = %spec.id,
            agent = %spec.agent_path.display(),
            "process backend: the agent runs on the host, no VM isolation"
        );
        let mut child = Command::new(&spec.agent_path)
            .arg("--listen")
            .arg(format!(
                "unix://{}",
                Self::socket_path(&spec.state_dir).display()
            ))
            .arg("--shared-dir")
            .arg(spec.state_dir.join("shared"))
            .arg("--log-level")
            .arg(&spec.agent_log_level)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C meant for whoever started the
            // runtime must not take the sandbox down behind its back.
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Spawn {
                what: format!("the agent {}", spec.agent_path.display()),
                source,
            })?;
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = child.id();
        let exit_tx = self.exit_tx.clone();
        let sandbox_id = spec.id.clone();
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
                    tracing::error!(sandbox_id, error = %e, "waiting for the agent process");
                    GuestExit::Exited(255)
                }
            };
            tracing::info!(sandbox_id, %exit, "agent process ended");
            exit_tx.send_replace(Some(exit));
        });
        Ok(())
    }

    fn agent_address(&self) -> Option<String> {
        let spec = self.spec.as_ref()?;
        Some(format!(
            "unix://{}",
            Self::socket_path(&spec.state_dir).display()
        ))
    }

    fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.exit_tx.subscribe()
    }

    async fn stop(&self, grace: Duration) -> Result<Option<GuestExit>, Error> {
        let Some(spec) = &self.spec else {
            return Ok(None);
        };
        let mut exit = None;
        if self.pid().is_some() {
            self.signal(Signal::SIGTERM);
            let watch = self.exit_watch();
            exit = match tokio::time::timeout(grace, wait_exit(watch.clone())).await {
                Ok(exit) => exit,
                Err(_) => {
                    tracing::warn!(sandbox_id = %spec.id, ?grace, "agent ignored SIGTERM; killing it");
                    self.signal(Signal::SIGKILL);
                    wait_exit(watch).await
                }
            };
        }
        match std::fs::remove_dir_all(&spec.state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &spec.state_dir)(e)),
        }
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, agent: &Path) -> SandboxSpec {
        SandboxSpec {
            id: "sb".into(),
            state_dir: dir.join("sb"),
            agent_path: agent.to_path_buf(),
            agent_log_level: "info".into(),
            vm: None,
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fake-agent");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn prepare_refuses_a_missing_agent_binary() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = Process::new();
        let err = backend
            .prepare(&spec(dir.path(), &dir.path().join("nope")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AgentMissing(_)), "{err}");
        assert!(err.to_string().contains("nope"));
    }

    #[tokio::test]
    async fn start_before_prepare_is_refused() {
        let err = Process::new().start().await.unwrap_err();
        assert!(matches!(err, Error::NotPrepared("process", "start")));
    }

    #[tokio::test]
    async fn agent_address_is_a_unix_socket_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = Process::new();
        backend
            .prepare(&spec(dir.path(), &script(dir.path(), "exit 0")))
            .await
            .unwrap();
        assert_eq!(
            backend.agent_address().unwrap(),
            format!("unix://{}/sb/agent.sock", dir.path().display())
        );
        assert!(dir.path().join("sb/shared").is_dir());
    }

    #[tokio::test]
    async fn exit_watch_reports_an_agent_that_dies_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = Process::new();
        backend
            .prepare(&spec(dir.path(), &script(dir.path(), "exit 3")))
            .await
            .unwrap();
        backend.start().await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), wait_exit(backend.exit_watch()))
            .await
            .unwrap();
        assert_eq!(exit, Some(GuestExit::Exited(3)));
    }

    #[tokio::test]
    async fn stop_kills_an_agent_that_ignores_sigterm_and_removes_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = Process::new();
        let agent = script(dir.path(), "trap '' TERM\nwhile :; do sleep 1; done");
        backend.prepare(&spec(dir.path(), &agent)).await.unwrap();
        backend.start().await.unwrap();
        // Let the shell install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let exit = backend.stop(Duration::from_millis(300)).await.unwrap();
        assert_eq!(exit, Some(GuestExit::Signaled(libc::SIGKILL)));
        assert!(!dir.path().join("sb").exists());
        // Stopping again only cleans up.
        assert_eq!(
            backend.stop(Duration::from_millis(10)).await.unwrap(),
            Some(GuestExit::Signaled(9))
        );
    }
}
