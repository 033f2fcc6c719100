//! Which namespaces a container's init process gets, as Kata's agent decides
//! them for a pod in a VM.
//!
//! A namespace path in the spec names a namespace on the *host* (CRI's
//! app containers carry `/proc/<pause pid>/ns/ipc`, the pause container the
//! CNI's `/var/run/netns/cni-…`): it means nothing in the guest, so it is
//! translated, never joined:
//!
//! | spec entry          | network            | ipc, uts, pid                       |
//! |---------------------|--------------------|-------------------------------------|
//! | no path             | a new one          | a new one                           |
//! | a path              | the agent's (the pod's network is the VM's) | the pod's |
//! | no entry            | the agent's        | the agent's (CRI's `NODE` mode)      |
//!
//! The pod's namespaces are those of the sandbox's first container (the
//! infra, or pause, container), as in Kata: they are held open here, so the
//! pod's IPC and UTS namespaces outlive that container's processes. A pod's
//! PID namespace ends with its init process; a container joining it after
//! that fails with FAILED_PRECONDITION (see `process.rs`). `CreateContainer.sandbox_pidns` asks for the
//! pod's PID namespace whatever the spec says, as Kata's runtime does.

use std::fs::File;
use std::os::fd::AsFd;

use kestrel_protocols::oci;
use nix::sched::{setns, CloneFlags};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// A namespace kind a container may share with its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    Ipc,
    Uts,
    Pid,
}

impl Shared {
    fn flag(self) -> CloneFlags {
        match self {
            Shared::Ipc => CloneFlags::CLONE_NEWIPC,
            Shared::Uts => CloneFlags::CLONE_NEWUTS,
            Shared::Pid => CloneFlags::CLONE_NEWPID,
        }
    }

    /// The name under `/proc/<pid>/ns/` (for a thread's PID namespace of
    /// future children: `pid_for_children`).
    fn proc_name(self) -> &'static str {
        match self {
            Shared::Ipc => "ipc",
            Shared::Uts => "uts",
            Shared::Pid => "pid",
        }
    }
}

/// What the spec asks for, before the pod's namespaces are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Namespaces the init process is cloned into. Mount is always new.
    pub new: CloneFlags,
    /// Namespaces the init process shares with its pod.
    pub pod: Vec<Shared>,
    /// Whether the spec asks for a private UTS namespace (new or the pod's):
    /// without one the container may not set a hostname.
    pub private_uts: bool,
}

impl Plan {
    /// Reads `linux.namespaces`. `sandbox_pidns` is CreateContainer's field.
    pub fn from_spec(spec: &oci::Spec, sandbox_pidns: bool) -> Result<Plan> {
        let mut plan = Plan {
            new: CloneFlags::CLONE_NEWNS,
            pod: Vec::new(),
            private_uts: false,
        };
        let mut seen = Vec::new();
        for ns in spec.Linux.Namespaces.iter() {
            if seen.contains(&ns.Type) {
                return Err(Error::invalid(format!(
                    "linux.namespaces names the {} namespace twice",
                    ns.Type
                )));
            }
            seen.push(ns.Type.clone());
            let joins = !ns.Path.is_empty();
            let shared = match ns.Type.as_str() {
                "ipc" => Shared::Ipc,
                "uts" => Shared::Uts,
                "pid" => Shared::Pid,
                "network" => {
                    // A path is the pod's network, which is the guest's own.
                    if !joins {
                        plan.new |= CloneFlags::CLONE_NEWNET;
                    }
                    continue;
                }
                // The mount namespace is always new; a cgroup namespace is
                // made by the setup helper (see `wants_cgroup_namespace`).
                "mount" | "cgroup" if joins => {
                    return Err(Error::Unimplemented(format!(
                        "joining an existing {} namespace ({}) is not supported",
                        ns.Type, ns.Path
                    )))
                }
                "mount" | "cgroup" => continue,
                "user" => {
                    return Err(Error::Unimplemented(
                        "user namespaces are not supported".into(),
                    ))
                }
                other => {
                    return Err(Error::invalid(format!(
                        "unknown namespace type {other:?} in linux.namespaces"
                    )))
                }
            };
            if shared == Shared::Uts {
                plan.private_uts = true;
            }
            if joins || (shared == Shared::Pid && sandbox_pidns) {
                plan.pod.push(shared);
            } else {
                plan.new |= shared.flag();
            }
        }
        if sandbox_pidns && !plan.pod.contains(&Shared::Pid) {
            plan.new.remove(CloneFlags::CLONE_NEWPID);
            plan.pod.push(Shared::Pid);
        }
        Ok(plan)
    }

