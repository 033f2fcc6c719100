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
    c.kill_the_shim_and_await_task_gone("orphan", Duration::from_secs(30));
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

/// A hook that saves the state JSON it reads on stdin as `<dir>/<name>.json`.
fn saving_hook(dir: &std::path::Path, name: &str) -> serde_json::Value {
    let file = dir.join(format!("{name}.json"));
    serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", file.display())]})
}

fn saved_state(dir: &std::path::Path, name: &str) -> Option<serde_json::Value> {
    let bytes = std::fs::read(dir.join(format!("{name}.json"))).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}.json: {e}")))
}

/// The pid `ctr task ls` shows for a task.
fn task_pid(c: &Containerd, id: &str) -> u64 {
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    ls.lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(id)).then(|| cols.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no task {id} in:\n{ls}"))
}

#[test]
fn host_hooks_get_the_state_on_stdin_and_poststop_runs_after_delete() {
    if !ready("host_hooks_get_the_state_on_stdin_and_poststop_runs_after_delete") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let dir = c.path().join("hook-states");
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec = c.default_spec(rootfs.to_str().unwrap(), &["sleep", "1000"]);
    spec["annotations"] = serde_json::json!({"test.kestrel/owner": "hooks"});
    spec["hooks"] = serde_json::json!({
        "prestart": [saving_hook(&dir, "prestart")],
        "createRuntime": [saving_hook(&dir, "createRuntime")],
        "poststart": [saving_hook(&dir, "poststart")],
        "poststop": [saving_hook(&dir, "poststop")],
    });
    let out = c.run_spec(true, "hooked", &spec);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        c.log_text()
    );
    let pid = task_pid(&c, "hooked");
    let bundle = c.bundle("hooked").display().to_string();
    for (phase, status) in [
        ("prestart", "creating"),
        ("createRuntime", "creating"),
        ("poststart", "running"),
    ] {
        let state = saved_state(&dir, phase).unwrap_or_else(|| panic!("{phase} hook did not run"));
        assert_eq!(state["ociVersion"], spec["ociVersion"], "{phase}: {state}");
        assert_eq!(state["id"], "hooked", "{phase}: {state}");
        assert_eq!(state["status"], status, "{phase}: {state}");
        assert_eq!(state["pid"], pid, "{phase}: {state}");
        assert_eq!(state["bundle"], bundle.as_str(), "{phase}: {state}");
        assert_eq!(
            state["annotations"]["test.kestrel/owner"], "hooks",
            "{phase}: {state}"
        );
    }
    assert_eq!(
        saved_state(&dir, "poststop"),
        None,
        "poststop ran before delete"
    );
    c.kill_and_delete("hooked");
    let state =
        saved_state(&dir, "poststop").expect("poststop did not run by the time delete returned");
    assert_eq!(
        (state["id"].as_str(), state["status"].as_str()),
        (Some("hooked"), Some("stopped")),
        "{state}"
    );
    c.assert_nothing_left();
}

