//! The OCI hooks that run in the container namespace, which only exists
//! here in the guest: `createContainer` (in the container's mount
//! namespace once its mounts are made, before pivot_root, as runc runs
//! it) and `startContainer` (in the container, as its user, after
//! StartContainer and before the program is executed).
//!
//! The spec's other hooks (`prestart`, `createRuntime`, `poststart`,
//! `poststop`) resolve and run in the runtime namespace: the host's, where
//! the runtime runs them (Kestrel's shim does; Kata's runtime never sends
//! them). A request that carries them gets a warning and they are ignored:
//! their paths name the host's files, which the guest does not have.
//!
//! As runc: each hook gets the state JSON on stdin (status `creating` or
//! `created`, the pid as the container sees it), its `args` as argv (the
//! path when there are none) and its `env` as the whole environment; a
//! startContainer hook without env gets the process's (runc's de facto
//! rule). Hooks of a phase run in order and the first failure stops them;
//! one past its timeout is killed, with its process group, and counts as
//! failed. The runner is synchronous because it runs in the setup helper,
//! a single-threaded process (see `setup.rs`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kestrel_protocols::oci;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How much of a failed hook's stdout and stderr its error quotes.
const OUTPUT_QUOTED_BYTES: usize = 2048;
/// How often a running hook is checked for its exit and its timeout.
const POLL_INTERVAL_MS: u8 = 10;

/// The guest's hook phases, named as in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    CreateContainer,
    StartContainer,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::CreateContainer => "createContainer",
            Phase::StartContainer => "startContainer",
        })
    }
}

/// One hook, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookConfig {
    pub path: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout_secs: Option<u64>,
}

/// A container's guest-side hooks and the state they are told about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHooks {
    pub oci_version: String,
    pub id: String,
    pub bundle: PathBuf,
    pub annotations: HashMap<String, String>,
    pub create_container: Vec<HookConfig>,
    pub start_container: Vec<HookConfig>,
}

/// The runtime spec's state of a container.
#[derive(Debug, Serialize)]
struct State<'a> {
    #[serde(rename = "ociVersion")]
    oci_version: &'a str,
    id: &'a str,
    status: &'static str,
    pid: u32,
    bundle: &'a Path,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    annotations: &'a HashMap<String, String>,
}

/// A hook that did not succeed, named as runc names it.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{phase} hook #{index} ({}) could not be started: {source}", path.display())]
    Spawn {
        phase: Phase,
        index: usize,
        path: PathBuf,
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
    #[error("{phase} hook #{index} ({}) ran past its timeout of {timeout_secs}s and was killed", path.display())]
    TimedOut {
        phase: Phase,
        index: usize,
        path: PathBuf,
        timeout_secs: u64,
    },
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
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

/// Validates the spec's container-namespace hooks; warns about the others.
pub fn from_spec(spec: &oci::Spec, id: &str, bundle: &Path) -> Result<GuestHooks> {
    let Some(h) = spec.Hooks.as_ref() else {
        return Ok(GuestHooks::default());
    };
    let runtime_side: Vec<&str> = [
        (&h.Prestart, "prestart"),
        (&h.CreateRuntime, "createRuntime"),
        (&h.Poststart, "poststart"),
        (&h.Poststop, "poststop"),
    ]
    .into_iter()
    .filter(|(list, _)| !list.is_empty())
    .map(|(_, name)| name)
    .collect();
    if !runtime_side.is_empty() {
        tracing::warn!(
            container_id = id,
            hooks = ?runtime_side,
            "hooks of the runtime namespace are the host runtime's to run; the agent ignores them"
        );
    }
    Ok(GuestHooks {
        oci_version: spec.Version.clone(),
        id: id.to_string(),
        bundle: bundle.to_path_buf(),
        annotations: spec.Annotations.clone(),
        create_container: validate(&h.CreateContainer, Phase::CreateContainer)?,
        start_container: validate(&h.StartContainer, Phase::StartContainer)?,
    })
}

fn validate(hooks: &[oci::Hook], phase: Phase) -> Result<Vec<HookConfig>> {
    hooks
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let field = format!("hooks.{phase}[{i}]");
            if !h.Path.starts_with('/') {
                return Err(Error::invalid(format!(
                    "{field}.path {:?} is not absolute",
                    h.Path
                )));
            }
            if let Some(bad) = h.Env.iter().find(|e| !e.contains('=')) {
                return Err(Error::invalid(format!(
                    "{field}.env entry {bad:?} is not KEY=VALUE"
                )));
            }
            // proto3 cannot tell 0 from unset: 0 is no timeout.
            let timeout_secs = match u64::try_from(h.Timeout) {
                Ok(0) => None,
                Ok(secs) => Some(secs),
                Err(_) => {
                    return Err(Error::invalid(format!(
                        "{field}.timeout is {}; it must be greater than zero",
                        h.Timeout
                    )))
                }
            };
            Ok(HookConfig {
                path: PathBuf::from(&h.Path),
                args: h.Args.to_vec(),
                env: h.Env.to_vec(),
                timeout_secs,
            })
        })
        .collect()
}

