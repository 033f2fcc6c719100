//! The OCI hooks that run on the host, in the runtime namespace: the
//! shim's own namespaces, as runc runs them from its own.
//!
//! Which hooks run where, for a runtime whose containers live in a VM:
//! `prestart`, `createRuntime`, `poststart` and `poststop` are defined to
//! resolve and run in the runtime namespace, which for us is the host, so
//! the shim runs them here and never sends them to the guest (it has none
//! of the host's paths). `createContainer` and `startContainer` run in the
//! container namespace, which only exists inside the guest; they travel to
//! the agent in `oci.Hooks` (see `oci.rs`) and the agent runs them.
//!
//! As runc: each hook gets the container's state JSON on stdin, its own
//! `args` as argv (the path when there are none) and its `env` as the whole
//! environment (the shim's own when the spec sets none); hooks of a phase
//! run one after another in the spec's order and the first failure stops
//! them; a hook past its `timeout` is killed and counts as failed. Unlike
//! runc, a hook runs in a process group of its own and a timeout kills the
//! group, so a shell hook's children do not outlive it.
//!
//! Written here rather than taken from a crate: the runtime crates that run
//! hooks (youki's libcontainer, Kata's kata-sys-util) are synchronous and
//! bring their whole runtime along; the shim needs one async function.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// How much of a failed hook's stdout and stderr its error quotes.
const OUTPUT_QUOTED_BYTES: usize = 2048;
/// How long a finished hook's output may still be read: a daemon it
/// started may keep the pipes open forever.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// The lifecycle points at which the host runs hooks, named as in
/// `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prestart,
    CreateRuntime,
    Poststart,
    Poststop,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Prestart => "prestart",
            Phase::CreateRuntime => "createRuntime",
            Phase::Poststart => "poststart",
            Phase::Poststop => "poststop",
        }
    }

    /// The container's status while this phase's hooks run, as runc
    /// reports it.
    fn status(self) -> Status {
        match self {
            Phase::Prestart | Phase::CreateRuntime => Status::Creating,
            Phase::Poststart => Status::Running,
            Phase::Poststop => Status::Stopped,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One hook, validated (absolute path, positive timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub path: PathBuf,
    /// argv, including argv[0]; empty runs the path with no arguments.
    pub args: Vec<String>,
    /// The whole environment; `None` inherits the shim's.
    pub env: Option<Vec<(String, String)>>,
    pub timeout: Option<Duration>,
}

/// The host-side hooks of one container and what their state JSON says
/// besides id, bundle and pid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostHooks {
    pub oci_version: String,
    pub annotations: HashMap<String, String>,
    pub prestart: Vec<Hook>,
    pub create_runtime: Vec<Hook>,
    pub poststart: Vec<Hook>,
    pub poststop: Vec<Hook>,
}

/// The runtime spec's container status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Running,
    Stopped,
}

/// The container's state, as the runtime spec defines it, for a hook's
/// stdin.
#[derive(Debug, Clone, Serialize)]
pub struct State<'a> {
    #[serde(rename = "ociVersion")]
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: Status,
    /// The pid as the host sees it: the sandbox's, the one containerd is
    /// told (as Kata's runtime reports the VMM's); left out when there is
    /// none (a container whose create failed), as runc leaves it out.
    #[serde(skip_serializing_if = "is_zero")]
    pub pid: u32,
    pub bundle: &'a Path,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: &'a HashMap<String, String>,
}

