//! The setup helper: the first code that runs inside a new container.
//!
//! The agent clones a child into the container's namespaces and that child
//! immediately re-executes the agent binary with [`SETUP_ARG`]. The fresh,
//! single-threaded process can then allocate, mount and change identity
//! freely, which a forked child of the multi-threaded agent could not do
//! safely. This is what `runc init` is to runc.
//!
//! We write this with `nix` rather than youki's `libcontainer`: libcontainer
//! brings its own process model (its own fork, channels, state directory,
//! seccomp and systemd support) and would roughly double the agent binary,
//! while the agent needs a small part of it: namespaces, mounts,
//! pivot_root, identity and a cgroup it manages itself (see `cgroup.rs`).
//!
//! A terminal process gets its pty from the container's devpts over the
//! console socket (fd 4, see `console.rs`).
//!
//! Protocol over the control socket (fd 3, close-on-exec in here):
//! the agent sends the [`SetupConfig`] as a 4-byte little-endian length
//! and JSON. The helper answers with lines:
//! - `ok` once an init process is ready; it then waits for one byte from
//!   the agent (StartContainer) and executes the program;
//! - `pid N` from an exec helper, naming the process it cloned into the
//!   container;
//! - `invalid MESSAGE` when the request cannot be carried out as given
//!   (a mount that fails, a missing program or working directory);
//! - `failed MESSAGE` / `deadline MESSAGE` when one of the spec's hooks
//!   failed / ran past its timeout;
//! - `internal MESSAGE` when the helper itself fails (its socket, clone).
//!
//! When the program is executed the socket closes, so EOF means success.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sched::{setns, CloneFlags};
use nix::unistd::{chdir, execve, setgid, setgroups, setsid, setuid, Gid, Uid};

use super::console;
use super::hooks::{HookError, Phase};
use super::process::clone_process;
use super::rootfs;
use super::spec::{ProcessConfig, Role, SetupConfig, DEFAULT_PATH};

/// First argument that makes the agent binary run as the setup helper.
pub const SETUP_ARG: &str = "__kestrel-container-setup";

/// The helper's end of the control socket.
pub const CONTROL_FD: i32 = 3;

/// Largest configuration the helper accepts, in bytes.
const MAX_CONFIG_LEN: u32 = 16 << 20;

/// Runs the helper; never returns.
pub fn run() -> ! {
    // SAFETY: the agent placed the helper's socket at CONTROL_FD before exec
    // and nothing else in this process owns that descriptor.
    let mut control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    let code = match setup(&mut control) {
        Ok(never) => match never {},
        Err(Failure::Invalid(msg)) => {
            let _ = writeln!(control, "invalid {}", msg.replace('\n', " "));
            127
        }
        Err(Failure::Internal(msg)) => {
            let _ = writeln!(control, "internal {}", msg.replace('\n', " "));
            126
        }
        Err(Failure::Hook(e)) => {
            let kind = match e {
                HookError::TimedOut { .. } => "deadline",
                _ => "failed",
            };
            let _ = writeln!(control, "{kind} {}", e.to_string().replace('\n', " "));
            127
        }
    };
    std::process::exit(code)
}

/// Why setup failed: because of what was asked, or in the helper itself.
enum Failure {
    Invalid(String),
    Internal(String),
    Hook(HookError),
}

impl From<HookError> for Failure {
    fn from(e: HookError) -> Self {
        Failure::Hook(e)
    }
}

/// Failures of the container's own setup (mounts, identity, the program)
/// come from the request.
impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Failure::Invalid(msg)
    }
}

fn setup(control: &mut UnixStream) -> Result<Infallible, Failure> {
    fcntl(control.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| Failure::Internal(format!("control socket: {e}")))?;
    let console = console::adopt().map_err(|e| Failure::Internal(e.to_string()))?;
    let config = read_config(control)?;
    match config.role {
        Role::Init(rootfs) => {
            session()?;
            // runc runs them from the new root's directory, before pivot_root.
            rootfs::prepare(&rootfs, || {
                config
                    .hooks
                    .run(Phase::CreateContainer, Some(&rootfs.root), &[])
                    .map_err(Failure::Hook)
            })?;
            terminal(console, &config.process)?;
            let program = prepare_process(&config.process)?;
            reply(control, "ok")?;
            let mut start = [0u8; 1];
            match control.read(&mut start) {
                Ok(1) => {
                    let p = &config.process;
                    config.hooks.run(Phase::StartContainer, None, &p.env)?;
                    Ok(exec(&program, p)?)
                }
                _ => Err(Failure::Internal(
                    "the agent went away before StartContainer".into(),
                )),
            }
        }
        Role::Exec { pid } => {
            join_namespaces(pid).map_err(Failure::Internal)?;
            // Joining a PID namespace only affects children: clone the real
            // process, as a child of the agent so the agent reaps it.
            let cloned = clone_process(CloneFlags::CLONE_PARENT)
                .map_err(|e| Failure::Internal(format!("clone: {e}")))?;
            match cloned {
                Some(child) => {
                    reply(control, &format!("pid {child}"))?;
                    std::process::exit(0)
                }
                None => {
                    session()?;
                    terminal(console, &config.process)?;
                    let program = prepare_process(&config.process)?;
                    Ok(exec(&program, &config.process)?)
                }
            }
        }
    }
}

