//! Rootfs and volumes shared with a QEMU VM over virtio-fs, not copied:
//! containerd runs each container in a VM from our guest image, and the
//! shim bind-mounts the container's rootfs and volumes into the sandbox's
//! shared directory, which the guest mounts (`[sandbox] shared_fs`, whose
//! default is `virtio-fs`). With `shared_fs = "none"` they are copied in.

use std::path::Path;
use std::time::Duration;

use kestrel_tests::containerd::{available, run_argv, text, Containerd};
use kestrel_tests::{
    busybox_rootfs, mounts_under, on_path, qemu_ready, skip, SLOW_BOOT_AGENT_SECTION,
};

/// Containerd whose sandboxes are QEMU VMs, with `sandbox_keys` added to
/// `[sandbox]`; `None`, with the reason recorded, where one cannot run.
fn start(test: &str, sandbox_keys: &str) -> Option<Containerd> {
    if !available(test) {
        return None;
    }
    if !on_path("virtiofsd") {
        skip(test, "needs virtiofsd (scripts/install-virtiofsd.sh)");
        return None;
    }
    let image = qemu_ready(test)?;
    Some(Containerd::start_configured(
        &format!("hypervisor = \"qemu\"\n{sandbox_keys}"),
        &format!(
            "{SLOW_BOOT_AGENT_SECTION}[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\naccel = \"auto\"\n",
            image.vmlinux.display(),
            image.initrd.display()
        ),
    ))
}

/// `ctr run -d` of `sleep 1000` with `mounts` (`--mount` values).
fn run_with_mounts(c: &Containerd, rootfs: &Path, id: &str, mounts: &[String]) {
    let rootfs = rootfs.to_str().unwrap();
    let mut argv = run_argv(true, rootfs, id, &["sleep", "1000"]);
    let at = argv.iter().position(|a| *a == "--rootfs").unwrap();
    for mount in mounts.iter().rev() {
        argv.splice(at..at, ["--mount", mount.as_str()]);
    }
    let out = c.ctr(&argv);
    assert!(
        out.status.success(),
        "ctr run {id}: {}\n{}",
        text(&out.stderr),
        c.log_text()
    );
}

/// `sh -c script` in container `id`: (stdout, stderr).
fn sh(c: &Containerd, id: &str, exec_id: &str, script: &str) -> (String, String) {
    let out = c.exec(id, exec_id, &["sh", "-c", script]);
    (text(&out.stdout), text(&out.stderr))
}

/// The file system type of `point` in a /proc/mounts listing (the last
/// mount on it).
fn fs_type<'a>(mounts: &'a str, point: &str) -> Option<&'a str> {
    mounts.lines().rev().find_map(|l| {
        let mut fields = l.split_whitespace();
        let (_, at, ty) = (fields.next()?, fields.next()?, fields.next()?);
        (at == point).then_some(ty)
    })
}

#[test]
fn rootfs_and_volumes_reach_a_qemu_vm_over_virtio_fs_both_ways_at_once_and_leave_nothing() {
    let test =
        "rootfs_and_volumes_reach_a_qemu_vm_over_virtio_fs_both_ways_at_once_and_leave_nothing";
    let Some(c) = start(test, "") else {
        return;
    };
    let rootfs = busybox_rootfs(c.path());
    let volume = c.path().join("volume");
    let read_only = c.path().join("read-only");
    for dir in [&volume, &read_only] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("before"), b"host data\n").unwrap();
    }
    run_with_mounts(
        &c,
        &rootfs,
        "vfs-1",
        &[
            format!(
                "type=bind,src={},dst=/data,options=rbind:rw",
                volume.display()
            ),
            format!(
                "type=bind,src={},dst=/ro,options=rbind:ro",
                read_only.display()
            ),
        ],
    );

    let (mounts, err) = sh(&c, "vfs-1", "m", "cat /proc/mounts");
    assert_eq!(fs_type(&mounts, "/"), Some("virtiofs"), "{mounts}{err}");
    assert_eq!(fs_type(&mounts, "/data"), Some("virtiofs"), "{mounts}");
    let log = c.log_text();
    assert!(
        !log.contains("rootfs copied"),
        "the rootfs was copied:\n{log}"
    );

    // Written in the guest: on the host as soon as the write returned.
    let (out, err) = sh(
        &c,
        "vfs-1",
        "w",
        "echo from guest > /data/guest; cat /data/before",
    );
    assert_eq!(out, "host data\n", "{err}");
    assert_eq!(
        std::fs::read(volume.join("guest")).unwrap(),
        b"from guest\n"
    );
    // Written on the host: in the guest at its next open.
    std::fs::write(volume.join("host"), b"from host\n").unwrap();
    let (out, err) = sh(&c, "vfs-1", "r", "cat /data/host");
    assert_eq!(out, "from host\n", "{err}");

    let (out, err) = sh(&c, "vfs-1", "ro", "echo x > /ro/before; echo status=$?");
    assert_eq!(out, "status=1\n", "{err}");
    assert!(err.contains("Read-only file system"), "{err}");

    let sandboxes = c.path().join("sandboxes");
    assert!(
        !mounts_under(&sandboxes).is_empty(),
        "nothing mounted in the sandbox's shared directory"
    );
    c.kill_and_delete("vfs-1");
    assert_eq!(
        mounts_under(&sandboxes),
        Vec::<String>::new(),
        "mounts left"
    );
    c.assert_nothing_left();
    for dir in [&volume, &read_only] {
        assert_eq!(std::fs::read(dir.join("before")).unwrap(), b"host data\n");
    }
    assert_eq!(
        std::fs::read(volume.join("guest")).unwrap(),
        b"from guest\n"
    );
    assert!(
        rootfs.join("bin/busybox").is_file(),
        "the rootfs was touched"
    );
}