/// A hook that did not succeed, named by phase, index and path as runc
/// names it (`prestart hook #0`).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{phase} hook #{index} ({}) could not be started", path.display())]
    Spawn {
        phase: Phase,
        index: usize,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{phase} hook #{index} ({}) failed: {}{}", path.display(), describe(*status), quote_output(stdout, stderr))]
    Failed {
        phase: Phase,
        index: usize,
        path: PathBuf,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    #[error("{phase} hook #{index} ({}) ran past its timeout of {}s and was killed", path.display(), timeout.as_secs())]
    TimedOut {
        phase: Phase,
        index: usize,
        path: PathBuf,
        timeout: Duration,
    },
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

fn is_zero(pid: &u32) -> bool {
    *pid == 0
}

fn quote_output(stdout: &str, stderr: &str) -> String {
    let mut quoted = String::new();
    for (name, text) in [("stdout", stdout), ("stderr", stderr)] {
        let text = text.trim();
        if !text.is_empty() {
            quoted.push_str(&format!(", {name}: {text}"));
        }
    }
    quoted
}

impl HostHooks {
    fn list(&self, phase: Phase) -> &[Hook] {
        match phase {
            Phase::Prestart => &self.prestart,
            Phase::CreateRuntime => &self.create_runtime,
            Phase::Poststart => &self.poststart,
            Phase::Poststop => &self.poststop,
        }
    }

    /// Runs the phase's hooks in order, each with the container's state on
    /// stdin; stops at the first that fails.
    pub async fn run(
        &self,
        phase: Phase,
        id: &str,
        bundle: &Path,
        pid: u32,
    ) -> Result<(), HookError> {
        let hooks = self.list(phase);
        if hooks.is_empty() {
            return Ok(());
        }
        let state = State {
            oci_version: &self.oci_version,
            id,
            status: phase.status(),
            pid,
            bundle,
            annotations: &self.annotations,
        };
        // Serialising strings and a map cannot fail.
        let json = serde_json::to_vec(&state).unwrap_or_default();
        for (index, hook) in hooks.iter().enumerate() {
            tracing::debug!(container_id = id, %phase, index, path = %hook.path.display(), "running hook");
            run_one(hook, &json)
                .await
                .map_err(|failure| failure.into_error(phase, index, hook))?;
        }
        Ok(())
    }
}

/// How one hook run failed, before it is named.
enum Failure {
    Spawn(io::Error),
    Exit {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    TimedOut(Duration),
}

impl Failure {
    fn into_error(self, phase: Phase, index: usize, hook: &Hook) -> HookError {
        let path = hook.path.clone();
        match self {
            Failure::Spawn(source) => HookError::Spawn {
                phase,
                index,
                path,
                source,
            },
            Failure::Exit {
                status,
                stdout,
                stderr,
            } => HookError::Failed {
                phase,
                index,
                path,
                status,
                stdout,
                stderr,
            },
            Failure::TimedOut(timeout) => HookError::TimedOut {
                phase,
                index,
                path,
                timeout,
            },
        }
    }
}

async fn run_one(hook: &Hook, state: &[u8]) -> Result<(), Failure> {
    let mut cmd = tokio::process::Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    if let Some(env) = &hook.env {
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(Failure::Spawn)?;
    let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
    let stdout = capture(child.stdout.take());
    let stderr = capture(child.stderr.take());
    let stdin = child.stdin.take();
    let state = state.to_vec();
    tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            // A hook need not read its stdin: one that exits without
            // reading breaks the pipe, which is not its failure.
            let _ = stdin.write_all(&state).await;
        }
    });
    let status = match hook.timeout {
        Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                if let Some(group) = group {
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = child.kill().await;
                return Err(Failure::TimedOut(limit));
            }
        },
        None => child.wait().await,
    };
    let status = status.map_err(Failure::Spawn)?;
    if status.success() {
        return Ok(());
    }
    Err(Failure::Exit {
        status,
        stdout: stdout.collect().await,
        stderr: stderr.collect().await,
    })
}

/// A hook's output stream, read in the background into a bounded buffer
/// (read on to the end, so the hook never blocks on a full pipe).
struct Captured {
    text: Arc<Mutex<Vec<u8>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

fn capture(stream: Option<impl AsyncRead + Unpin + Send + 'static>) -> Captured {
    let text = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&text);
    let reader = stream.map(|mut stream| {
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut kept = sink.lock().unwrap_or_else(|e| e.into_inner());
                let room = OUTPUT_QUOTED_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        })
    });
    Captured { text, reader }
}