    /// The namespaces to clone into and to join, given the pod's (none yet:
    /// this container is the pod's first, and what it shares it creates).
    pub fn resolve<'a>(&self, pod: Option<&'a PodNamespaces>) -> (CloneFlags, Vec<Join<'a>>) {
        let mut new = self.new;
        let mut join = Vec::new();
        for &kind in &self.pod {
            match pod {
                Some(pod) => join.push(Join {
                    kind,
                    file: pod.file(kind),
                }),
                None => new |= kind.flag(),
            }
        }
        (new, join)
    }
}

/// One of the pod's namespaces to enter before cloning the init process.
#[derive(Debug)]
pub struct Join<'a> {
    pub kind: Shared,
    pub file: &'a File,
}

/// The pod's IPC, UTS and PID namespaces: those of its first container's
/// init process, held open.
#[derive(Debug)]
pub struct PodNamespaces {
    ipc: File,
    uts: File,
    pid: File,
}

impl PodNamespaces {
    /// The namespaces `init` (the pod's first container) runs in.
    pub fn of(init: Pid) -> std::io::Result<PodNamespaces> {
        let open = |kind: Shared| File::open(format!("/proc/{init}/ns/{}", kind.proc_name()));
        Ok(PodNamespaces {
            ipc: open(Shared::Ipc)?,
            uts: open(Shared::Uts)?,
            pid: open(Shared::Pid)?,
        })
    }

    fn file(&self, kind: Shared) -> &File {
        match kind {
            Shared::Ipc => &self.ipc,
            Shared::Uts => &self.uts,
            Shared::Pid => &self.pid,
        }
    }
}

