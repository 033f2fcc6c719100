//! VM sandboxes end to end: containerd runs every container in a VM booted
//! from our guest image, on each VM backend:
//! - QEMU (TCG here), its vsock served by our own vhost-user backend
//!   (`kestrel-vmm vhost-user-vsock`);
//! - our builtin VMM, `kestrel-vmm`, which needs KVM that runs guest user
//!   space: where this host's cannot, each builtin test runs itself again
//!   inside `scripts/nested-kvm.sh`'s L1 VM.

use std::time::{Duration, Instant};

use kestrel_tests::containerd::{available, text, Containerd, Events};
use kestrel_tests::{
    busybox_rootfs, guest_image, kvm_runs_guests_here, qemu_ready, require, GuestImage,
    SLOW_BOOT_AGENT_SECTION,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Vmm {
    Qemu,
    Builtin,
}

impl Vmm {
    /// The `[sandbox] hypervisor` value.
    fn backend(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::Builtin => "builtin",
        }
    }

    /// The name the shim's log gives the VMM process.
    fn process(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::Builtin => "kestrel-vmm",
        }
    }

    /// Whether `cmd` (a /proc cmdline) is one of this backend's VMMs.
    fn is_vmm(self, cmd: &str) -> bool {
        let program = cmd.split_whitespace().next().unwrap_or("");
        let name = program.rsplit('/').next().unwrap_or("");
        match self {
            Vmm::Qemu => name.starts_with("qemu-system"),
            // Not the vhost-user backends QEMU sandboxes run.
            Vmm::Builtin => name == "kestrel-vmm" && !cmd.contains("vhost-user-vsock"),
        }
    }
}

/// Everything a sandbox on `vmm` needs, or `None` with the reason recorded
/// (or, for the builtin VMM on a host whose KVM cannot run guests, after
/// the test ran in the nested-KVM harness).
fn ready(test: &str, vmm: Vmm) -> Option<GuestImage> {
    if vmm == Vmm::Builtin && !kvm_runs_guests_here(test) {
        return None;
    }
    if !available(test) {
        return None;
    }
    match vmm {
        Vmm::Qemu => qemu_ready(test),
        Vmm::Builtin if require(test) => guest_image(test),
        Vmm::Builtin => None,
    }
}

fn start(image: &GuestImage, vmm: Vmm) -> Containerd {
    let accel = match vmm {
        Vmm::Qemu => "accel = \"auto\"\n",
        Vmm::Builtin => "",
    };
    Containerd::start_configured(
        &format!("hypervisor = \"{}\"", vmm.backend()),
        &format!(
            "{SLOW_BOOT_AGENT_SECTION}[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\n{accel}",
            image.vmlinux.display(),
            image.initrd.display()
        ),
    )
}

/// The pids of the VMM processes of this containerd's sandboxes.
fn vmms(c: &Containerd, vmm: Vmm) -> Vec<u32> {
    c.leftover_processes()
        .into_iter()
        .filter(|(_, cmd)| vmm.is_vmm(cmd))
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn ctr_runs_containers_inside_a_qemu_vm_with_our_kernel() {
    ctr_runs_containers_in_a_vm_with_our_kernel(
        "ctr_runs_containers_inside_a_qemu_vm_with_our_kernel",
        Vmm::Qemu,
    );
}

#[test]
fn ctr_runs_containers_inside_the_builtin_vmm_with_our_kernel() {
    ctr_runs_containers_in_a_vm_with_our_kernel(
        "ctr_runs_containers_inside_the_builtin_vmm_with_our_kernel",
        Vmm::Builtin,
    );
}

fn ctr_runs_containers_in_a_vm_with_our_kernel(test: &str, vmm: Vmm) {
    let Some(image) = ready(test, vmm) else {
        return;
    };
    let c = start(&image, vmm);
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
    assert_eq!(vmms(&c, vmm).len(), 1, "one VM for the container");
    let exec = c.exec("svc", "e1", &["sh", "-c", "echo from exec; exit 5"]);
    assert_eq!(text(&exec.stdout), "from exec\n", "{}", text(&exec.stderr));
    assert_eq!(exec.status.code(), Some(5));
    c.kill_and_delete("svc");
    c.assert_nothing_left();
}

#[test]
fn force_deletes_of_vm_containers_under_150_task_ls_loops_never_lose_one() {
    force_deletes_under_150_task_ls_loops(
        "force_deletes_of_vm_containers_under_150_task_ls_loops_never_lose_one",
        Vmm::Qemu,
    );
}

#[test]
fn force_deletes_of_builtin_vmm_containers_under_150_task_ls_loops_never_lose_one() {
    force_deletes_under_150_task_ls_loops(
        "force_deletes_of_builtin_vmm_containers_under_150_task_ls_loops_never_lose_one",
        Vmm::Builtin,
    );
}

fn force_deletes_under_150_task_ls_loops(test: &str, vmm: Vmm) {
    let _alone = kestrel_tests::one_load_scenario_at_a_time();
    let Some(image) = ready(test, vmm) else {
        return;
    };
    let c = start(&image, vmm);
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for id in &ids {
        c.run_detached(rootfs, id, &["sleep", "1000"]);
    }
    assert_eq!(vmms(&c, vmm).len(), 6, "one VM per container");
    c.force_delete_under_task_ls_load(&ids);
    // The shim's log (in containerd's) says how each VMM ended and names
    // every signal it sent: a SIGKILL that lands while the VMM is already
    // exiting leaves its exit status 0, so the status alone cannot prove
    // there was none. After DestroySandbox the guest ends itself, and its
    // VMM with it.
    let log = c.log_text();
    let process = vmm.process();
    let signalled: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&format!("killing {process}"))
                || l.contains(&format!("stopping {process} with"))
        })
        .collect();
    assert_eq!(signalled, Vec::<&str>::new(), "{process} was signalled");
    for id in &ids {
        let sandbox = format!("sandbox_id=\\\"{id}\\\"");
        let ended: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("msg=\"{process} ended ")) && l.contains(&sandbox))
            .collect();
        assert!(
            ended.len() == 1 && ended[0].contains("exit=exited with status 0"),
            "{id}'s {process} ended by itself, with status 0: {ended:#?}"
        );
    }
}

