//! VM sandboxes end to end: containerd runs every container in a QEMU VM
//! (TCG here) booted from our guest image, its vsock served by our own
//! vhost-user backend (`kestrel-vmm vhost-user-vsock`).

use std::time::{Duration, Instant};

use kestrel_tests::containerd::{available, text, Containerd};
use kestrel_tests::{busybox_rootfs, qemu_ready, GuestImage};

/// Everything a QEMU sandbox needs, or `None` with the reason printed.
fn ready(test: &str) -> Option<GuestImage> {
    if !available(test) {
        return None;
    }
    qemu_ready(test)
}

fn start(image: &GuestImage) -> Containerd {
    Containerd::start_configured(
        "hypervisor = \"qemu\"",
        &format!(
            "[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\naccel = \"auto\"\n",
            image.vmlinux.display(),
            image.initrd.display()
        ),
    )
}

/// The pids of the QEMU processes of this containerd's sandboxes.
fn qemus(c: &Containerd) -> Vec<u32> {
    c.leftover_processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.starts_with("qemu-system") || cmd.contains("/qemu-system"))
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn ctr_runs_containers_inside_a_qemu_vm_with_our_kernel() {
    let test = "ctr_runs_containers_inside_a_qemu_vm_with_our_kernel";
    let Some(image) = ready(test) else { return };
    let c = start(&image);
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();

    let (out, status) = c.run(rootfs, "hello", &["sh", "-c", "echo hi; exit 3"]);
    assert_eq!((out.as_str(), status), ("hi\n", 3), "{}", c.log_text());
    c.ctr(&["container", "delete", "hello"]);

    let (release, status) = c.run(rootfs, "uname", &["busybox", "uname", "-r"]);
    assert_eq!(status, 0, "{}", c.log_text());
    let host = nix::sys::utsname::uname().unwrap();
    assert_ne!(
        release.trim(),
        host.release().to_string_lossy(),
        "ran on the host kernel"
    );
    assert!(
        release.starts_with("6.1."),
        "the guest kernel is ours: {release}"
    );
    c.ctr(&["container", "delete", "uname"]);

    c.run_detached(rootfs, "svc", &["sleep", "1000"]);
    assert_eq!(qemus(&c).len(), 1, "one VM for the container");
    let exec = c.exec("svc", "e1", &["sh", "-c", "echo from exec; exit 5"]);
    assert_eq!(text(&exec.stdout), "from exec\n", "{}", text(&exec.stderr));
    assert_eq!(exec.status.code(), Some(5));
    c.kill_and_delete("svc");
    c.assert_nothing_left();
}

#[test]
fn force_deletes_of_vm_containers_under_150_task_ls_loops_never_lose_one() {
    let test = "force_deletes_of_vm_containers_under_150_task_ls_loops_never_lose_one";
    let Some(image) = ready(test) else { return };
    let c = start(&image);
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for id in &ids {
        c.run_detached(rootfs, id, &["sleep", "1000"]);
    }
    assert_eq!(qemus(&c).len(), 6, "one VM per container");
    c.force_delete_under_task_ls_load(&ids);
    // The shim's log (in containerd's) says how each QEMU ended and names
    // every kill: a SIGKILL that lands while QEMU is already exiting leaves
    // its exit status 0, so the status alone cannot prove there was none.
    let log = c.log_text();
    let kills: Vec<&str> = log.lines().filter(|l| l.contains("killing qemu")).collect();
    assert_eq!(kills, Vec::<&str>::new(), "QEMU was killed");
    for id in &ids {
        let sandbox = format!("sandbox_id=\\\"{id}\\\"");
        let ended: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("msg=\"qemu ended ") && l.contains(&sandbox))
            .collect();
        assert!(
            ended.len() == 1 && ended[0].contains("exit=exited with status 0"),
            "{id}'s QEMU ended by itself, with status 0: {ended:#?}"
        );
    }
}

#[test]
fn killing_qemu_stops_its_containers_with_255_and_the_shim_keeps_answering() {
    let test = "killing_qemu_stops_its_containers_with_255_and_the_shim_keeps_answering";
    let Some(image) = ready(test) else { return };
    let c = start(&image);
    let rootfs = busybox_rootfs(c.path());
    c.run_detached(rootfs.to_str().unwrap(), "victim", &["sleep", "1000"]);
    let events = c
        .ctr_command(&["events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ctr events");
    // Let it subscribe before anything happens.
    std::thread::sleep(Duration::from_millis(500));
    let vms = qemus(&c);
    assert_eq!(vms.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vms[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    loop {
        let ls = text(&c.ctr(&["task", "ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.starts_with("victim") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "still not STOPPED 2 s after the kill:\n{ls}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let delete = c.ctr(&["task", "delete", "victim"]);
    assert!(delete.status.success(), "{}", text(&delete.stderr));
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(events.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let seen = events.wait_with_output().expect("ctr events output");
    let seen = text(&seen.stdout);
    assert!(
        seen.lines().any(|l| l.contains("/tasks/exit")
            && l.contains("\"victim\"")
            && l.contains("\"exit_status\":255")),
        "TaskExit with status 255 published: {seen}"
    );
    let out = c.ctr(&["container", "delete", "victim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}
