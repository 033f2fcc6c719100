//! containerd end to end: Debian's containerd, started by the test on a
//! private socket, runs busybox containers with `ctr` on
//! `io.containerd.kestrel.v2` (process sandboxes).

use std::process::Stdio;
use std::time::{Duration, Instant};

use kestrel_tests::containerd::{available, Containerd};
use kestrel_tests::{busybox_rootfs, mounts_under, require};

const RUNTIME: &str = "io.containerd.kestrel.v2";

fn ready(test: &str) -> bool {
    require(test) && available(test)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run_argv<'a>(detach: bool, rootfs: &'a str, id: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["run"];
    if detach {
        argv.push("-d");
    }
    argv.extend([
        "--runtime",
        RUNTIME,
        "--env",
        "PATH=/bin",
        "--rootfs",
        rootfs,
        id,
    ]);
    argv.extend_from_slice(args);
    argv
}

/// `ctr run` in the foreground: (stdout, exit code).
fn run(c: &Containerd, rootfs: &str, id: &str, args: &[&str]) -> (String, i32) {
    let out = c.ctr(&run_argv(false, rootfs, id, args));
    (text(&out.stdout), out.status.code().unwrap_or(-1))
}

fn run_detached(c: &Containerd, rootfs: &str, id: &str, args: &[&str]) {
    let out = c.ctr(&run_argv(true, rootfs, id, args));
    assert!(
        out.status.success(),
        "ctr run -d {id}: {}\n{}",
        text(&out.stderr),
        c.log_text()
    );
}

/// Deletes a task once its exit is recorded (containerd refuses to delete
/// a running task), then its container.
fn delete(c: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.ctr(&["task", "delete", id]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ctr task delete {id}: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = c.ctr(&["container", "delete", id]);
    assert!(
        out.status.success(),
        "ctr container delete {id}: {}",
        text(&out.stderr)
    );
}

/// SIGKILLs a task, then deletes it and its container.
fn kill_and_delete(c: &Containerd, id: &str) {
    let kill = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    assert!(
        kill.status.success(),
        "ctr task kill {id}: {}",
        text(&kill.stderr)
    );
    delete(c, id);
}

fn assert_nothing_left(c: &Containerd) {
    let tasks = text(&c.ctr(&["task", "ls", "-q"]).stdout);
    assert_eq!(tasks.trim(), "", "tasks left");
    let containers = text(&c.ctr(&["container", "ls", "-q"]).stdout);
    assert_eq!(containers.trim(), "", "containers left");
    // Shims exit after containerd's Shutdown; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.leftover_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        c.leftover_processes(),
        vec![],
        "shim or agent processes left"
    );
    let sandboxes = c.path().join("sandboxes");
    let left: Vec<_> = std::fs::read_dir(&sandboxes)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(left, Vec::<std::path::PathBuf>::new(), "sandbox state left");
    assert_eq!(mounts_under(c.path()), Vec::<String>::new(), "mounts left");
}

#[test]
fn ctr_runs_a_busybox_container_with_output_exit_code_exec_kill_and_delete() {
    if !ready("ctr_runs_a_busybox_container_with_output_exit_code_exec_kill_and_delete") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();

    let (out, status) = run(
        &c,
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

    run_detached(&c, rootfs, "svc", &["sleep", "1000"]);
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("svc") && l.contains("RUNNING")),
        "{ls}"
    );
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "svc",
        "sh",
        "-c",
        "echo in exec; exit 5",
    ]);
    assert_eq!(
        (text(&exec.stdout).as_str(), exec.status.code()),
        ("in exec\n", Some(5)),
        "{}",
        text(&exec.stderr)
    );
    kill_and_delete(&c, "svc");
    assert_nothing_left(&c);
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
        run_detached(&c, rootfs, id, &["sleep", "1000"]);
    }
    // 150 background loops of `ctr task ls`, as in kata-containers issue 12336.
    let load = c.task_ls_load(150);
    std::thread::sleep(Duration::from_secs(2));
    for id in &ids {
        kill_and_delete(&c, id);
    }
    std::thread::sleep(Duration::from_secs(1));
    drop(load);
    let log = c.log_text();
    assert!(!log.contains("failed to find container"), "{log}");
    assert!(!log.contains("get state for"), "{log}");
    assert_nothing_left(&c);
}

#[test]
fn a_killed_shim_is_cleaned_up_by_the_delete_action() {
    if !ready("a_killed_shim_is_cleaned_up_by_the_delete_action") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    run_detached(&c, rootfs.to_str().unwrap(), "orphan", &["sleep", "1000"]);
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
    assert_nothing_left(&c);
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
    kill_and_delete(&c, "app");
    // containerd runs the shim's `delete` after each task delete: the pod's
    // sandbox must survive it.
    std::thread::sleep(Duration::from_secs(1));
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("pod1") && l.contains("RUNNING")),
        "{ls}"
    );
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "still",
        "pod1",
        "sh",
        "-c",
        "echo alive",
    ]);
    assert_eq!(text(&exec.stdout), "alive\n", "{}", text(&exec.stderr));
    kill_and_delete(&c, "pod1");
    assert_nothing_left(&c);
}
