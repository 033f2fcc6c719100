//! The `qemu` backend: QEMU's microvm machine boots our guest image, and
//! the guest's virtio-vsock device is served by our own vsock core through
//! `kestrel-vmm vhost-user-vsock`, which gives the host a hybrid socket.
//!
//! microvm with `acpi=off` puts virtio-mmio devices on the kernel command
//! line by itself; vhost-user needs the guest RAM shared, hence the memfd
//! memory backend. QEMU boots a bzImage (a plain vmlinux needs a PVH note
//! our kernel does not carry), so a configured `vmlinux` is swapped for the
//! `bzImage` beside it. `accel = "auto"` takes KVM only where it runs
//! guests natively, TCG otherwise.
//!
//! A shared directory is QEMU's `vhost-user-fs-device` on virtiofsd's
//! socket, which needs the same shared guest RAM.
//!
//! Without ACPI the guest cannot power off; after DestroySandbox it
//! reboots, and `reboot=k` pulses reset through an i8042, which microvm
//! lacks unless asked: with one, and `-no-reboot`, QEMU exits by itself.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

use super::child::{
    checked_vm, find_binary, io_err, kernel_cmdline, vsock_socket, watch_helper, Child, AGENT_PORT,
    HELPER_GRACE,
};
use super::select::{kvm_support, qemu_accel};
use super::virtiofsd;
use crate::{Error, GuestExit, Hypervisor, SandboxSpec, VmSpec};

const NAME: &str = super::Backend::Qemu.name();
/// How long the vhost-user backend may take to create its socket.
const BACKEND_READY: Duration = Duration::from_secs(5);

/// What the QEMU backend runs.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// `qemu-system-x86_64`, as a path or a name on `PATH`.
    pub binary: PathBuf,
    /// `kestrel-vmm`, whose `vhost-user-vsock` subcommand serves vsock.
    pub vmm_binary: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// `virtiofsd`, for sandboxes that share a directory.
    pub virtiofsd: PathBuf,
}

/// What `prepare` settled.
#[derive(Debug, Clone)]
struct Prepared {
    spec: SandboxSpec,
    qemu: PathBuf,
    vmm: PathBuf,
    kernel: PathBuf,
    accel: &'static str,
    /// virtiofsd's binary, when the spec shares a directory.
    virtiofsd: Option<PathBuf>,
}

/// A QEMU process and its vhost-user vsock backend, running one sandbox.
pub struct Qemu {
    options: QemuOptions,
    prepared: Option<Prepared>,
    qemu: Arc<Child>,
    backend: Child,
    virtiofsd: Child,
    /// Set once `stop` began: from then on the helpers' exits are expected.
    stopping: watch::Sender<bool>,
}

impl Qemu {
    pub fn new(options: QemuOptions) -> Self {
        Qemu {
            options,
            prepared: None,
            qemu: Arc::new(Child::new("qemu")),
            backend: Child::new("vhost-user vsock backend"),
            virtiofsd: Child::new("virtiofsd"),
            stopping: watch::channel(false).0,
        }
    }
}

pub(crate) fn vhost_user_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("vhost-user.sock")
}

/// The kernel QEMU can boot: the bzImage next to a `vmlinux`, if there is
/// one, else the configured file.
fn qemu_kernel(vm: &VmSpec) -> PathBuf {
    let bzimage = vm.kernel.with_file_name("bzImage");
    if vm.kernel.file_name().is_some_and(|n| n == "vmlinux") && bzimage.is_file() {
        bzimage
    } else {
        vm.kernel.clone()
    }
}

fn backend_command(p: &Prepared) -> Vec<OsString> {
    let dir = &p.spec.state_dir;
    vec![
        p.vmm.clone().into(),
        "vhost-user-vsock".into(),
        "--socket".into(),
        vhost_user_socket(dir).into(),
        "--uds".into(),
        vsock_socket(dir).into(),
        "--log-level".into(),
        "info".into(),
    ]
}

/// virtio-net-device properties that turn every checksum and segmentation
/// offload off, both ways.
const QEMU_NO_OFFLOADS: &str = ",csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,\
guest_ecn=off,guest_ufo=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off";

