//! The `process` backend: the agent runs on the host, in host mode, with no
//! VM around it. Containers still get their own namespaces and cgroups, but
//! they share the host kernel, so this backend is for development and for
//! testing the runtime without a hypervisor; it says so in the log.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

use super::child::{io_err, Child};
use crate::{Error, GuestExit, Hypervisor, SandboxSpec};

const NAME: &str = super::Backend::Process.name();

/// The agent as a host process.
pub struct Process {
    spec: Option<SandboxSpec>,
    agent: Child,
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
            agent: Child::new("agent process"),
        }
    }

    pub(crate) fn socket_path(state_dir: &Path) -> PathBuf {
        state_dir.join("agent.sock")
    }
}

#[async_trait]
impl Hypervisor for Process {
    fn backend(&self) -> super::Backend {
        super::Backend::Process
    }

    async fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        let executable = std::fs::metadata(&spec.agent_path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if !executable {
            return Err(Error::AgentMissing(spec.agent_path.clone()));
        }
        crate::state_dir::create(&spec.state_dir)?;
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
        tracing::warn!(
            sandbox_id = %spec.id,
            agent = %spec.agent_path.display(),
            "process backend: the agent runs on the host, no VM isolation"
        );
        let listen = format!("unix://{}", Self::socket_path(&spec.state_dir).display());
        let argv: Vec<OsString> = vec![
            spec.agent_path.clone().into(),
            "--listen".into(),
            listen.into(),
            "--shared-dir".into(),
            spec.state_dir.join("shared").into(),
            "--log-level".into(),
            spec.agent_log_level.clone().into(),
        ];
        self.agent.spawn_in(
            &spec.id,
            &argv,
            &spec.state_dir.join("agent.log"),
            spec.netns.as_deref(),
            &[],
        )
    }

    fn agent_address(&self) -> Option<String> {
        let spec = self.spec.as_ref()?;
        Some(format!(
            "unix://{}",
            Self::socket_path(&spec.state_dir).display()
        ))
    }

    fn pid(&self) -> Option<u32> {
        self.agent.pid()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.agent.exit_watch()
    }

    async fn stop(&self, grace: Duration) -> Result<Option<GuestExit>, Error> {
        let Some(spec) = &self.spec else {
            return Ok(None);
        };
        let exit = self
            .agent
            .stop(Some(Signal::SIGTERM), Instant::now() + grace)
            .await;
        crate::state_dir::remove(&spec.state_dir)?;
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait_exit;

    fn spec(dir: &Path, agent: &Path) -> SandboxSpec {
        SandboxSpec {
            id: "sb".into(),
            state_dir: dir.join("sb"),
            agent_path: agent.to_path_buf(),
            agent_log_level: "info".into(),
            vm: None,
            netns: None,
            nics: Vec::new(),
            shared_fs: None,
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