impl GuestHooks {
    /// Runs the phase's hooks in order from the calling process, which is
    /// in the container's namespaces; `cwd` is where they start and
    /// `default_env` what a hook without env gets.
    pub fn run(
        &self,
        phase: Phase,
        cwd: Option<&Path>,
        default_env: &[String],
    ) -> std::result::Result<(), HookError> {
        let (hooks, status) = match phase {
            Phase::CreateContainer => (&self.create_container, "creating"),
            Phase::StartContainer => (&self.start_container, "created"),
        };
        if hooks.is_empty() {
            return Ok(());
        }
        let state = State {
            oci_version: &self.oci_version,
            id: &self.id,
            status,
            pid: std::process::id(),
            bundle: &self.bundle,
            annotations: &self.annotations,
        };
        // Serialising strings and a map cannot fail.
        let json = serde_json::to_vec(&state).unwrap_or_default();
        for (index, hook) in hooks.iter().enumerate() {
            let env = if hook.env.is_empty() && phase == Phase::StartContainer {
                default_env
            } else {
                &hook.env
            };
            run_one(hook, &json, cwd, env).map_err(|f| f.name(phase, index, hook))?;
        }
        Ok(())
    }
}

/// How one run failed, before the hook is named.
enum Failure {
    Spawn(io::Error),
    Exit {
        status: ExitStatus,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    TimedOut,
}

impl Failure {
    fn name(self, phase: Phase, index: usize, hook: &HookConfig) -> HookError {
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
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            },
            Failure::TimedOut => HookError::TimedOut {
                phase,
                index,
                path,
                timeout_secs: hook.timeout_secs.unwrap_or_default(),
            },
        }
    }
}

fn run_one(
    hook: &HookConfig,
    state: &[u8],
    cwd: Option<&Path>,
    env: &[String],
) -> std::result::Result<(), Failure> {
    let mut cmd = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear()
        .envs(env.iter().filter_map(|e| e.split_once('=')));
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(Failure::Spawn)?;
    let deadline = hook
        .timeout_secs
        .map(|s| Instant::now() + Duration::from_secs(s));
    let result = supervise(&mut child, state, deadline);
    if result.is_err() {
        // SAFETY: killpg takes plain integers; the group is the hook's own.
        unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
    }
    result.and_then(|(status, stdout, stderr)| {
        if status.success() {
            Ok(())
        } else {
            Err(Failure::Exit {
                status,
                stdout,
                stderr,
            })
        }
    })
}

type Finished = (ExitStatus, Vec<u8>, Vec<u8>);

/// Feeds the state to the hook and collects its output until it exits or
/// its deadline passes. Non-blocking pipes and poll, because a hook may
/// neither read its stdin nor leave its output unread without blocking us.
fn supervise(
    child: &mut Child,
    state: &[u8],
    deadline: Option<Instant>,
) -> std::result::Result<Finished, Failure> {
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    for fd in [
        stdin.as_ref().map(|s| s.as_raw_fd()),
        stdout.as_ref().map(|s| s.as_raw_fd()),
        stderr.as_ref().map(|s| s.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(|e| Failure::Spawn(io::Error::from(e)))?;
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut written = 0;
    loop {
        if let Some(pipe) = stdin.as_mut() {
            match pipe.write(&state[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A hook that exits without reading its stdin breaks the
                // pipe; that is not its failure.
                Err(_) => written = state.len(),
            }
            if written >= state.len() {
                stdin = None;
            }
        }
        drain(&mut stdout, &mut out);
        drain(&mut stderr, &mut err);
        if let Some(status) = child.try_wait().map_err(Failure::Spawn)? {
            drain(&mut stdout, &mut out);
            drain(&mut stderr, &mut err);
            return Ok((status, out, err));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Failure::TimedOut);
        }
        let mut fds = Vec::new();
        if let Some(p) = stdin.as_ref() {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLOUT));
        }
        let outputs = [
            stdout.as_ref().map(|p| p.as_fd()),
            stderr.as_ref().map(|p| p.as_fd()),
        ];
        for fd in outputs.into_iter().flatten() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        // Woken by output or room in the pipe; the exit is noticed on the
        // next tick at the latest.
        let _ = poll(&mut fds, PollTimeout::from(POLL_INTERVAL_MS));
    }
}