#[test]
fn killing_qemu_stops_its_containers_with_255_and_the_shim_keeps_answering() {
    killing_the_vmm_stops_its_containers(
        "killing_qemu_stops_its_containers_with_255_and_the_shim_keeps_answering",
        Vmm::Qemu,
        Victim::Vmm,
    );
}

#[test]
fn killing_kestrel_vmm_stops_its_containers_with_255_and_the_shim_keeps_answering() {
    killing_the_vmm_stops_its_containers(
        "killing_kestrel_vmm_stops_its_containers_with_255_and_the_shim_keeps_answering",
        Vmm::Builtin,
        Victim::Vmm,
    );
}

/// The guest's filesystem server dying is the guest's death: its rootfs is
/// gone.
#[test]
fn killing_virtiofsd_stops_a_qemu_vms_containers_with_255() {
    killing_the_vmm_stops_its_containers(
        "killing_virtiofsd_stops_a_qemu_vms_containers_with_255",
        Vmm::Qemu,
        Victim::Virtiofsd,
    );
}

#[test]
fn killing_virtiofsd_stops_a_kestrel_vmm_vms_containers_with_255() {
    killing_the_vmm_stops_its_containers(
        "killing_virtiofsd_stops_a_kestrel_vmm_vms_containers_with_255",
        Vmm::Builtin,
        Victim::Virtiofsd,
    );
}

/// Which of a sandbox's processes a test kills.
#[derive(Clone, Copy)]
enum Victim {
    Vmm,
    Virtiofsd,
}

fn killing_the_vmm_stops_its_containers(test: &str, vmm: Vmm, victim: Victim) {
    let Some(image) = ready(test, vmm) else {
        return;
    };
    let c = start(&image, vmm);
    let rootfs = busybox_rootfs(c.path());
    c.run_detached(rootfs.to_str().unwrap(), "victim", &["sleep", "1000"]);
    let events = Events::subscribe(&c);
    let targets: Vec<u32> = match victim {
        Victim::Vmm => vmms(&c, vmm),
        Victim::Virtiofsd => c
            .leftover_processes()
            .into_iter()
            // The program itself, not QEMU naming its socket.
            .filter(|(_, cmd)| {
                cmd.split_whitespace()
                    .next()
                    .is_some_and(|program| program.ends_with("virtiofsd"))
            })
            .map(|(pid, _)| pid)
            .collect(),
    };
    assert_eq!(targets.len(), 1, "one process to kill");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(targets[0] as i32),
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
    let published = events.wait_for(Duration::from_secs(10), |l| {
        l.contains("/tasks/exit") && l.contains("\"victim\"") && l.contains("\"exit_status\":255")
    });
    assert!(
        published.is_ok(),
        "TaskExit with status 255 published: {published:?}"
    );
    let out = c.ctr(&["container", "delete", "victim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}