#[test]
fn a_failing_prestart_hook_fails_the_create_naming_it_and_leaves_nothing() {
    let test = "a_failing_prestart_hook_fails_the_create_naming_it_and_leaves_nothing";
    if !ready(test) {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let dir = c.path().join("hook-states");
    std::fs::create_dir_all(&dir).unwrap();
    let ran = rootfs.join("tmp/program-ran");
    let mut spec = c.default_spec(
        rootfs.to_str().unwrap(),
        &["sh", "-c", "echo > /tmp/program-ran"],
    );
    spec["hooks"] = serde_json::json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo refusing to start >&2; exit 7"]}],
        "createRuntime": [saving_hook(&dir, "createRuntime")],
        "poststart": [saving_hook(&dir, "poststart")],
        "poststop": [saving_hook(&dir, "poststop")],
    });
    let out = c.run_spec(false, "refused", &spec);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "ctr run succeeded");
    assert!(
        stderr.contains("container refused: prestart hook #0 (/bin/sh) failed: exit status 7, stderr: refusing to start"),
        "{stderr}"
    );
    assert!(!ran.exists(), "the program ran");
    assert_eq!(
        saved_state(&dir, "createRuntime"),
        None,
        "hooks after the failed one ran"
    );
    assert_eq!(saved_state(&dir, "poststart"), None);
    // As runc: the failed create destroys the container, then poststop.
    let poststop = saved_state(&dir, "poststop").expect("poststop after the failed create");
    assert_eq!(poststop["status"], "stopped", "{poststop}");
    let out = c.ctr(&["container", "delete", "refused"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}

#[test]
fn a_create_runtime_hook_past_its_timeout_is_killed_and_named() {
    if !ready("a_create_runtime_hook_past_its_timeout_is_killed_and_named") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let pid_file = c.path().join("hook.pid");
    let mut spec = c.default_spec(rootfs.to_str().unwrap(), &["true"]);
    spec["hooks"] = serde_json::json!({
        "createRuntime": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("echo $$ > {}; exec sleep 100", pid_file.display())],
            "timeout": 1
        }],
    });
    let started = Instant::now();
    let out = c.run_spec(false, "slow", &spec);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "ctr run succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stderr
            .contains("createRuntime hook #0 (/bin/sh) ran past its timeout of 1s and was killed"),
        "{stderr}"
    );
    let hook: i32 = std::fs::read_to_string(&pid_file)
        .expect("the hook ran")
        .trim()
        .parse()
        .unwrap();
    let alive =
        std::fs::read_to_string(format!("/proc/{hook}/stat")).is_ok_and(|s| !s.contains(") Z "));
    assert!(!alive, "the hook (pid {hook}) still runs");
    let out = c.ctr(&["container", "delete", "slow"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}

/// A `#!/bin/sh` logging binary that records its args and environment,
/// signals ready, and copies fd 3 and fd 4 to `out.$CONTAINER_ID` and
/// `err.$CONTAINER_ID` in `dir`.
fn logger_script(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("logger.sh");
    let body = format!(
        "#!/bin/sh\n\
         cd {dir}\n\
         echo \"$*\" > args.$CONTAINER_ID\n\
         echo \"$CONTAINER_NAMESPACE\" > namespace.$CONTAINER_ID\n\
         exec 5>&-\n\
         cat <&3 > out.$CONTAINER_ID &\n\
         cat <&4 > err.$CONTAINER_ID &\n\
         wait\n",
        dir = dir.display()
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// Logging binaries of this test still running (zombies count as gone).
fn loggers_left(c: &Containerd) -> Vec<(u32, String)> {
    c.leftover_processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("logger"))
        .collect()
}

fn with_log_uri<'a>(uri: &'a str, argv: Vec<&'a str>) -> Vec<&'a str> {
    let mut with = vec![argv[0], "--log-uri", uri];
    with.extend_from_slice(&argv[1..]);
    with
}

#[test]
fn a_binary_log_uri_feeds_the_logger_for_run_and_exec_and_leaves_nothing() {
    if !ready("a_binary_log_uri_feeds_the_logger_for_run_and_exec_and_leaves_nothing") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let logs = c.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let script = logger_script(&logs);
    let uri = format!("binary://{}?mode=test&level=debug", script.display());
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();

    let out = c.ctr(&with_log_uri(
        &uri,
        run_argv(
            false,
            rootfs,
            "logged",
            &["sh", "-c", "echo to stdout; echo to stderr >&2; exit 4"],
        ),
    ));
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}\n{}",
        text(&out.stderr),
        c.log_text()
    );
    assert_eq!(read("out.logged"), "to stdout\n");
    assert_eq!(read("err.logged"), "to stderr\n");
    assert_eq!(read("args.logged"), "mode test level debug\n");
    assert_eq!(read("namespace.logged"), "default\n");
    // The exit is recorded only after the logger finished.
    assert_eq!(loggers_left(&c), vec![], "logger left after ctr run");
    assert!(c.ctr(&["container", "delete", "logged"]).status.success());

    // A detached container and an exec each get their own logger.
    let out = c.ctr(&with_log_uri(
        &uri,
        run_argv(
            true,
            rootfs,
            "svc",
            &["sh", "-c", "echo svc up; exec sleep 1000"],
        ),
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exec_uri = format!("binary://{}", script.display());
    let exec = c.ctr(&[
        "task",
        "exec",
        "--log-uri",
        &exec_uri,
        "--exec-id",
        "e1",
        "svc",
        "sh",
        "-c",
        "echo exec out; echo exec err >&2; exit 6",
    ]);
    assert_eq!(exec.status.code(), Some(6), "{}", text(&exec.stderr));
    assert_eq!(read("out.e1"), "exec out\n");
    assert_eq!(read("err.e1"), "exec err\n");
    assert_eq!(read("args.e1"), "\n");
    c.kill_and_delete("svc");
    assert_eq!(read("out.svc"), "svc up\n");
    assert_eq!(loggers_left(&c), vec![], "logger left after delete");
    c.assert_nothing_left();
}

#[test]
fn a_file_log_uri_collects_run_and_exec_output() {
    if !ready("a_file_log_uri_collects_run_and_exec_output") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let run_log = c.path().join("logs/run.log");
    let uri = format!("file://{}", run_log.display());
    let out = c.ctr(&with_log_uri(
        &uri,
        run_argv(
            false,
            rootfs,
            "filed",
            &[
                "sh",
                "-c",
                "echo to stdout; sleep 0.2; echo to stderr >&2; exit 2",
            ],
        ),
    ));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(&run_log).unwrap(),
        "to stdout\nto stderr\n"
    );
    assert!(c.ctr(&["container", "delete", "filed"]).status.success());

    c.run_detached(rootfs, "svc", &["sleep", "1000"]);
    let exec_log = c.path().join("logs/exec.log");
    let exec_uri = format!("file://{}", exec_log.display());
    let exec = c.ctr(&[
        "task",
        "exec",
        "--log-uri",
        &exec_uri,
        "--exec-id",
        "e1",
        "svc",
        "sh",
        "-c",
        "echo exec out; exit 3",
    ]);
    assert_eq!(exec.status.code(), Some(3), "{}", text(&exec.stderr));
    assert_eq!(std::fs::read_to_string(&exec_log).unwrap(), "exec out\n");
    c.kill_and_delete("svc");
    c.assert_nothing_left();
}

#[test]
fn a_logging_binary_that_cannot_run_fails_the_create_naming_it_and_leaves_nothing() {
    let test = "a_logging_binary_that_cannot_run_fails_the_create_naming_it_and_leaves_nothing";
    if !ready(test) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let not_executable = c.path().join("logger-not-executable.sh");
    std::fs::write(&not_executable, "#!/bin/sh\nexec 5>&-\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let missing = c.path().join("no-such-logger");
    // Never closes fd 5: given up on after 10 s, killed with its helper.
    let stuck = c.path().join("logger-stuck.sh");
    std::fs::write(&stuck, "#!/bin/sh\nsleep 4321 &\nwait\n").unwrap();
    std::fs::set_permissions(&stuck, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (id, program, why, code) in [
        (
            "missing",
            &missing,
            "No such file or directory",
            "invalid argument",
        ),
        (
            "noexec",
            &not_executable,
            "Permission denied",
            "invalid argument",
        ),
        (
            "stuck",
            &stuck,
            "did not close fd 5 (ready) within 10s; killed",
            "context deadline exceeded",
        ),
    ] {
        let uri = format!("binary://{}", program.display());
        let out = c.ctr(&with_log_uri(&uri, run_argv(false, rootfs, id, &["true"])));
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "ctr run {id} succeeded");
        assert!(
            stderr.contains(&format!("logging binary {uri}"))
                && stderr.contains(why)
                && stderr.trim_end().ends_with(code),
            "{stderr}"
        );
        let out = c.ctr(&["container", "delete", id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(loggers_left(&c), vec![]);
    let sleeps: Vec<_> = (std::fs::read_dir("/proc").unwrap().flatten())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x004321\x00")
                && std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| !s.contains(") Z "))
        })
        .collect();
    assert!(sleeps.is_empty(), "the stuck logger's helper still runs");
    c.assert_nothing_left();
}