/// Reads what a pipe holds now, keeping at most [`OUTPUT_QUOTED_BYTES`];
/// at its end (or on an error) the pipe is dropped.
fn drain(pipe: &mut Option<impl Read>, kept: &mut Vec<u8>) {
    let Some(reader) = pipe.as_mut() else {
        return;
    };
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = OUTPUT_QUOTED_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => break,
        }
    }
    *pipe = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: String) -> HookConfig {
        HookConfig {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script],
            env: Vec::new(),
            timeout_secs: None,
        }
    }

    fn hooks(create: Vec<HookConfig>, start: Vec<HookConfig>) -> GuestHooks {
        GuestHooks {
            oci_version: "1.1.0".into(),
            id: "c1".into(),
            bundle: "/run/kestrel/c1".into(),
            annotations: HashMap::from([("k".into(), "v".into())]),
            create_container: create,
            start_container: start,
        }
    }

    fn spec_with(h: oci::Hooks) -> oci::Spec {
        let mut spec = oci::Spec::new();
        spec.Version = "1.1.0".into();
        spec.Hooks = Some(h).into();
        spec
    }

    fn hook(path: &str, timeout: i64) -> oci::Hook {
        oci::Hook {
            Path: path.into(),
            Timeout: timeout,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_container_namespace_hooks_are_kept() {
        let spec = spec_with(oci::Hooks {
            Prestart: vec![hook("/host/only", 0)],
            Poststop: vec![hook("/host/cleanup", 0)],
            CreateContainer: vec![hook("/sbin/mount-hook", 5)],
            StartContainer: vec![hook("/sbin/ldconfig", 0)],
            ..Default::default()
        });
        let h = from_spec(&spec, "c1", Path::new("/b/c1")).unwrap();
        assert_eq!(h.id, "c1");
        assert_eq!(h.bundle, Path::new("/b/c1"));
        assert_eq!(h.create_container.len(), 1);
        assert_eq!(h.create_container[0].path, Path::new("/sbin/mount-hook"));
        assert_eq!(h.create_container[0].timeout_secs, Some(5));
        assert_eq!(h.start_container[0].timeout_secs, None, "0 is unset");
    }

    #[test]
    fn a_relative_path_or_negative_timeout_is_invalid_and_named() {
        for (h, expected) in [
            (
                oci::Hooks {
                    CreateContainer: vec![hook("/ok", 0), hook("bin/hook", 0)],
                    ..Default::default()
                },
                "hooks.createContainer[1].path \"bin/hook\" is not absolute",
            ),
            (
                oci::Hooks {
                    StartContainer: vec![hook("/h", -1)],
                    ..Default::default()
                },
                "hooks.startContainer[0].timeout is -1; it must be greater than zero",
            ),
        ] {
            match from_spec(&spec_with(h), "c1", Path::new("/b")) {
                Err(Error::InvalidArgument(msg)) => assert_eq!(msg, expected),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_hook_reads_the_state_and_starts_in_the_given_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = hooks(
            vec![sh(format!(
                "cat > {o}.json; pwd > {o}.cwd",
                o = out.display()
            ))],
            Vec::new(),
        );
        h.run(Phase::CreateContainer, Some(dir.path()), &[])
            .unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
        assert_eq!(
            state,
            serde_json::json!({"ociVersion": "1.1.0", "id": "c1", "status": "creating",
                "pid": std::process::id(), "bundle": "/run/kestrel/c1",
                "annotations": {"k": "v"}})
        );
        assert_eq!(
            std::fs::read_to_string(out.with_extension("cwd"))
                .unwrap()
                .trim(),
            dir.path().canonicalize().unwrap().to_str().unwrap()
        );
    }

    #[test]
    fn a_start_hook_without_env_gets_the_process_env_and_one_with_env_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let print = format!("echo \"${{FROM:-unset}}\" >> {}", out.display());
        let mut own = sh(print.clone());
        own.env = vec!["OTHER=1".into()];
        let h = hooks(Vec::new(), vec![sh(print), own]);
        h.run(Phase::StartContainer, None, &["FROM=process".to_string()])
            .unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "process\nunset\n");
    }

    #[test]
    fn a_failing_hook_is_named_with_its_status_and_output_and_stops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let h = hooks(
            vec![
                sh("echo mount refused >&2; exit 4".into()),
                sh(format!("touch {}", marker.display())),
            ],
            Vec::new(),
        );
        let err = h.run(Phase::CreateContainer, None, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "createContainer hook #0 (/bin/sh) failed: exit status 4, stderr: mount refused"
        );
        assert!(!marker.exists());
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_and_named() {
        let mut slow = sh("sleep 100".into());
        slow.timeout_secs = Some(1);
        let started = Instant::now();
        let err = hooks(Vec::new(), vec![slow])
            .run(Phase::StartContainer, None, &[])
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(matches!(err, HookError::TimedOut { .. }));
        assert_eq!(
            err.to_string(),
            "startContainer hook #0 (/bin/sh) ran past its timeout of 1s and was killed"
        );
    }

    #[test]
    fn a_missing_hook_is_named() {
        let mut missing = sh(String::new());
        missing.path = "/nonexistent/hook".into();
        let err = hooks(vec![missing], Vec::new())
            .run(Phase::CreateContainer, None, &[])
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("createContainer hook #0 (/nonexistent/hook) could not be started"),
            "{err}"
        );
    }
}