fn read_config(control: &mut UnixStream) -> Result<SetupConfig, Failure> {
    read_config_inner(control).map_err(Failure::Internal)
}

fn read_config_inner(control: &mut UnixStream) -> Result<SetupConfig, String> {
    let mut len = [0u8; 4];
    control
        .read_exact(&mut len)
        .map_err(|e| format!("reading configuration length: {e}"))?;
    let len = u32::from_le_bytes(len);
    if len > MAX_CONFIG_LEN {
        return Err(format!("configuration of {len} bytes is too large"));
    }
    let mut buf = vec![0u8; len as usize];
    control
        .read_exact(&mut buf)
        .map_err(|e| format!("reading configuration: {e}"))?;
    serde_json::from_slice(&buf).map_err(|e| format!("decoding configuration: {e}"))
}

/// Answers the agent with one line, in one write: an exec helper and the
/// process it cloned share the socket, and `writeln!` writes a line in
/// pieces, so their answers could interleave ("pid N" + "invalid ...", then
/// two newlines) and the agent would read an empty line.
fn reply(control: &mut UnixStream, line: &str) -> Result<(), Failure> {
    control
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| Failure::Internal(format!("answering the agent: {e}")))
}

/// A new session, which a terminal process's pty then controls.
fn session() -> Result<(), String> {
    setsid().map_err(|e| format!("setsid: {e}"))?;
    Ok(())
}

/// With a terminal, opens the pty in the container (so job control and ^C
/// work in there, and `tty` names it) and hands the master to the agent.
fn terminal(console: OwnedFd, process: &ProcessConfig) -> Result<(), String> {
    if !process.terminal {
        return Ok(());
    }
    console::attach(console, process).map_err(|e| e.to_string())
}

fn join_namespaces(pid: i32) -> Result<(), String> {
    // Open every namespace first: once in the container's mount namespace,
    // /proc is the container's and the agent-side pid means nothing.
    let namespaces = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut opened = Vec::new();
    for (name, flag) in namespaces {
        let path = format!("/proc/{pid}/ns/{name}");
        let file = File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
        opened.push((path, file, flag));
    }
    for (path, file, flag) in &opened {
        setns(file.as_fd(), *flag).map_err(|e| format!("joining {path}: {e}"))?;
    }
    Ok(())
}

/// Applies limits and identity and finds the program; after this only
/// `exec` remains.
fn prepare_process(p: &ProcessConfig) -> Result<PathBuf, String> {
    for r in &p.rlimits {
        let limit = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: setrlimit reads the struct we pass and nothing else.
        if unsafe { libc::setrlimit(r.resource as _, &limit) } != 0 {
            return Err(format!(
                "setrlimit {}: {}",
                r.resource,
                std::io::Error::last_os_error()
            ));
        }
    }
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("setting oom_score_adj: {e}"))?;
    }
    if !p.no_new_privileges {
        // Without no_new_privs, loading a filter takes CAP_SYS_ADMIN, which
        // the identity change or the spec's capabilities may take away: load
        // it now, as runc does; the profile must then allow what follows.
        if let Some(filter) = &p.seccomp {
            filter.load()?;
        }
    }
    if let Some(caps) = &p.capabilities {
        caps.before_identity()?;
    }
    let groups: Vec<Gid> = p
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    setgid(Gid::from_raw(p.gid)).map_err(|e| format!("setgid {}: {e}", p.gid))?;
    setuid(Uid::from_raw(p.uid)).map_err(|e| format!("setuid {}: {e}", p.uid))?;
    chdir(Path::new(&p.cwd)).map_err(|e| format!("cwd {}: {e}", p.cwd))?;
    if let Some(caps) = &p.capabilities {
        caps.apply()?;
    }
    if p.no_new_privileges {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
    }
    find_program(p)
}

fn find_program(p: &ProcessConfig) -> Result<PathBuf, String> {
    let name = &p.args[0];
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = p
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| format!("executable file {name:?} not found in $PATH ({path})"))
}

fn exec(program: &Path, p: &ProcessConfig) -> Result<Infallible, String> {
    let to_c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let path = to_c(&program.to_string_lossy())?;
    let args = p
        .args
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = p
        .env
        .iter()
        .map(|e| to_c(e))
        .collect::<Result<Vec<_>, _>>()?;
    // The Rust runtime ignores SIGPIPE and ignored signals survive exec;
    // the container's program must get the default behaviour.
    // SAFETY: resetting a disposition to SIG_DFL installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Our parent is the agent. If it dies, the container dies with it, as it
    // would with its VM: in host mode nothing else would stop it. Set here,
    // after the credential changes that clear it.
    // SAFETY: PR_SET_PDEATHSIG takes integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(format!(
            "parent-death signal: {}",
            std::io::Error::last_os_error()
        ));
    }
    if p.no_new_privileges {
        // With no_new_privs the filter needs no privilege: load it last, so
        // that it filters the container's program and nothing of ours.
        if let Some(filter) = &p.seccomp {
            filter.load()?;
        }
    }
    let err = match execve(&path, &args, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    Err(format!("executing {}: {err}", program.display()))
}