/// Runs `clone` with the calling thread in `join`'s namespaces, then puts
/// the thread back.
///
/// setns(2) moves only the calling thread for IPC, UTS and the PID
/// namespace of future children, so the agent's other threads never see
/// the pod's namespaces. It happens on the caller's thread rather than a
/// short-lived one because the container's process sets a parent-death
/// signal, which fires when the thread that cloned it ends. A thread that
/// cannot be put back would start later containers in the wrong
/// namespaces: the agent aborts instead.
pub fn with_joined<T>(join: &[Join<'_>], clone: impl FnOnce() -> Result<T>) -> Result<T> {
    if join.is_empty() {
        return clone();
    }
    let own = join
        .iter()
        .map(|j| {
            let name = match j.kind {
                Shared::Pid => "pid_for_children",
                kind => kind.proc_name(),
            };
            let path = format!("/proc/thread-self/ns/{name}");
            File::open(&path)
                .map(|f| (j.kind, f))
                .map_err(|e| Error::internal(format!("opening {path}"), e))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut entered = Vec::new();
    let mut result = Ok(());
    for j in join {
        match setns(j.file.as_fd(), j.kind.flag()) {
            Ok(()) => entered.push(j.kind),
            Err(e) => {
                result = Err(pod_namespace_error(j.kind, e));
                break;
            }
        }
    }
    let outcome = result.and_then(|()| clone());
    for (kind, file) in own.iter().filter(|(k, _)| entered.contains(k)) {
        if let Err(e) = setns(file.as_fd(), kind.flag()) {
            tracing::error!(namespace = kind.proc_name(), error = %e, "cannot return to the agent's namespace; aborting");
            std::process::abort();
        }
    }
    outcome
}

fn pod_namespace_error(kind: Shared, e: nix::Error) -> Error {
    Error::internal(
        format!("entering the pod's {} namespace", kind.proc_name()),
        e,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_protocols::oci::{Linux, LinuxNamespace, Spec};

    fn spec(namespaces: &[(&str, &str)]) -> Spec {
        let mut linux = Linux::new();
        for (kind, path) in namespaces {
            let mut ns = LinuxNamespace::new();
            ns.Type = kind.to_string();
            ns.Path = path.to_string();
            linux.Namespaces.push(ns);
        }
        let mut spec = Spec::new();
        spec.Linux = Some(linux).into();
        spec
    }

    #[test]
    fn entries_without_paths_are_new_namespaces() {
        let plan = Plan::from_spec(
            &spec(&[
                ("pid", ""),
                ("ipc", ""),
                ("uts", ""),
                ("network", ""),
                ("mount", ""),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            plan.new,
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWNET
        );
        assert!(plan.pod.is_empty());
        assert!(plan.private_uts);
    }

    #[test]
    fn host_paths_of_a_cri_app_container_become_the_pods_namespaces() {
        let plan = Plan::from_spec(
            &spec(&[
                ("pid", "/proc/4242/ns/pid"),
                ("ipc", "/proc/4242/ns/ipc"),
                ("uts", "/proc/4242/ns/uts"),
                ("network", "/var/run/netns/cni-1234"),
                ("mount", ""),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(plan.new, CloneFlags::CLONE_NEWNS);
        assert_eq!(plan.pod, [Shared::Pid, Shared::Ipc, Shared::Uts]);
    }

    #[test]
    fn missing_entries_leave_the_container_in_the_agents_namespaces() {
        let plan = Plan::from_spec(&spec(&[("mount", "")]), false).unwrap();
        assert_eq!(plan.new, CloneFlags::CLONE_NEWNS);
        assert!(plan.pod.is_empty());
        assert!(!plan.private_uts);
    }

    #[test]
    fn sandbox_pidns_asks_for_the_pods_pid_namespace() {
        let with_entry = Plan::from_spec(&spec(&[("pid", "")]), true).unwrap();
        let without = Plan::from_spec(&spec(&[]), true).unwrap();
        for plan in [with_entry, without] {
            assert!(!plan.new.contains(CloneFlags::CLONE_NEWPID));
            assert_eq!(plan.pod, [Shared::Pid]);
        }
    }

    #[test]
    fn the_pods_first_container_creates_what_it_would_share() {
        let plan = Plan::from_spec(&spec(&[("ipc", "/proc/1/ns/ipc")]), false).unwrap();
        let (new, join) = plan.resolve(None);
        assert_eq!(new, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC);
        assert!(join.is_empty());
    }

    #[test]
    fn bad_entries_are_refused_naming_them() {
        let twice = Plan::from_spec(&spec(&[("ipc", ""), ("ipc", "")]), false).unwrap_err();
        assert!(
            matches!(twice, Error::InvalidArgument(ref m) if m.contains("ipc namespace twice")),
            "{twice:?}"
        );
        let unknown = Plan::from_spec(&spec(&[("time", "")]), false).unwrap_err();
        assert!(
            matches!(unknown, Error::InvalidArgument(ref m) if m.contains("\"time\"")),
            "{unknown:?}"
        );
        let user = Plan::from_spec(&spec(&[("user", "")]), false).unwrap_err();
        assert!(matches!(user, Error::Unimplemented(_)), "{user:?}");
        let mount = Plan::from_spec(&spec(&[("mount", "/proc/1/ns/mnt")]), false).unwrap_err();
        assert!(
            matches!(mount, Error::Unimplemented(ref m) if m.contains("/proc/1/ns/mnt")),
            "{mount:?}"
        );
    }
}
