//! The [`Hypervisor`](crate::Hypervisor) backends, and [`Backend`], the one
//! name for each: what the configuration selects, what creates a launcher,
//! and what the runtime asks about a backend's abilities.

pub mod builtin;
mod child;
pub mod cloud_hypervisor;
pub mod process;
pub mod qemu;
pub mod select;
pub mod virtiofsd;

use std::path::PathBuf;

use crate::Hypervisor;

/// A way to run a sandbox's guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The agent as a host process: no VM, for development and tests.
    Process,
    /// `kestrel-vmm`, our own KVM VMM.
    Builtin,
    /// QEMU microvm, its vsock served by `kestrel-vmm vhost-user-vsock`.
    Qemu,
    /// Cloud Hypervisor.
    CloudHypervisor,
}

/// How a container's root filesystem reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsDelivery {
    /// The agent runs on the host and opens the host path itself.
    HostPath,
    /// The guest sees no host files: the tree is copied in through the
    /// agent's CopyFile (Kata's no-shared-filesystem mode).
    CopyIntoGuest,
    /// The host bind-mounts the tree below the sandbox's shared directory,
    /// which the guest mounts over virtio-fs ([`crate::SharedFs`]).
    SharedFs,
}

/// The programs the VM backends run, as the configuration names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programs {
    /// `qemu-system-x86_64`, as a path or a name on `PATH`.
    pub qemu: PathBuf,
    /// `kestrel-vmm` (the builtin VMM, and QEMU's vsock backend).
    pub vmm: PathBuf,
    /// `cloud-hypervisor`, as a path or a name on `PATH`.
    pub cloud_hypervisor: PathBuf,
    /// QEMU's accelerator: `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// `virtiofsd`, which serves a sandbox's shared directory, as a path or
    /// a name on `PATH` ([`virtiofsd::DEFAULT_BINARY`]).
    pub virtiofsd: PathBuf,
}

impl Backend {
    /// Every backend, in the order error messages list them.
    pub const ALL: [Backend; 4] = [
        Backend::Process,
        Backend::Builtin,
        Backend::Qemu,
        Backend::CloudHypervisor,
    ];

    /// The name the configuration and `--hypervisor` use.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Process => "process",
            Backend::Builtin => "builtin",
            Backend::Qemu => "qemu",
            Backend::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// The backend called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Every backend name, comma-separated, for error messages.
    pub fn names() -> String {
        Backend::ALL.map(Backend::name).join(", ")
    }

    /// Whether the guest is a VM booted from the guest image.
    pub fn is_vm(self) -> bool {
        self != Backend::Process
    }

    /// How a container's rootfs and bind-mounted files reach the agent:
    /// a VM's through its shared directory when `shared_fs` (the runtime's
    /// configuration) allows one, else copied in.
    pub fn rootfs_delivery(self, shared_fs: bool) -> RootfsDelivery {
        match self {
            Backend::Process => RootfsDelivery::HostPath,
            Backend::Builtin | Backend::Qemu | Backend::CloudHypervisor if shared_fs => {
                RootfsDelivery::SharedFs
            }
            Backend::Builtin | Backend::Qemu | Backend::CloudHypervisor => {
                RootfsDelivery::CopyIntoGuest
            }
        }
    }

    /// Whether the backend needs KVM backed by hardware, given QEMU's
    /// chosen accelerator (`kvm` or `tcg`).
    pub fn needs_kvm(self, qemu_accel: &str) -> bool {
        match self {
            Backend::Builtin | Backend::CloudHypervisor => true,
            Backend::Qemu => qemu_accel == "kvm",
            Backend::Process => false,
        }
    }

    /// A launcher of this kind, not yet prepared.
    pub fn launcher(self, programs: &Programs) -> Box<dyn Hypervisor> {
        match self {
            Backend::Process => Box::new(process::Process::new()),
            Backend::Builtin => Box::new(
                builtin::Builtin::new(programs.vmm.clone())
                    .with_virtiofsd(programs.virtiofsd.clone()),
            ),
            Backend::Qemu => Box::new(qemu::Qemu::new(qemu::QemuOptions {
                binary: programs.qemu.clone(),
                vmm_binary: programs.vmm.clone(),
                accel: programs.accel.clone(),
                virtiofsd: programs.virtiofsd.clone(),
            })),
            Backend::CloudHypervisor => Box::new(
                cloud_hypervisor::CloudHypervisor::new(programs.cloud_hypervisor.clone())
                    .with_virtiofsd(programs.virtiofsd.clone()),
            ),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_dir::{dir_name, max_root_len, MAX_SOCKET_NAME_LEN, MAX_SOCKET_PATH_LEN};
    use std::path::Path;

    #[test]
    fn every_socket_of_a_sandbox_fits_a_unix_address_under_the_longest_root() {
        let root = Path::new("/").join("r".repeat(max_root_len() - 1));
        let dir = root.join(dir_name(&"c".repeat(kestrel_protocols::id::MAX_ID_LEN)));
        let guest_initiated = format!("{}_{}", child::vsock_socket(&dir).display(), u32::MAX);
        let sockets = [
            child::vsock_socket(&dir),
            guest_initiated.into(),
            process::Process::socket_path(&dir),
            qemu::vhost_user_socket(&dir),
            virtiofsd::socket(&dir),
            cloud_hypervisor::api_socket(&dir),
        ];
        for socket in sockets {
            let name = socket.file_name().unwrap().len();
            assert!(name <= MAX_SOCKET_NAME_LEN, "{}", socket.display());
            assert!(
                socket.as_os_str().len() <= MAX_SOCKET_PATH_LEN,
                "{}",
                socket.display()
            );
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for backend in Backend::ALL {
            assert_eq!(Backend::from_name(backend.name()), Some(backend));
        }
        assert_eq!(Backend::from_name("xen"), None);
        assert_eq!(Backend::names(), "process, builtin, qemu, cloud-hypervisor");
    }

    #[test]
    fn only_the_process_backend_opens_host_paths_and_vms_share_unless_told_not_to() {
        for backend in Backend::ALL {
            let host = backend.rootfs_delivery(true) == RootfsDelivery::HostPath;
            assert_eq!(host, backend == Backend::Process, "{backend}");
            assert_eq!(backend.is_vm(), !host, "{backend}");
            if backend.is_vm() {
                assert_eq!(backend.rootfs_delivery(true), RootfsDelivery::SharedFs);
                assert_eq!(
                    backend.rootfs_delivery(false),
                    RootfsDelivery::CopyIntoGuest
                );
            } else {
                assert_eq!(backend.rootfs_delivery(false), RootfsDelivery::HostPath);
            }
        }
    }

    #[test]
    fn each_launcher_reports_its_own_kind() {
        let programs = Programs {
            qemu: "qemu-system-x86_64".into(),
            vmm: "kestrel-vmm".into(),
            cloud_hypervisor: "cloud-hypervisor".into(),
            accel: "auto".into(),
            virtiofsd: virtiofsd::DEFAULT_BINARY.into(),
        };
        for backend in Backend::ALL {
            assert_eq!(backend.launcher(&programs).backend(), backend);
        }
    }
}
