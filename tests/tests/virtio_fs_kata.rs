//! Our agent driven the way a Kata runtime drives it over virtio-fs, by a
//! client that shares nothing with our protos (`kestrel_tests::kata_wire`:
//! messages encoded by name from Kata's field table): CreateSandbox with
//! the `kataShared` virtio-fs storage at Kata's mount point, then a
//! container whose rootfs is in Kata's layout,
//! `/run/kata-containers/shared/containers/<cid>/rootfs`, in a QEMU guest
//! (and a kestrel-vmm guest) whose virtio-fs device virtiofsd serves from
//! a host directory. The
//! container reads a file the host wrote there and writes one the host
//! then reads: the rootfs is shared, not copied.

use std::path::Path;
use std::time::Duration;

use kestrel_host::agent_client::{dial, DialPolicy};
use kestrel_host::dial::Address;
use kestrel_hypervisor::backend::builtin::Builtin;
use kestrel_hypervisor::backend::qemu::{Qemu, QemuOptions};
use kestrel_hypervisor::backend::virtiofsd::DEFAULT_BINARY;
use kestrel_hypervisor::{FsCache, Hypervisor, SandboxSpec, SharedFs, VmShape, VmSpec};
use kestrel_tests::kata_wire::{call, read_int, Msg};
use kestrel_tests::{
    binary, busybox_rootfs, guest_image, kvm_runs_guests_here, mounts_under, on_path, qemu_ready,
    skip,
};

const KATA_SHARED: &str = "/run/kata-containers/shared/containers/";
const CID: &str = "kata-raw-c1";

fn storage() -> Msg {
    Msg::new("grpc.Storage")
        .str("driver", "virtio-fs")
        .str("source", "kataShared")
        .str("fstype", "virtiofs")
        .str("mount_point", KATA_SHARED)
}

fn spec(args: &[&str]) -> Msg {
    let process = Msg::new("grpc.Process")
        .msg("User", Msg::new("grpc.User").int("UID", 0).int("GID", 0))
        .strs("Args", args)
        .strs("Env", &["PATH=/bin"])
        .str("Cwd", "/");
    let linux = ["mount", "pid", "uts", "ipc"]
        .iter()
        .fold(Msg::new("grpc.Linux"), |linux, ty| {
            linux.msg(
                "Namespaces",
                Msg::new("grpc.LinuxNamespace").str("Type", ty),
            )
        });
    Msg::new("grpc.Spec")
        .str("Version", "1.0.2")
        .msg("Process", process)
        .msg(
            "Root",
            Msg::new("grpc.Root").str("Path", &format!("{KATA_SHARED}{CID}/rootfs")),
        )
        .str("Hostname", "kata-raw")
        .msg(
            "Mounts",
            Msg::new("grpc.Mount")
                .str("destination", "/proc")
                .str("source", "proc")
                .str("type", "proc"),
        )
        .msg("Linux", linux)
}

#[test]
fn a_kata_runtimes_virtio_fs_sandbox_and_kata_layout_container_run_shared_on_qemu() {
    let test = "a_kata_runtimes_virtio_fs_sandbox_and_kata_layout_container_run_shared_on_qemu";
    let Some(image) = qemu_ready(test) else {
        return;
    };
    let qemu = Qemu::new(QemuOptions {
        binary: "qemu-system-x86_64".into(),
        vmm_binary: binary("kestrel-vmm"),
        accel: "auto".into(),
        virtiofsd: DEFAULT_BINARY.into(),
    });
    kata_sandbox_runs_shared(test, Box::new(qemu), image.bzimage.clone(), &image);
}

/// The same on kestrel-vmm's vhost-user-fs device (in the nested-KVM
/// harness's L1 here).
#[test]
fn a_kata_runtimes_virtio_fs_sandbox_and_kata_layout_container_run_shared_on_builtin() {
    let test = "a_kata_runtimes_virtio_fs_sandbox_and_kata_layout_container_run_shared_on_builtin";
    if !kvm_runs_guests_here(test) {
        return;
    }
    let Some(image) = guest_image(test) else {
        return;
    };
    let builtin = Builtin::new(binary("kestrel-vmm")).with_virtiofsd(DEFAULT_BINARY.into());
    kata_sandbox_runs_shared(test, Box::new(builtin), image.vmlinux.clone(), &image);
}

fn kata_sandbox_runs_shared(
    test: &str,
    mut vmm: Box<dyn Hypervisor>,
    kernel: std::path::PathBuf,
    image: &kestrel_tests::GuestImage,
) {
    if !on_path(DEFAULT_BINARY) {
        skip(test, "needs virtiofsd (scripts/install-virtiofsd.sh)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    let rootfs = busybox_rootfs(&shared.join(CID));
    std::fs::write(rootfs.join("written-on-host"), "from-the-host\n").expect("host file");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let spec_vm = SandboxSpec {
        id: "kata-raw".into(),
        state_dir: dir.path().join("state"),
        agent_path: "/unused".into(),
        agent_log_level: "info".into(),
        vm: Some(VmSpec {
            kernel,
            initrd: image.initrd.clone(),
            shape: VmShape::default(),
            kernel_params: String::new(),
        }),
        netns: None,
        nics: Vec::new(),
        shared_fs: Some(SharedFs {
            dir: shared.clone(),
            tag: "kataShared".into(),
            cache: FsCache::Never,
        }),
    };
    let status = runtime.block_on(async {
        vmm.prepare(&spec_vm).await.expect("prepare");
        vmm.start().await.expect("start");
        let address: Address = vmm.agent_address().expect("address").parse().expect("parse");
        let client = dial(
            &address,
            DialPolicy {
                deadline: Duration::from_secs(60),
                first_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(500),
                attempt_timeout: Duration::from_secs(5),
            },
        )
        .await
        .expect("dialling the agent");
        let sandbox = Msg::new("grpc.CreateSandboxRequest")
            .str("hostname", "kata-raw")
            .msg("storages", storage())
            .str("sandbox_id", "kata-raw");
        call(&client, "CreateSandbox", sandbox.into_bytes())
            .await
            .expect("CreateSandbox with the kataShared virtio-fs storage");
        let container = Msg::new("grpc.CreateContainerRequest")
            .str("container_id", CID)
            .str("exec_id", CID)
            .msg(
                "OCI",
                spec(&[
                    "sh",
                    "-c",
                    "grep -q from-the-host /written-on-host && echo from-the-guest > /written-in-guest",
                ]),
            );
        call(&client, "CreateContainer", container.into_bytes())
            .await
            .expect("CreateContainer in Kata's layout");
        let start = Msg::new("grpc.StartContainerRequest").str("container_id", CID);
        call(&client, "StartContainer", start.into_bytes())
            .await
            .expect("StartContainer");
        let wait = Msg::new("grpc.WaitProcessRequest")
            .str("container_id", CID)
            .str("exec_id", CID);
        let answer = call(&client, "WaitProcess", wait.into_bytes())
            .await
            .expect("WaitProcess");
        let status = read_int("grpc.WaitProcessResponse", "status", &answer);
        let _ = call(
            &client,
            "DestroySandbox",
            Msg::new("grpc.DestroySandboxRequest").into_bytes(),
        )
        .await;
        vmm.stop(Duration::from_secs(5)).await.expect("stop");
        status
    });
    assert_eq!(status, 0, "the container's exit status");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("written-in-guest")).expect("the guest's file"),
        "from-the-guest\n"
    );
    assert_eq!(mounts_under(dir.path()), Vec::<String>::new());
    assert!(!Path::new(&dir.path().join("state")).exists());
}