#[test]
fn with_shared_fs_none_the_rootfs_is_copied_into_a_qemu_vm() {
    let test = "with_shared_fs_none_the_rootfs_is_copied_into_a_qemu_vm";
    let Some(c) = start(test, "shared_fs = \"none\"\n") else {
        return;
    };
    let rootfs = busybox_rootfs(c.path());
    let volume = c.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("before"), b"host data\n").unwrap();
    run_with_mounts(
        &c,
        &rootfs,
        "vfs-copy",
        &[format!(
            "type=bind,src={},dst=/data,options=rbind:rw",
            volume.display()
        )],
    );
    let (mounts, err) = sh(&c, "vfs-copy", "m", "cat /proc/mounts; cat /data/before");
    assert!(mounts.ends_with("host data\n"), "{mounts}{err}");
    assert_ne!(fs_type(&mounts, "/"), Some("virtiofs"), "{mounts}");
    assert!(!mounts.contains("virtiofs"), "{mounts}");
    assert!(c.log_text().contains("rootfs copied into the VM"));
    // A copy: the guest's writes stay in the guest.
    sh(&c, "vfs-copy", "w", "echo from guest > /data/guest");
    assert!(!volume.join("guest").exists());
    c.kill_and_delete("vfs-copy");
    c.assert_nothing_left();
}

/// The shim dies with a container's binds in place; containerd's
/// `delete` must unmount them before it removes the sandbox's state
/// directory, or the removal would delete the volume's and rootfs's files.
#[test]
fn delete_after_a_killed_shim_unmounts_the_shared_binds_before_removing_anything() {
    let test = "delete_after_a_killed_shim_unmounts_the_shared_binds_before_removing_anything";
    let Some(c) = start(test, "") else {
        return;
    };
    let rootfs = busybox_rootfs(c.path());
    let volume = c.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("precious"), b"keep me\n").unwrap();
    run_with_mounts(
        &c,
        &rootfs,
        "vfs-orphan",
        &[format!(
            "type=bind,src={},dst=/data,options=rbind:rw",
            volume.display()
        )],
    );
    c.kill_the_shim_and_await_task_gone("vfs-orphan", Duration::from_secs(60));
    let out = c.ctr(&["container", "delete", "vfs-orphan"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(volume.join("precious")).unwrap(),
        b"keep me\n"
    );
    assert!(
        rootfs.join("bin/busybox").is_file(),
        "the rootfs was deleted"
    );
    c.assert_nothing_left();
}

/// A rootfs with a 200 MiB file starts in a 256 MiB VM, and the guest's
/// memory does not hold it: copied in, it would land in the guest's tmpfs
/// (Shmem) and leave no room; shared, it stays on the host.
#[test]
fn a_200_mib_image_starts_without_its_size_in_guest_memory() {
    let test = "a_200_mib_image_starts_without_its_size_in_guest_memory";
    let Some(c) = start(test, "") else {
        return;
    };
    let rootfs = busybox_rootfs(c.path());
    let chunk = kestrel_tests::pseudo_random(1 << 20);
    let mut big = std::fs::File::create(rootfs.join("image-data")).expect("image file");
    for _ in 0..200 {
        std::io::Write::write_all(&mut big, &chunk).expect("writing the image file");
    }
    drop(big);
    run_with_mounts(&c, &rootfs, "vfs-big", &[]);
    let (out, err) = sh(
        &c,
        "vfs-big",
        "mem",
        "wc -c < /image-data; grep -E '^(MemTotal|Shmem):' /proc/meminfo",
    );
    let mut lines = out.lines();
    assert_eq!(lines.next().map(str::trim), Some("209715200"), "{out}{err}");
    let kib = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {out}"))
    };
    assert!(kib("MemTotal:") < 256 * 1024, "{out}");
    assert!(
        kib("Shmem:") < 64 * 1024,
        "the image is in guest memory: {out}"
    );
    c.kill_and_delete("vfs-big");
    c.assert_nothing_left();
}
