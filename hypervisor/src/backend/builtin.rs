//! The `builtin` backend: our own `kestrel-vmm` boots the guest image with
//! a virtio-vsock device behind a hybrid socket, and the agent is reached
//! with `CONNECT 1024`. A shared directory is a `--fs` device served by
//! virtiofsd. It needs KVM that runs guests natively.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

use super::child::{kernel_cmdline, vsock_socket, SingleVmm};
use super::virtiofsd;
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

    /// Runs `binary` as virtiofsd for sandboxes that share a directory.
    pub fn with_virtiofsd(self, binary: PathBuf) -> Self {
        Builtin(self.0.with_virtiofsd(binary))
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
    if let Some(fs) = &spec.shared_fs {
        let mut option = OsString::from("socket=");
        option.push(virtiofsd::socket(dir));
        option.push(format!(",tag={}", fs.tag));
        argv.extend(["--fs".into(), option]);
    }
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
        self.0.start(command_line).await
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
        self.0.begin_stop();
        let exit = self
            .0
            .vmm
            .stop(Some(Signal::SIGTERM), Instant::now() + grace)
            .await;
        self.0.stop_helpers().await;
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
            shared_fs: None,
        }
    }

    #[test]
    fn a_shared_dir_is_an_fs_option_on_virtiofsds_socket() {
        let dir = Path::new("/run/x");
        let mut spec = spec(dir);
        spec.shared_fs = Some(crate::SharedFs {
            dir: "/run/x/sb/shared".into(),
            tag: "kestrel".into(),
            cache: crate::FsCache::Never,
        });
        let argv = command_line(
            Path::new("/bin/kestrel-vmm"),
            &spec,
            spec.vm.as_ref().unwrap(),
        );
        let fs: Vec<String> = argv
            .windows(2)
            .filter(|w| w[0] == "--fs")
            .map(|w| w[1].to_string_lossy().into_owned())
            .collect();
        assert_eq!(fs, ["socket=/run/x/sb/virtiofsd.sock,tag=kestrel"]);
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

    /// An executable shell script `name` in `dir` running `body`.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A sandbox sharing a directory, run by a VMM that only sleeps and a
    /// virtiofsd that creates its socket file and then runs `virtiofsd`.
    async fn started_with_shared_dir(dir: &Path, virtiofsd: &str) -> Builtin {
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("initrd.img"), b"i").unwrap();
        std::fs::create_dir(dir.join("shared")).unwrap();
        let mut spec = spec(dir);
        spec.shared_fs = Some(crate::SharedFs {
            dir: dir.join("shared"),
            tag: "kestrel".into(),
            cache: crate::FsCache::Never,
        });
        let vmm = script(dir, "fake-vmm", "exec sleep 30");
        let fake = script(
            dir,
            "fake-virtiofsd",
            &format!(
                ": > \"$2\"\necho \"$@\" > '{}'\n{virtiofsd}",
                dir.join("args").display()
            ),
        );
        let mut backend = Builtin::new(vmm).with_virtiofsd(fake);
        backend.prepare(&spec).await.unwrap();
        backend.start().await.unwrap();
        backend
    }

    #[tokio::test]
    async fn virtiofsd_dying_under_the_vmm_ends_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let backend = started_with_shared_dir(dir.path(), "sleep 0.2; exit 3").await;
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert!(
            args.starts_with(&format!(
                "--socket-path {}/sb/virtiofsd.sock --shared-dir {}/shared",
                dir.path().display(),
                dir.path().display()
            )),
            "{args}"
        );

        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            crate::wait_exit(backend.exit_watch()),
        )
        .await
        .expect("the exit watch fires");

        assert_eq!(exit, Some(GuestExit::Signaled(libc::SIGKILL)));
        backend.stop(Duration::from_secs(1)).await.unwrap();
        assert!(!dir.path().join("sb").exists(), "state dir removed");
    }

    #[tokio::test]
    async fn virtiofsd_leaving_during_stop_is_not_a_death() {
        let dir = tempfile::tempdir().unwrap();
        // Leaves as virtiofsd does when the VMM hangs up: on its own, soon.
        let backend = started_with_shared_dir(dir.path(), "exec sleep 30").await;
        assert_eq!(*backend.exit_watch().borrow(), None);

        let exit = backend.stop(Duration::from_secs(2)).await.unwrap();

        // SIGTERM from stop, not a kill for a dead helper.
        assert_eq!(exit, Some(GuestExit::Signaled(libc::SIGTERM)));
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