fn qemu_command(p: &Prepared, vm: &VmSpec) -> Vec<OsString> {
    let dir = &p.spec.state_dir;
    let mut chardev = OsString::from("socket,id=vsock0,path=");
    chardev.push(vhost_user_socket(dir));
    let mut serial = OsString::from("file:");
    serial.push(dir.join("console.log"));
    let mut argv: Vec<OsString> = vec![
        p.qemu.clone().into(),
        "-M".into(),
        "microvm,acpi=off,memory-backend=mem0".into(),
        "-accel".into(),
        p.accel.into(),
    ];
    if p.accel == "kvm" {
        argv.extend(["-cpu".into(), "host".into()]);
    }
    argv.extend([
        "-m".into(),
        format!("{}M", vm.shape.memory_mib).into(),
        "-smp".into(),
        vm.shape.vcpus.to_string().into(),
        "-object".into(),
        format!(
            "memory-backend-memfd,id=mem0,size={}M,share=on",
            vm.shape.memory_mib
        )
        .into(),
        "-kernel".into(),
        p.kernel.clone().into(),
        "-initrd".into(),
        vm.initrd.clone().into(),
        "-append".into(),
        kernel_cmdline(vm).into(),
        "-chardev".into(),
        chardev,
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock0".into(),
        "-device".into(),
        "i8042".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        serial,
    ]);
    if let Some(fs) = &p.spec.shared_fs {
        let mut chardev = OsString::from("socket,id=fs0,path=");
        chardev.push(virtiofsd::socket(dir));
        argv.extend([
            "-chardev".into(),
            chardev,
            "-device".into(),
            format!("vhost-user-fs-device,chardev=fs0,tag={}", fs.tag).into(),
        ]);
    }
    // One virtio-net card per tap, in order: the guest's eth0 is the first.
    // QEMU reads IFF_VNET_HDR off the descriptor and passes offloads on.
    for (i, nic) in p.spec.nics.iter().enumerate() {
        argv.extend([
            "-netdev".into(),
            format!("tap,id=net{i},fd={},vhost=off", nic.tap.as_raw_fd()).into(),
            "-device".into(),
            format!(
                "virtio-net-device,netdev=net{i},mac={},host_mtu={}{}",
                nic.mac_string(),
                nic.mtu,
                if nic.offload { "" } else { QEMU_NO_OFFLOADS }
            )
            .into(),
        ]);
    }
    argv
}

#[async_trait]
impl Hypervisor for Qemu {
    fn backend(&self) -> super::Backend {
        super::Backend::Qemu
    }

