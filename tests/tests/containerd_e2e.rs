//! containerd end to end: Debian's containerd, started by the test on a
//! private socket, runs busybox containers with `ctr` on
//! `io.containerd.kestrel.v2` (process sandboxes).

use std::process::Stdio;
use std::time::{Duration, Instant};

use kestrel_tests::containerd::{available, run_argv, text, Containerd};
use kestrel_tests::{busybox_rootfs, require};

fn ready(test: &str) -> bool {
    require(test) && available(test)
}

#[test]
fn ctr_runs_a_busybox_container_with_output_exit_code_exec_kill_and_delete() {
    if !ready("ctr_runs_a_busybox_container_with_output_exit_code_exec_kill_and_delete") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();

    let (out, status) = c.run(
        rootfs,
        "hello",
        &["sh", "-c", "echo hello from kestrel; exit 3"],
    );
    assert_eq!(
        (out.as_str(), status),
        ("hello from kestrel\n", 3),
        "{}",
        c.log_text()
    );
    // A foreground `ctr run` deletes its task itself; the container stays.
    let out = c.ctr(&["container", "delete", "hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // stdin reaches the container and ends when ctr closes its FIFO.
    let mut cat = c
        .ctr_command(&run_argv(false, rootfs, "cat", &["cat"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run cat");
    {
        use std::io::Write;
        let mut stdin = cat.stdin.take().unwrap();
        stdin
            .write_all(b"through the FIFO\nand the agent\n")
            .unwrap();
    }
    let out = cat.wait_with_output().unwrap();
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        ("through the FIFO\nand the agent\n", Some(0)),
        "{}",
        text(&out.stderr)
    );
    assert!(c.ctr(&["container", "delete", "cat"]).status.success());

    c.run_detached(rootfs, "svc", &["sleep", "1000"]);
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("svc") && l.contains("RUNNING")),
        "{ls}"
    );
    let exec = c.exec("svc", "e1", &["sh", "-c", "echo in exec; exit 5"]);
    assert_eq!(
        (text(&exec.stdout).as_str(), exec.status.code()),
        ("in exec\n", Some(5)),
        "{}",
        text(&exec.stderr)
    );
    c.kill_and_delete("svc");
    c.assert_nothing_left();
}

#[test]
fn force_deletes_under_150_task_ls_loops_never_lose_a_container() {
    if !ready("force_deletes_under_150_task_ls_loops_never_lose_a_container") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for id in &ids {
        c.run_detached(rootfs, id, &["sleep", "1000"]);
    }
    c.force_delete_under_task_ls_load(&ids);
}

#[test]
fn a_killed_shim_is_cleaned_up_by_the_delete_action() {
    if !ready("a_killed_shim_is_cleaned_up_by_the_delete_action") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    c.run_detached(rootfs.to_str().unwrap(), "orphan", &["sleep", "1000"]);
    let address = c.address.display().to_string();
    let shims: Vec<u32> = c
        .leftover_processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-kestrel-v2") && cmd.contains(&address))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), 1, "{:?}", c.leftover_processes());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd notices the lost shim, runs `containerd-shim-kestrel-v2
    // delete` (which kills the sandbox) and drops the task.
    let deadline = Instant::now() + Duration::from_secs(30);
    while text(&c.ctr(&["task", "ls", "-q"]).stdout).contains("orphan") {
        assert!(
            Instant::now() < deadline,
            "containerd kept the task of a dead shim:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = c.ctr(&["container", "delete", "orphan"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}

#[test]
fn deleting_one_container_of_a_pod_leaves_the_others_running() {
    if !ready("deleting_one_container_of_a_pod_leaves_the_others_running") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    for id in ["pod1", "app"] {
        let mut argv = vec![
            "run",
            "-d",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod1",
        ];
        argv.extend(&run_argv(false, rootfs, id, &["sleep", "1000"])[1..]);
        let out = c.ctr(&argv);
        assert!(out.status.success(), "ctr run {id}: {}", text(&out.stderr));
    }
    let agents = |c: &Containerd| {
        c.leftover_processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("kestrel-agent"))
            .count()
    };
    assert_eq!(agents(&c), 1, "one sandbox for the pod");
    c.kill_and_delete("app");
    // containerd runs the shim's `delete` after each task delete: the pod's
    // sandbox must survive it.
    std::thread::sleep(Duration::from_secs(1));
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("pod1") && l.contains("RUNNING")),
        "{ls}"
    );
    let exec = c.exec("pod1", "still", &["sh", "-c", "echo alive"]);
    assert_eq!(text(&exec.stdout), "alive\n", "{}", text(&exec.stderr));
    c.kill_and_delete("pod1");
    c.assert_nothing_left();
}

/// The probe that found it: a sandbox-id annotation naming a host directory
/// made containerd's clean-up `delete` remove that directory.
#[test]
fn a_sandbox_id_annotation_that_is_a_path_is_refused_and_removes_nothing() {
    let test = "a_sandbox_id_annotation_that_is_a_path_is_refused_and_removes_nothing";
    if !ready(test) {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let victim = c.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("precious"), b"keep me").unwrap();
    for (id, sandbox) in [
        ("abs", victim.display().to_string()),
        ("rel", "../victim".to_string()),
    ] {
        let annotation = format!("io.kubernetes.cri.sandbox-id={sandbox}");
        let mut argv = run_argv(false, rootfs.to_str().unwrap(), id, &["true"]);
        argv.splice(1..1, ["--annotation", annotation.as_str()]);
        let out = c.ctr(&argv);
        assert!(!out.status.success(), "ctr run with {annotation} succeeded");
        assert!(
            text(&out.stderr).contains("io.kubernetes.cri.sandbox-id"),
            "the error does not name the annotation: {}",
            text(&out.stderr)
        );
        assert_eq!(
            std::fs::read(victim.join("precious")).ok().as_deref(),
            Some(&b"keep me"[..]),
            "ctr run with {annotation} removed the victim\n{}",
            c.log_text()
        );
        let _ = c.ctr(&["container", "delete", id]);
    }
}

/// `ctr run --seccomp` (containerd's default profile), `--cap-drop` and
/// `--read-only` reach the agent through the shim and are enforced there.
#[test]
fn ctr_seccomp_cap_drop_and_read_only_are_enforced() {
    if !ready("ctr_seccomp_cap_drop_and_read_only_are_enforced") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let run = |flags: &[&str], id: &str, script: &str| {
        let mut argv = run_argv(false, rootfs, id, &["sh", "-c", script]);
        // ctr's flags go before the rootfs argument run_argv ends with.
        let at = argv.iter().position(|a| *a == "--rootfs").unwrap();
        argv.splice(at..at, flags.iter().copied());
        let out = c.ctr(&argv);
        assert!(c.ctr(&["container", "delete", id]).status.success());
        out
    };

    let out = run(
        &["--seccomp"],
        "seccomp",
        "echo hello; busybox unshare -U true; echo unshare=$?",
    );
    assert_eq!(
        text(&out.stdout),
        "hello\nunshare=1\n",
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );

    let chown = "echo > /tmp/owned && busybox chown 1:1 /tmp/owned; echo chown=$?";
    let out = run(&["--cap-drop", "CAP_CHOWN"], "nochown", chown);
    assert_eq!(text(&out.stdout), "chown=1\n", "{}", text(&out.stderr));
    let out = run(&[], "chown", chown);
    assert_eq!(text(&out.stdout), "chown=0\n", "{}", text(&out.stderr));

    let out = run(
        &["--read-only"],
        "readonly",
        "echo x > /written; echo write=$?",
    );
    assert_eq!(text(&out.stdout), "write=1\n", "{}", text(&out.stderr));
    c.assert_nothing_left();
}
