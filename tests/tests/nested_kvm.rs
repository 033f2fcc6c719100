//! `scripts/nested-kvm.sh`: an L1 VM under QEMU TCG with real (nested) KVM,
//! in which our builtin VMM runs a container end to end: the one place on
//! these machines where kestrel-vmm boots the guest's user space.

use std::path::Path;
use std::process::{Command, Stdio};

use kestrel_tests::{binary, busybox_rootfs, qemu_ready};

#[test]
fn the_builtin_vmm_runs_a_container_inside_the_nested_kvm_harness() {
    let test = "the_builtin_vmm_runs_a_container_inside_the_nested_kvm_harness";
    let Some(image) = qemu_ready(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(dir.path());
    let config = dir.path().join("kestrel.toml");
    std::fs::write(
        &config,
        format!(
            "[sandbox]\nhypervisor = \"builtin\"\nstate_dir = \"{}\"\n[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
            dir.path().join("sandboxes").display(),
            image.vmlinux.display(),
            image.initrd.display()
        ),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nested-kvm.sh");
    let inner = format!(
        "KESTREL_CONFIG={} KESTREL_CLI_ROOT={} {} run --rm --rootfs {} t1 -- sh -c 'echo hello from L2; busybox uname -r; exit 3'",
        config.display(),
        dir.path().join("cli").display(),
        binary("kestrel").display(),
        rootfs.display()
    );
    let out = Command::new(script)
        .args(["--", "sh", "-c", &inner])
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/nested-kvm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("hello from L2"), "{stdout}\n{stderr}");
    // The guest image's kernel, not L1's Debian kernel.
    assert!(
        stdout.contains("6.1.1") && !stdout.contains("6.1.0-"),
        "{stdout}"
    );
}