    async fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        let vm = checked_vm(NAME, spec)?;
        let qemu = find_binary(
            "the QEMU binary",
            &self.options.binary,
            "is not installed (apt-get install qemu-system-x86)",
        )?;
        let vmm = find_binary(
            "the kestrel-vmm binary (it serves the guest's vsock)",
            &self.options.vmm_binary,
            "is not there or on PATH (cargo build -p kestrel-vmm builds it)",
        )?;
        let virtiofsd = virtiofsd::check(spec, &self.options.virtiofsd)?;
        let (accel, why) = qemu_accel(&self.options.accel, &kvm_support());
        tracing::info!(sandbox_id = %spec.id, accel, why, "QEMU acceleration");
        crate::state_dir::create(&spec.state_dir)?;
        self.prepared = Some(Prepared {
            spec: spec.clone(),
            qemu,
            vmm,
            kernel: qemu_kernel(vm),
            accel,
            virtiofsd,
        });
        Ok(())
    }

    async fn start(&mut self) -> Result<(), Error> {
        let p = self
            .prepared
            .as_ref()
            .ok_or(Error::NotPrepared(NAME, "start"))?;
        let vm = p
            .spec
            .vm
            .as_ref()
            .ok_or(Error::NotPrepared(NAME, "start"))?;
        let dir = &p.spec.state_dir;
        self.backend.spawn(
            &p.spec.id,
            &backend_command(p),
            &dir.join("vsock-backend.log"),
        )?;
        // QEMU connects to the backend's socket at once: wait for it.
        let socket = vhost_user_socket(dir);
        let ready_by = Instant::now() + BACKEND_READY;
        while !socket.exists() {
            if let Some(exit) = *self.backend.exit_watch().borrow() {
                return Err(Error::EarlyExit {
                    backend: NAME,
                    exit,
                });
            }
            if Instant::now() > ready_by {
                self.backend
                    .kill("its vhost-user socket did not appear in time");
                return Err(io_err(
                    "waiting for the vhost-user backend's socket",
                    &socket,
                )(std::io::ErrorKind::TimedOut.into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let (Some(fs), Some(binary)) = (&p.spec.shared_fs, &p.virtiofsd) {
            if let Err(e) = virtiofsd::start(&self.virtiofsd, binary, &p.spec, fs).await {
                self.backend.kill("virtiofsd did not start");
                return Err(e);
            }
        }
        if let Err(e) = self.qemu.spawn_with_nics(
            &p.spec.id,
            &qemu_command(p, vm),
            &dir.join("vmm.log"),
            &p.spec.nics,
        ) {
            self.backend.kill("QEMU did not start");
            self.virtiofsd.kill("QEMU did not start");
            return Err(e);
        }
        tokio::spawn(watch_helper(
            "the vsock backend",
            p.spec.id.clone(),
            self.backend.exit_watch(),
            Arc::clone(&self.qemu),
            self.stopping.subscribe(),
        ));
        if self.virtiofsd.pid().is_some() {
            tokio::spawn(watch_helper(
                "virtiofsd",
                p.spec.id.clone(),
                self.virtiofsd.exit_watch(),
                Arc::clone(&self.qemu),
                self.stopping.subscribe(),
            ));
        }
        Ok(())
    }

    fn agent_address(&self) -> Option<String> {
        let p = self.prepared.as_ref()?;
        Some(format!(
            "hvsock://{}:{AGENT_PORT}",
            vsock_socket(&p.spec.state_dir).display()
        ))
    }

    fn pid(&self) -> Option<u32> {
        self.qemu.pid()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.qemu.exit_watch()
    }

    async fn stop(&self, grace: Duration) -> Result<Option<GuestExit>, Error> {
        let Some(p) = &self.prepared else {
            return Ok(None);
        };
        // QEMU first: it complains when its backends vanish under it. The
        // backends then see the disconnect and leave on their own.
        self.stopping.send_replace(true);
        let exit = self
            .qemu
            .stop(Some(Signal::SIGTERM), Instant::now() + grace)
            .await;
        let helpers_by = Instant::now() + HELPER_GRACE;
        tokio::join!(
            self.backend.stop(None, helpers_by),
            self.virtiofsd.stop(None, helpers_by)
        );
        crate::state_dir::remove(&p.spec.state_dir)?;
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(dir: &Path, accel: &'static str) -> (Prepared, VmSpec) {
        let vm = VmSpec {
            kernel: dir.join("bzImage"),
            initrd: dir.join("initrd.img"),
            shape: crate::VmShape {
                memory_mib: 256,
                vcpus: 1,
            },
            kernel_params: String::new(),
        };
        let spec = SandboxSpec {
            id: "sb".into(),
            state_dir: dir.join("sb"),
            agent_path: "/unused".into(),
            agent_log_level: "info".into(),
            vm: Some(vm.clone()),
            netns: None,
            nics: Vec::new(),
            shared_fs: None,
        };
        let p = Prepared {
            spec,
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            vmm: "/bin/kestrel-vmm".into(),
            kernel: vm.kernel.clone(),
            accel,
            virtiofsd: None,
        };
        (p, vm)
    }

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn qemu_boots_microvm_with_shared_memory_and_our_vhost_user_vsock() {
        let (p, vm) = prepared(Path::new("/s"), "tcg");
        let argv = strings(qemu_command(&p, &vm)).join(" ");
        assert_eq!(
            argv,
            format!(
                "/usr/bin/qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem0 -accel tcg \
                 -m 256M -smp 1 -object memory-backend-memfd,id=mem0,size=256M,share=on \
                 -kernel /s/bzImage -initrd /s/initrd.img -append {} \
                 -chardev socket,id=vsock0,path=/s/sb/vhost-user.sock \
                 -device vhost-user-vsock-device,chardev=vsock0 -device i8042 -display none -monitor none \
                 -no-reboot -serial file:/s/sb/console.log",
                crate::BASE_KERNEL_PARAMS
            )
        );
        let (p, vm) = prepared(Path::new("/s"), "kvm");
        assert!(strings(qemu_command(&p, &vm))
            .join(" ")
            .contains("-accel kvm -cpu host"));
    }

    #[test]
    fn each_nic_is_a_tap_netdev_on_a_virtio_net_device_with_its_mac() {
        let (mut p, vm) = prepared(Path::new("/s"), "tcg");
        let tap = Arc::new(std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").unwrap(),
        ));
        let fd = tap.as_raw_fd();
        for (mac, offload) in [([2, 0, 0, 0, 0, 1], true), ([2, 0, 0, 0, 0, 2], false)] {
            p.spec.nics.push(crate::GuestNic {
                tap: tap.clone(),
                mac,
                mtu: 1450,
                offload,
            });
        }
        let argv = strings(qemu_command(&p, &vm)).join(" ");
        assert!(
            argv.ends_with(&format!(
                " -netdev tap,id=net0,fd={fd},vhost=off \
                 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1450 \
                 -netdev tap,id=net1,fd={fd},vhost=off \
                 -device virtio-net-device,netdev=net1,mac=02:00:00:00:00:02,host_mtu=1450{QEMU_NO_OFFLOADS}"
            )),
            "{argv}"
        );
    }

    #[test]
    fn a_shared_dir_is_a_vhost_user_fs_device_on_virtiofsds_socket() {
        let (mut p, vm) = prepared(Path::new("/s"), "tcg");
        p.spec.shared_fs = Some(crate::SharedFs {
            dir: "/s/sb/shared".into(),
            tag: "kestrel".into(),
            cache: crate::FsCache::Never,
        });
        let argv = strings(qemu_command(&p, &vm)).join(" ");
        assert!(
            argv.ends_with(
                " -serial file:/s/sb/console.log \
                 -chardev socket,id=fs0,path=/s/sb/virtiofsd.sock \
                 -device vhost-user-fs-device,chardev=fs0,tag=kestrel"
            ),
            "{argv}"
        );
        assert!(argv.contains("memory-backend-memfd,id=mem0,size=256M,share=on"));
    }

    #[test]
    fn backend_serves_the_hybrid_socket_the_agent_is_dialled_on() {
        let (p, _) = prepared(Path::new("/s"), "tcg");
        assert_eq!(
            strings(backend_command(&p)).join(" "),
            "/bin/kestrel-vmm vhost-user-vsock --socket /s/sb/vhost-user.sock \
             --uds /s/sb/vsock --log-level info"
        );
    }

    #[test]
    fn a_vmlinux_is_swapped_for_the_bzimage_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut vm) = prepared(dir.path(), "tcg");
        vm.kernel = dir.path().join("vmlinux");
        assert_eq!(
            qemu_kernel(&vm),
            dir.path().join("vmlinux"),
            "no bzImage there"
        );
        std::fs::write(dir.path().join("bzImage"), b"bz").unwrap();
        assert_eq!(qemu_kernel(&vm), dir.path().join("bzImage"));
    }

    #[tokio::test]
    async fn prepare_names_missing_qemu_and_missing_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = prepared(dir.path(), "tcg");
        std::fs::write(dir.path().join("bzImage"), b"k").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"i").unwrap();
        let mut backend = Qemu::new(QemuOptions {
            binary: dir.path().join("no-qemu"),
            vmm_binary: "/bin/true".into(),
            accel: "auto".into(),
            virtiofsd: virtiofsd::DEFAULT_BINARY.into(),
        });
        let err = backend.prepare(&p.spec).await.unwrap_err().to_string();
        assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
        let mut backend = Qemu::new(QemuOptions {
            binary: "/bin/true".into(),
            vmm_binary: dir.path().join("no-vmm"),
            accel: "auto".into(),
            virtiofsd: virtiofsd::DEFAULT_BINARY.into(),
        });
        let err = backend.prepare(&p.spec).await.unwrap_err().to_string();
        assert!(err.contains("kestrel-vmm"), "{err}");
    }
}