impl Drop for Captured {
    /// A hook that succeeded may have left a daemon holding the pipe.
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl Captured {
    async fn collect(mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let abort = reader.abort_handle();
            if tokio::time::timeout(OUTPUT_GRACE, reader).await.is_err() {
                abort.abort();
            }
        }
        let kept = self.text.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn hook(path: PathBuf) -> Hook {
        Hook {
            path,
            args: Vec::new(),
            env: None,
            timeout: None,
        }
    }

    fn with(phase: Phase, hooks: Vec<Hook>) -> HostHooks {
        let mut all = HostHooks {
            oci_version: "1.1.0".into(),
            annotations: HashMap::from([("k".to_string(), "v".to_string())]),
            ..Default::default()
        };
        match phase {
            Phase::Prestart => all.prestart = hooks,
            Phase::CreateRuntime => all.create_runtime = hooks,
            Phase::Poststart => all.poststart = hooks,
            Phase::Poststop => all.poststop = hooks,
        }
        all
    }

    #[tokio::test]
    async fn a_hook_reads_the_state_json_with_its_own_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // sh -c with no further arguments: $0 is its argv[0], the hook's
        // args[0].
        let mut h = hook("/bin/sh".into());
        h.args = vec![
            "named-hook".into(),
            "-c".into(),
            format!(
                "cat > {out}.json; echo \"$0 $GREETING ${{HOME:-nohome}}\" > {out}.argv",
                out = out.display()
            ),
        ];
        h.env = Some(vec![("GREETING".into(), "hi".into())]);
        with(Phase::Prestart, vec![h])
            .run(Phase::Prestart, "c1", Path::new("/b/c1"), 42)
            .await
            .unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
        assert_eq!(
            state,
            serde_json::json!({"ociVersion": "1.1.0", "id": "c1", "status": "creating",
                "pid": 42, "bundle": "/b/c1", "annotations": {"k": "v"}})
        );
        assert_eq!(
            std::fs::read_to_string(out.with_extension("argv")).unwrap(),
            "named-hook hi nohome\n"
        );
    }

    #[tokio::test]
    async fn the_status_follows_the_phase() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("status");
        let path = script(
            dir.path(),
            "h",
            &format!("grep -o '\"status\":\"[a-z]*\"' >> {}", out.display()),
        );
        for phase in [Phase::CreateRuntime, Phase::Poststart, Phase::Poststop] {
            with(phase, vec![hook(path.clone())])
                .run(phase, "c1", Path::new("/b"), 1)
                .await
                .unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(out).unwrap(),
            "\"status\":\"creating\"\n\"status\":\"running\"\n\"status\":\"stopped\"\n"
        );
    }

    #[tokio::test]
    async fn a_failing_hook_is_named_with_its_status_and_stderr_and_stops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("second-ran");
        let bad = script(dir.path(), "bad", "echo no network for you >&2; exit 3");
        let second = script(dir.path(), "second", &format!("touch {}", marker.display()));
        let hooks = with(Phase::Prestart, vec![hook(bad.clone()), hook(second)]);
        let err = hooks
            .run(Phase::Prestart, "c1", Path::new("/b"), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Failed { index: 0, .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "prestart hook #0 ({}) failed: exit status 3",
                bad.display()
            )),
            "{message}"
        );
        assert!(message.contains("stderr: no network for you"), "{message}");
        assert!(!marker.exists(), "the hook after the failed one ran");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let slow = script(
            dir.path(),
            "slow",
            &format!("sleep 100 & echo $! > {}; wait", pids.display()),
        );
        let mut h = hook(slow.clone());
        h.timeout = Some(Duration::from_secs(1));
        let started = std::time::Instant::now();
        let err = with(Phase::Poststart, vec![h])
            .run(Phase::Poststart, "c1", Path::new("/b"), 1)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            err.to_string(),
            format!(
                "poststart hook #0 ({}) ran past its timeout of 1s and was killed",
                slow.display()
            )
        );
        let sleeper: i32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // The sleep was re-parented to our test process's reaper (or init);
        // once killed it is gone or a zombie.
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat"));
            if stat.map_or(true, |s| s.contains(") Z ")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the hook's child survived the timeout"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn a_hook_that_cannot_be_executed_is_named() {
        let err = with(Phase::CreateRuntime, vec![hook("/nonexistent/hook".into())])
            .run(Phase::CreateRuntime, "c1", Path::new("/b"), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Spawn { .. }), "{err:?}");
        assert_eq!(
            crate::error_chain(&err),
            "createRuntime hook #0 (/nonexistent/hook) could not be started: No such file or directory (os error 2)"
        );
    }

    #[tokio::test]
    async fn a_hook_that_ignores_its_stdin_still_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let quick = script(dir.path(), "quick", "exit 0");
        let mut hooks = with(Phase::Poststop, vec![hook(quick)]);
        // Bigger than a pipe's buffer: the write cannot finish before the
        // hook has exited without reading.
        for i in 0..20_000 {
            hooks
                .annotations
                .insert(format!("key{i}"), "value".repeat(4));
        }
        hooks
            .run(Phase::Poststop, "c1", Path::new("/b"), 1)
            .await
            .unwrap();
    }
}
