//! The `builtin` backend: our own `kestrel-vmm` boots the guest image with
//! a virtio-vsock device behind a hybrid socket, and the agent is reached
//! with `CONNECT 1024`. It needs KVM that runs guests natively.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

use super::child::{kernel_cmdline, vsock_socket, SingleVmm};
use crate::{Error, GuestExit, Hypervisor, SandboxSpec, VmSpec};

const NAME: &str = super::Backend::Builtin.name();

/// One `kestrel-vmm` process running one sandbox's guest.
pub struct Builtin(SingleVmm);

impl Builtin {
    /// A backend that runs `vmm_binary` (a path, or a name on `PATH`).
    pub fn new(vmm_binary: PathBuf) -> Self {
        Builtin(SingleVmm::new(
            NAME,
            "kestrel-vmm",
            "the kestrel-vmm binary",
            vmm_binary,
            "is not there or on PATH (cargo build -p kestrel-vmm builds it)",
        ))
    }
}

/// The `kestrel-vmm` command line (program first) that boots `vm`.
fn command_line(binary: &Path, spec: &SandboxSpec, vm: &VmSpec) -> Vec<OsString> {
    let dir = &spec.state_dir;
    let mut argv: Vec<OsString> = vec![
        binary.into(),
        "--kernel".into(),
        vm.kernel.clone().into(),
        "--initrd".into(),
        vm.initrd.clone().into(),
        "--cmdline".into(),
        kernel_cmdline(vm).into(),
        "--memory".into(),
        vm.shape.memory_mib.to_string().into(),
        "--vcpus".into(),
        vm.shape.vcpus.to_string().into(),
        "--vsock-uds".into(),
        vsock_socket(dir).into(),
        "--serial".into(),
        dir.join("console.log").into(),
        "--log-level".into(),
        "info".into(),
    ];
    for nic in &spec.nics {
        argv.push("--net".into());
        argv.push(
            format!(
                "tap-fd={},mac={},mtu={},offload={}",
                nic.tap.as_raw_fd(),
                nic.mac_string(),
                nic.mtu,
                if nic.offload { "on" } else { "off" }
            )
            .into(),
        );
    }
    argv
}

#[async_trait]
impl Hypervisor for Builtin {
    fn backend(&self) -> super::Backend {
        super::Backend::Builtin
    }

    async fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        self.0.prepare(spec)
    }

    async fn start(&mut self) -> Result<(), Error> {
        self.0.start(command_line)
    }

    fn agent_address(&self) -> Option<String> {
        self.0.agent_address()
    }

    fn pid(&self) -> Option<u32> {
        self.0.vmm.pid()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.0.vmm.exit_watch()
    }

    async fn stop(&self, grace: Duration) -> Result<Option<GuestExit>, Error> {
        let Some(spec) = self.0.spec() else {
            return Ok(None);
        };
        // SIGTERM: kestrel-vmm stops the vCPUs and removes its socket.
        let exit = self
            .0
            .vmm
            .stop(Some(Signal::SIGTERM), Instant::now() + grace)
            .await;
        crate::state_dir::remove(&spec.state_dir)?;
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> SandboxSpec {
        SandboxSpec {
            id: "sb".into(),
            state_dir: dir.join("sb"),
            agent_path: "/unused".into(),
            agent_log_level: "info".into(),
            vm: Some(VmSpec {
                kernel: dir.join("vmlinux"),
                initrd: dir.join("initrd.img"),
                shape: crate::VmShape {
                    memory_mib: 256,
                    vcpus: 2,
                },
                kernel_params: "debug".into(),
            }),
            netns: None,
            nics: Vec::new(),
        }
    }

    #[test]
    fn each_nic_is_a_net_option_naming_its_inherited_tap() {
        let dir = Path::new("/run/x");
        let mut spec = spec(dir);
        let tap = std::sync::Arc::new(std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").unwrap(),
        ));
        let fd = tap.as_raw_fd();
        for (mac, offload) in [([2, 0, 0, 0, 0, 1], true), ([2, 0, 0, 0, 0, 2], false)] {
            spec.nics.push(crate::GuestNic {
                tap: tap.clone(),
                mac,
                mtu: 1450,
                offload,
            });
        }
        let argv = command_line(
            Path::new("/bin/kestrel-vmm"),
            &spec,
            spec.vm.as_ref().unwrap(),
        );
        let nets: Vec<String> = argv
            .windows(2)
            .filter(|w| w[0] == "--net")
            .map(|w| w[1].to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            nets,
            [
                format!("tap-fd={fd},mac=02:00:00:00:00:01,mtu=1450,offload=on"),
                format!("tap-fd={fd},mac=02:00:00:00:00:02,mtu=1450,offload=off"),
            ]
        );
    }

    #[test]
    fn command_line_boots_the_image_with_the_hybrid_socket_in_the_state_dir() {
        let dir = Path::new("/run/x");
        let spec = spec(dir);
        let argv = command_line(
            Path::new("/bin/kestrel-vmm"),
            &spec,
            spec.vm.as_ref().unwrap(),
        );
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "/bin/kestrel-vmm",
                "--kernel",
                "/run/x/vmlinux",
                "--initrd",
                "/run/x/initrd.img",
                "--cmdline",
                &format!("{} debug", crate::BASE_KERNEL_PARAMS),
                "--memory",
                "256",
                "--vcpus",
                "2",
                "--vsock-uds",
                "/run/x/sb/vsock",
                "--serial",
                "/run/x/sb/console.log",
                "--log-level",
                "info",
            ]
        );
    }

    #[tokio::test]
    async fn prepare_names_a_missing_image_and_a_missing_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let err = Builtin::new("/bin/true".into())
            .prepare(&spec)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("kestrel image build"), "{err}");
        std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"i").unwrap();
        let err = Builtin::new(dir.path().join("no-vmm"))
            .prepare(&spec)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("kestrel-vmm"), "{err}");
        let mut without_vm = spec.clone();
        without_vm.vm = None;
        let err = Builtin::new("/bin/true".into())
            .prepare(&without_vm)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoVmSpec("builtin")), "{err}");
    }

    #[tokio::test]
    async fn agent_address_is_the_hybrid_socket_on_port_1024() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"i").unwrap();
        let mut backend = Builtin::new("/bin/true".into());
        assert_eq!(backend.agent_address(), None);
        backend.prepare(&spec).await.unwrap();
        assert_eq!(
            backend.agent_address().unwrap(),
            format!("hvsock://{}/sb/vsock:1024", dir.path().display())
        );
    }
}
