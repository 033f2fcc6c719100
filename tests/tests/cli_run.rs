//! `kestrel run`, `ps`, `exec`, `kill`, `rm` and `events` end to end: the CLI
//! starts the real shim binary, which runs process sandboxes (the agent on
//! the host), or QEMU VMs from the guest image where the machine has them.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kestrel_tests::{
    binary, busybox_rootfs, guest_image, kvm_runs_guests_here, qemu_ready, require, GuestImage,
    SLOW_BOOT_AGENT_SECTION,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A private CLI state root, sandbox state dir and configuration.
struct Cli {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
}

impl Cli {
    fn new(extra_config: &str) -> Cli {
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = busybox_rootfs(dir.path());
        let config = format!(
            "[sandbox]\nagent_path = \"{}\"\nstate_dir = \"{}\"\nstop_grace_ms = 2000\n{extra_config}\n",
            binary("kestrel-agent").display(),
            dir.path().join("sandboxes").display(),
        );
        std::fs::write(dir.path().join("kestrel.toml"), config).expect("config");
        Cli { dir, rootfs }
    }

    /// A CLI whose VMs boot `image` (256 MiB, a slow-boot dial timeout).
    fn for_vm(image: &GuestImage) -> Cli {
        Cli::new(&format!(
            "{SLOW_BOOT_AGENT_SECTION}[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\naccel = \"auto\"\n",
            image.vmlinux.display(),
            image.initrd.display()
        ))
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("cli")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("kestrel"));
        command
            .args(args)
            .env("KESTREL_CONFIG", self.dir.path().join("kestrel.toml"))
            .env("KESTREL_CLI_ROOT", self.root())
            .env_remove("KESTREL_HYPERVISOR")
            .stdin(Stdio::null());
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kestrel")
    }

    /// `kestrel run --hypervisor process --rootfs <busybox> <flags> <id> -- <cmd>`.
    fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let rootfs = self.rootfs.to_str().unwrap();
        let mut args = vec!["run", "--hypervisor", "process", "--rootfs", rootfs];
        args.extend_from_slice(flags);
        args.push(id);
        args.push("--");
        args.extend_from_slice(cmd);
        self.output(&args)
    }

    fn ps_row(&self, id: &str) -> serde_json::Value {
        let out = self.output(&["ps", "--json"]);
        assert!(out.status.success(), "ps: {}", text(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
        rows.into_iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in ps: {}", text(&out.stdout)))
    }

    /// Processes whose command line names this test's directory (the shim
    /// names its bundle's socket, the agent its sandbox dir).
    fn leftover_processes(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = cmdline.contains("containerd-shim-kestrel-v2")
                || cmdline.contains("kestrel-agent")
                || cmdline.contains("qemu-system")
                || cmdline.contains("kestrel-vmm");
            if ours && cmdline.contains(&needle) {
                found.push(cmdline);
            }
        }
        found
    }

    /// [`Self::leftover_processes`] with their pids.
    fn leftover_processes_with_pid(&self) -> Vec<(i32, String)> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(&needle).then_some((pid, cmdline))
            })
            .collect()
    }

    fn assert_no_processes_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.leftover_processes();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "still running: {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn root_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_rm_prints_the_output_exits_with_the_status_and_leaves_nothing() {
    let test = "run_rm_prints_the_output_exits_with_the_status_and_leaves_nothing";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(
        &["--rm"],
        "t1",
        &["sh", "-c", "echo hi; echo oops >&2; exit 3"],
    );
    assert_eq!(text(&out.stdout), "hi\n", "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(3));
    assert!(cli.root_entries().is_empty(), "{:?}", cli.root_entries());
    cli.assert_no_processes_left();
}

#[test]
fn detached_container_is_listed_exec_killed_and_removed() {
    let test = "detached_container_is_listed_exec_killed_and_removed";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&["-d"], "d1", &["sleep", "1000"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "d1\n");
    // The shim's log is kept beside its bundle.
    let log = std::fs::read_to_string(cli.root().join("d1/log")).unwrap_or_default();
    assert!(log.contains("shim serving"), "shim log: {log:?}");
    let row = cli.ps_row("d1");
    assert_eq!(row["status"], "RUNNING");
    assert_eq!(row["image"], cli.rootfs.to_str().unwrap());

    let out = cli.output(&["exec", "d1", "--", "sh", "-c", "echo from-exec; exit 5"]);
    assert_eq!(text(&out.stdout), "from-exec\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(5));

    let out = cli.output(&["rm", "d1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is running (use -f)"));

    let out = cli.output(&["kill", "d1", "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let row = cli.ps_row("d1");
        if row["status"] == "STOPPED" || Instant::now() > deadline {
            break row;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["status"], "STOPPED");
    assert_eq!(row["exit"], 137);

    let out = cli.output(&["rm", "d1"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    assert!(cli.root_entries().is_empty());
    cli.assert_no_processes_left();
}

#[test]
fn rm_of_a_container_whose_shim_died_stops_its_sandbox() {
    let test = "rm_of_a_container_whose_shim_died_stops_its_sandbox";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&["-d"], "orphan", &["sleep", "1000"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let shims: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("containerd-shim-kestrel-v2")
                && cmdline.contains(&*cli.dir.path().to_string_lossy()))
            .then_some(pid)
        })
        .collect();
    assert_eq!(shims.len(), 1, "{:?}", cli.leftover_processes());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let row = cli.ps_row("orphan");
    assert!(
        row["status"].as_str().unwrap().starts_with("UNKNOWN"),
        "{row}"
    );
    let out = cli.output(&["rm", "orphan"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    assert!(cli.root_entries().is_empty());
    cli.assert_no_processes_left();
}

#[test]
fn ids_rootfs_and_duplicates_are_checked_before_anything_starts() {
    let test = "ids_rootfs_and_duplicates_are_checked_before_anything_starts";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&[], "../escape", &["true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid container id"),
        "{}",
        text(&out.stderr)
    );

    let out = cli.output(&["run", "--rootfs", "/nonexistent", "x", "--", "true"]);
    assert!(
        text(&out.stderr).contains("not a directory"),
        "{}",
        text(&out.stderr)
    );

    let out = cli.output(&["exec", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no such container: nope"));

    let out = cli.run(&["-d"], "dup", &["sleep", "1000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli.run(&["-d"], "dup", &["sleep", "1000"]);
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert!(cli.output(&["rm", "-f", "dup"]).status.success());
    cli.assert_no_processes_left();
}

#[test]
fn interactive_stdin_reaches_the_container_and_ends_at_eof() {
    let test = "interactive_stdin_reaches_the_container_and_ends_at_eof";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let rootfs = cli.rootfs.to_str().unwrap().to_string();
    let mut child = cli
        .command(&[
            "run",
            "--hypervisor",
            "process",
            "--rm",
            "-i",
            "--rootfs",
            &rootfs,
            "i1",
            "--",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("kestrel run");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"line one\nline two\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "line one\nline two\n");
    assert_eq!(out.status.code(), Some(0));
    cli.assert_no_processes_left();
}

/// A running `kestrel events --json`, its lines read as they come.
struct Events {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<(Instant, serde_json::Value)>,
}

impl Events {
    /// Starts it and returns once its socket is there for shims to find.
    fn start(cli: &Cli) -> Events {
        let mut child = cli
            .command(&["events", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("kestrel events");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("read");
                let event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        });
        let socket = cli.root().join(format!(".events/{}.sock", child.id()));
        // Made first, so that a panic below still kills it.
        let events = Events { child, lines };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        events
    }

    /// The next line and when it arrived.
    fn next(&self) -> (Instant, serde_json::Value) {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("an event line")
    }

    /// The next `count` lines' events, with the exec and exit status if any.
    fn next_events(&self, count: usize) -> Vec<String> {
        (0..count)
            .map(|_| {
                let (_, event) = self.next();
                let field = |name: &str| event[name].as_str().unwrap_or("?").to_string();
                let mut summary = format!("{} {}", field("id"), field("event"));
                if let Some(exec_id) = event["exec_id"].as_str() {
                    summary += &format!(" exec={exec_id}");
                }
                if let Some(status) = event["exit_status"].as_u64() {
                    summary += &format!(" status={status}");
                }
                summary
            })
            .collect()
    }

    /// SIGINT, as Ctrl-C: it exits with success.
    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_json_prints_create_start_exit_delete_in_order_the_exit_within_a_second() {
    let test = "events_json_prints_create_start_exit_delete_in_order_the_exit_within_a_second";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let events = Events::start(&cli);
    // The container exits soon after the test creates /go, not before.
    let go = cli.rootfs.join("go");
    let script = "while [ ! -e /go ]; do sleep 0.05; done; exit 3";
    let rootfs = cli.rootfs.to_str().unwrap();
    let run = cli
        .command(&[
            "run",
            "--hypervisor",
            "process",
            "--rm",
            "--rootfs",
            rootfs,
            "e1",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kestrel run");

    // Create and start, while the container waits for /go.
    let mut seen = vec![events.next(), events.next()];
    std::fs::write(&go, "").unwrap();
    let released = Instant::now();
    seen.push(events.next());
    seen.push(events.next());
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    events.stop();

    let names: Vec<_> = seen.iter().map(|(_, e)| e["event"].clone()).collect();
    assert_eq!(names, ["create", "start", "exit", "delete"]);
    assert!(seen.iter().all(|(_, e)| e["id"] == "e1"), "{seen:?}");
    let (exit_seen, exit) = &seen[2];
    assert_eq!(
        (&exit["exit_status"], &exit["exit"]),
        (&3.into(), &3.into())
    );
    // The container exits after `released`, so this bounds the delay from
    // its exit from above.
    let delay = exit_seen.duration_since(released);
    assert!(
        delay < Duration::from_secs(1),
        "exit printed {delay:?} after"
    );
    cli.assert_no_processes_left();
}

#[test]
fn events_started_after_the_shim_each_see_its_exec_exit_and_delete() {
    let test = "events_started_after_the_shim_each_see_its_exec_exit_and_delete";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&["-d"], "d1", &["sleep", "1000"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    // The shim has lived on without a listener; two start listening now.
    let (first, second) = (Events::start(&cli), Events::start(&cli));

    let out = cli.output(&["exec", "d1", "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let out = cli.output(&["rm", "-f", "d1"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));

    for events in [first, second] {
        let seen = events.next_events(5);
        let exec_id = seen[0].rsplit_once("exec=").map(|(_, id)| id.to_string());
        let exec_id = exec_id.unwrap_or_else(|| panic!("no exec first: {seen:?}"));
        assert_eq!(
            seen,
            [
                format!("d1 exec-added exec={exec_id}"),
                format!("d1 exec-started exec={exec_id}"),
                format!("d1 exit exec={exec_id} status=5"),
                "d1 exit status=137".to_string(),
                "d1 delete".to_string(),
            ]
        );
        events.stop();
    }
    cli.assert_no_processes_left();
}

#[test]
fn ps_and_doctor_name_a_sandbox_whose_agent_stopped_answering() {
    let test = "ps_and_doctor_name_a_sandbox_whose_agent_stopped_answering";
    if !require(test) {
        return;
    }
    let cli = Cli::new("[lifecycle]\nrelist_period_ms = 100\nrelist_unhealthy_after_s = 1\n");
    let out = cli.run(&["-d"], "h1", &["sleep", "1000"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let health_becomes = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let row = cli.ps_row("h1");
            let health = row["sandbox_health"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if health.starts_with(want) || Instant::now() > deadline {
                return health;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(health_becomes("healthy"), "healthy");

    // A wedged agent: its relists fail, the shim still answers.
    let sandbox_dir = cli.dir.path().join("sandboxes/h1");
    let agent = cli
        .leftover_processes_with_pid()
        .into_iter()
        .find(|(_, cmdline)| {
            cmdline.contains("kestrel-agent --listen")
                && cmdline.contains(&*sandbox_dir.to_string_lossy())
        })
        .map(|(pid, _)| pid)
        .expect("the sandbox's agent process");
    kill(Pid::from_raw(agent), Signal::SIGSTOP).unwrap();
    let health = health_becomes("unhealthy");
    // Asked while the agent is still wedged: once it runs again the next
    // relist (every 100 ms here) makes the sandbox healthy, and doctor,
    // which checks the whole machine first, can take longer than that.
    let doctor = cli.output(&["doctor"]);
    kill(Pid::from_raw(agent), Signal::SIGCONT).unwrap();
    assert!(
        health.starts_with("unhealthy: relister was last active"),
        "{health}"
    );
    let doctor_text = text(&doctor.stdout);
    assert!(
        doctor_text
            .lines()
            .any(|l| l.starts_with("sandboxes") && l.contains("h1 (")),
        "{doctor_text}"
    );

    assert!(cli.output(&["rm", "-f", "h1"]).status.success());
    cli.assert_no_processes_left();
}

#[test]
fn run_exec_kill_rm_in_a_qemu_vm_use_the_guest_kernel() {
    let test = "run_exec_kill_rm_in_a_qemu_vm_use_the_guest_kernel";
    let Some(image) = qemu_ready(test) else {
        return;
    };
    run_exec_kill_rm_in_a_vm(test, "qemu", &image);
}

/// The same on our own VMM, which `auto` picks where KVM runs guests (in
/// the nested-KVM harness's L1 here, where `kestrel doctor` must say so).
#[test]
fn run_exec_kill_rm_in_the_builtin_vmm_picked_by_auto_use_the_guest_kernel() {
    let test = "run_exec_kill_rm_in_the_builtin_vmm_picked_by_auto_use_the_guest_kernel";
    if !kvm_runs_guests_here(test) || !require(test) {
        return;
    }
    let Some(image) = guest_image(test) else {
        return;
    };
    run_exec_kill_rm_in_a_vm(test, "auto", &image);
}

/// `run --rm` (output, status, the guest's kernel), then a detached
/// container's exec, stdin, kill and rm, all with `--hypervisor hypervisor`.
fn run_exec_kill_rm_in_a_vm(test: &str, hypervisor: &str, image: &GuestImage) {
    let cli = Cli::for_vm(image);
    if hypervisor == "auto" {
        let out = cli.output(&["doctor"]);
        let doctor = text(&out.stdout);
        assert!(
            doctor.contains("auto -> builtin: KVM is native"),
            "{doctor}{}",
            text(&out.stderr)
        );
    }
    let rootfs = cli.rootfs.to_str().unwrap().to_string();
    let vm_run = |id: &str, cmd: &[&str]| -> (Output, Duration) {
        let mut args = vec![
            "run",
            "--hypervisor",
            hypervisor,
            "--rm",
            "--rootfs",
            &rootfs,
            id,
            "--",
        ];
        args.extend_from_slice(cmd);
        let started = Instant::now();
        let mut child = cli
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kestrel run");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let to_first_line = started.elapsed();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let mut out = child.wait_with_output().unwrap();
        out.stdout = format!("{first}{rest}").into_bytes();
        (out, to_first_line)
    };

    let (out, to_first_line) = vm_run("q1", &["sh", "-c", "echo hi; exit 3"]);
    eprintln!("{test}: exec of kestrel run to its first output line: {to_first_line:?}");
    assert_eq!(text(&out.stdout), "hi\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3));

    let (out, _) = vm_run("q2", &["busybox", "uname", "-r"]);
    let release = text(&out.stdout);
    assert!(
        release.starts_with("6.1."),
        "guest release {release:?}: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));

    // A detached container in a VM: exec, stdin, kill, rm.
    let out = cli.output(&[
        "run",
        "--hypervisor",
        hypervisor,
        "-d",
        "--rootfs",
        &rootfs,
        "q3",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let out = cli.output(&["exec", "q3", "--", "sh", "-c", "busybox uname -r; exit 5"]);
    assert!(
        text(&out.stdout).starts_with("6.1."),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(5));
    let mut cat = cli
        .command(&["exec", "-i", "q3", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("kestrel exec -i");
    std::io::Write::write_all(&mut cat.stdin.take().unwrap(), b"through the vm\n").unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "through the vm\n");
    assert_eq!(out.status.code(), Some(0));
    let out = cli.output(&["kill", "q3", "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli.ps_row("q3")["status"] != "STOPPED" {
        assert!(
            Instant::now() < deadline,
            "q3 not STOPPED: {}",
            cli.ps_row("q3")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cli.ps_row("q3")["exit"], 137);
    let out = cli.output(&["rm", "q3"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));

    assert!(cli.root_entries().is_empty(), "{:?}", cli.root_entries());
    cli.assert_no_processes_left();
}

/// `kestrel` on a terminal of its own, as a terminal emulator would run it:
/// stdin and stdout on the slave of a pty the test holds the master of, the
/// pty its controlling terminal. Stderr goes to a file, so the start-up
/// spinner stays off the terminal and failures can be shown.
struct OnTerminal {
    child: std::process::Child,
    master: std::os::fd::OwnedFd,
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    stderr: PathBuf,
}

impl OnTerminal {
    fn spawn(cli: &Cli, args: &[&str], rows: u16, cols: u16) -> OnTerminal {
        use std::os::unix::process::CommandExt;
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = cli.dir.path().join(format!("terminal-{n}.stderr"));
        let mut command = cli.command(args);
        command
            .stdin(pty.slave.try_clone().expect("dup"))
            .stdout(pty.slave.try_clone().expect("dup"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        // SAFETY: setsid and ioctl are async-signal-safe and touch no memory
        // of the parent.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("kestrel on a pty");
        // Only kestrel may hold the slave: the master reads EIO once it exits.
        drop(command);
        drop(pty.slave);
        let reader = pty.master.try_clone().expect("dup");
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = nix::unistd::read(reader.as_raw_fd(), &mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        OnTerminal {
            child,
            master: pty.master,
            output,
            seen: Vec::new(),
            stderr,
        }
    }

    fn text(&self) -> String {
        text(&self.seen)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Reads the terminal until it shows `wanted`, for at most `timeout`.
    fn wait_for(&mut self, wanted: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.text().contains(wanted) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => panic!(
                    "{wanted:?} never showed; the terminal shows {:?}, stderr: {}",
                    self.text(),
                    self.stderr()
                ),
            }
        }
    }

    /// Resizes the terminal, as a terminal emulator's window: the kernel
    /// sends SIGWINCH to kestrel, its foreground process group.
    fn resize(&self, rows: u16, cols: u16) {
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer we pass.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Whether the terminal is in canonical (line-editing) mode, which raw
    /// mode turns off.
    fn canonical(&self) -> bool {
        let termios = nix::sys::termios::tcgetattr(&self.master).expect("tcgetattr");
        termios
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ICANON)
    }

    /// Waits for kestrel to exit and reads the rest of the terminal.
    fn finish(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "kestrel did not exit; the terminal shows {:?}, stderr: {}",
                    self.text(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(chunk) = self.output.recv_timeout(Duration::from_secs(5)) {
            self.seen.extend(chunk);
        }
        (status.code(), self.text())
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kestrel rm -f` of a container when dropped, so a failed assertion
/// leaves no shim or agent behind.
struct RemovedOnDrop<'a>(&'a Cli, &'a str);

impl Drop for RemovedOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.output(&["rm", "-f", self.1]);
    }
}

/// Prints the terminal's name and size, then waits (up to 30 s) for the
/// size to change from 33x91 and prints the new one.
const PRINT_TTY_AND_SIZE_CHANGE: &str = "tty; stty size; i=0; \
    while [ \"$(stty size)\" = '33 91' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
    stty size";

/// Runs `args` (a `kestrel run -t` or `exec -t` of
/// [`PRINT_TTY_AND_SIZE_CHANGE`]) on a 33x91 terminal: the container's
/// process must name `/dev/pts/0`, a pty of the container's own devpts, see
/// the size of ours, and follow it to 50x120 while our terminal is in raw
/// mode; our terminal's mode is back once kestrel exits.
fn terminal_is_the_containers_own_and_follows_a_resize(cli: &Cli, args: &[&str]) {
    let mut term = OnTerminal::spawn(cli, args, 33, 91);
    term.wait_for("33 91", Duration::from_secs(120));
    // The process runs, waiting for the resize: kestrel puts its terminal
    // in raw mode once the process has started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while term.canonical() {
        assert!(
            Instant::now() < deadline,
            "kestrel did not put its terminal in raw mode"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    term.resize(50, 120);
    term.wait_for("50 120", Duration::from_secs(30));
    let (status, shown) = term.finish(Duration::from_secs(60));
    assert_eq!(status, Some(0), "the terminal shows {shown:?}");
    let lines: Vec<&str> = shown.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines, ["/dev/pts/0", "33 91", "50 120"], "{shown:?}");
    assert!(
        term.canonical(),
        "kestrel did not restore its terminal's mode"
    );
}

#[test]
fn run_t_gives_a_pty_of_the_containers_own_that_follows_resizes() {
    let test = "run_t_gives_a_pty_of_the_containers_own_that_follows_resizes";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let rootfs = cli.rootfs.to_str().unwrap().to_string();
    terminal_is_the_containers_own_and_follows_a_resize(
        &cli,
        &[
            "run",
            "--hypervisor",
            "process",
            "--rm",
            "-t",
            "--rootfs",
            &rootfs,
            "tty1",
            "--",
            "sh",
            "-c",
            PRINT_TTY_AND_SIZE_CHANGE,
        ],
    );
    assert!(cli.root_entries().is_empty(), "{:?}", cli.root_entries());
    cli.assert_no_processes_left();
}

#[test]
fn exec_t_gives_a_pty_of_the_containers_own_that_follows_resizes() {
    let test = "exec_t_gives_a_pty_of_the_containers_own_that_follows_resizes";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&["-d"], "tty2", &["sleep", "1000"]);
    let removed = RemovedOnDrop(&cli, "tty2");
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    terminal_is_the_containers_own_and_follows_a_resize(
        &cli,
        &[
            "exec",
            "-t",
            "tty2",
            "--",
            "sh",
            "-c",
            PRINT_TTY_AND_SIZE_CHANGE,
        ],
    );
    std::mem::forget(removed);
    assert!(cli.output(&["rm", "-f", "tty2"]).status.success());
    cli.assert_no_processes_left();
}

/// Both, in a QEMU VM: the pty comes from the container's devpts in the
/// guest, and resizes cross the shim, the vsock and the agent.
#[test]
fn run_t_and_exec_t_in_a_qemu_vm_give_ptys_of_the_containers_own_that_follow_resizes() {
    let test = "run_t_and_exec_t_in_a_qemu_vm_give_ptys_of_the_containers_own_that_follow_resizes";
    let Some(image) = qemu_ready(test) else {
        return;
    };
    let cli = Cli::for_vm(&image);
    let rootfs = cli.rootfs.to_str().unwrap().to_string();
    terminal_is_the_containers_own_and_follows_a_resize(
        &cli,
        &[
            "run",
            "--hypervisor",
            "qemu",
            "--rm",
            "-t",
            "--rootfs",
            &rootfs,
            "vtty1",
            "--",
            "sh",
            "-c",
            PRINT_TTY_AND_SIZE_CHANGE,
        ],
    );
    let out = cli.output(&[
        "run",
        "--hypervisor",
        "qemu",
        "-d",
        "--rootfs",
        &rootfs,
        "vtty2",
        "--",
        "sleep",
        "1000",
    ]);
    let removed = RemovedOnDrop(&cli, "vtty2");
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    terminal_is_the_containers_own_and_follows_a_resize(
        &cli,
        &[
            "exec",
            "-t",
            "vtty2",
            "--",
            "sh",
            "-c",
            PRINT_TTY_AND_SIZE_CHANGE,
        ],
    );
    std::mem::forget(removed);
    assert!(cli.output(&["rm", "-f", "vtty2"]).status.success());
    assert!(cli.root_entries().is_empty(), "{:?}", cli.root_entries());
    cli.assert_no_processes_left();
}

/// A refused request as the user reads it: one line naming the wire code
/// once, not the ttrpc `Status`'s debug form, and the cause once (`{:#}`
/// printing a cause that the layer above had already put in its message
/// used to double both).
fn assert_refused_once(out: &Output, code: &str, cause: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches(code).count(), 1, "{stderr}");
    assert_eq!(stderr.matches(cause).count(), 1, "{stderr}");
    assert!(
        !stderr.contains("Status {") && !stderr.contains("special_fields"),
        "{stderr}"
    );
}

#[test]
fn exec_of_a_missing_binary_names_the_code_and_the_cause_once() {
    let test = "exec_of_a_missing_binary_names_the_code_and_the_cause_once";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&["-d"], "exec-nope", &["sleep", "1000"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let out = cli.output(&["exec", "exec-nope", "--", "/bin/nope"]);
    assert_refused_once(&out, "INVALID_ARGUMENT", "/bin/nope");
    assert!(cli.output(&["rm", "-f", "exec-nope"]).status.success());
    cli.assert_no_processes_left();
}

#[test]
fn run_of_an_empty_rootfs_names_the_code_and_the_cause_once() {
    let test = "run_of_an_empty_rootfs_names_the_code_and_the_cause_once";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let empty = cli.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = cli.output(&[
        "run",
        "--hypervisor",
        "process",
        "--rootfs",
        empty.to_str().unwrap(),
        "empty-rootfs",
        "--",
        "true",
    ]);
    assert_refused_once(&out, "INVALID_ARGUMENT", "not found");
    assert!(cli.root_entries().is_empty(), "{:?}", cli.root_entries());
    cli.assert_no_processes_left();
}

#[test]
fn exec_into_and_kill_of_a_stopped_container_name_the_code_once() {
    let test = "exec_into_and_kill_of_a_stopped_container_name_the_code_once";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    let out = cli.run(&["-d"], "stopped", &["true"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli.ps_row("stopped")["status"] != "STOPPED" {
        assert!(
            Instant::now() < deadline,
            "stopped: {}",
            cli.ps_row("stopped")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cli.output(&["exec", "stopped", "--", "true"]);
    assert_refused_once(&out, "FAILED_PRECONDITION", "Exec stopped");
    let out = cli.output(&["kill", "stopped", "KILL"]);
    assert_refused_once(&out, "NOT_FOUND", "Kill stopped");
    assert!(cli.output(&["rm", "stopped"]).status.success());
    cli.assert_no_processes_left();
}

/// A hybrid vsock socket probed by 1100 connections that never send
/// `CONNECT` (more than the 1024 connections the backend serves) must not
/// lock the runtime out: `kestrel agent check` and `kestrel exec` still
/// work while all of them are held open, and the backend's log summarises
/// what it turned away instead of a line per connection.
#[test]
fn idle_hybrid_socket_connections_do_not_lock_out_exec_or_agent_check_in_a_qemu_vm() {
    let test = "idle_hybrid_socket_connections_do_not_lock_out_exec_or_agent_check_in_a_qemu_vm";
    let Some(image) = qemu_ready(test) else {
        return;
    };
    let cli = Cli::for_vm(&image);
    let rootfs = cli.rootfs.to_str().unwrap().to_string();
    let out = cli.output(&[
        "run",
        "--hypervisor",
        "qemu",
        "-d",
        "--rootfs",
        &rootfs,
        "idle",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    // A failed assertion must not leave the VM running.
    let guard = RemovedOnDrop(&cli, "idle");
    let sandbox = std::fs::read_dir(cli.dir.path().join("sandboxes"))
        .expect("sandboxes dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("vsock").exists())
        .expect("a sandbox with a hybrid vsock socket");
    let socket = sandbox.join("vsock");

    // 1100 client sockets and the CLI's own: more than a default soft limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .expect("raising RLIMIT_NOFILE");
    let idle: Vec<std::os::unix::net::UnixStream> = (0..1100)
        .map(|i| {
            std::os::unix::net::UnixStream::connect(&socket)
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();

    let started = Instant::now();
    let address = format!("hvsock://{}:1024", socket.display());
    let out = cli.output(&["agent", "check", "--timeout", "10", "--address", &address]);
    assert!(
        out.status.success(),
        "agent check with 1100 idle connections open: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("SERVING"),
        "{}",
        text(&out.stdout)
    );
    let out = cli.output(&["exec", "idle", "--", "sh", "-c", "echo through; exit 4"]);
    assert_eq!(text(&out.stdout), "through\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(4));
    eprintln!("{test}: check and exec took {:?}", started.elapsed());
    drop(idle);

    let log = std::fs::read_to_string(sandbox.join("vsock-backend.log")).unwrap_or_default();
    let summaries = log.lines().filter(|l| l.contains("turned away")).count();
    assert!(
        (1..=3).contains(&summaries),
        "expected a summary or two of the refused connections, got {summaries}:\n{log}"
    );

    std::mem::forget(guard);
    assert!(cli.output(&["rm", "-f", "idle"]).status.success());
    cli.assert_no_processes_left();
}

#[test]
fn lockdown_flags_are_enforced_in_process_sandboxes() {
    let test = "lockdown_flags_are_enforced_in_process_sandboxes";
    if !require(test) {
        return;
    }
    let cli = Cli::new("");
    lockdown_flags_are_enforced(&cli, "process");
    cli.assert_no_processes_left();
}

/// The same in a QEMU VM: the guest kernel's seccomp filters, and without
/// user namespaces in the guest an unfiltered `unshare -U` would fail with
/// EINVAL, not EPERM.
#[test]
fn lockdown_flags_are_enforced_in_a_qemu_vm() {
    let test = "lockdown_flags_are_enforced_in_a_qemu_vm";
    let Some(image) = qemu_ready(test) else {
        return;
    };
    let cli = Cli::for_vm(&image);
    lockdown_flags_are_enforced(&cli, "qemu");
}

/// `--cap-drop ALL`, the default capabilities, the default seccomp profile,
/// `--security-opt seccomp=PATH` and `--read-only`, one `run --rm` each.
fn lockdown_flags_are_enforced(cli: &Cli, hypervisor: &str) {
    let rootfs = cli.rootfs.to_str().unwrap().to_string();
    let run = |flags: &[&str], id: &str, script: &str| -> Output {
        let mut args = vec![
            "run",
            "--hypervisor",
            hypervisor,
            "--rm",
            "--rootfs",
            &rootfs,
        ];
        args.extend_from_slice(flags);
        args.extend([id, "--", "sh", "-c", script]);
        cli.output(&args)
    };
    let eperm = |out: &Output| {
        assert!(
            text(&out.stderr).contains("Operation not permitted"),
            "stdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    };

    let chown = "echo > /tmp/owned && busybox chown 1:1 /tmp/owned";
    let out = run(&["--cap-drop", "ALL"], "lock1", chown);
    eperm(&out);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&[], "lock2", chown);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = run(
        &[],
        "lock3",
        "echo hello; busybox unshare -U true; echo unshare=$?",
    );
    assert_eq!(text(&out.stdout), "hello\nunshare=1\n");
    eperm(&out);

    let profile = cli.dir.path().join("no-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let out = run(
        &["--security-opt", &opt],
        "lock4",
        "busybox mkdir /tmp/d; echo mkdir=$?; echo still here",
    );
    assert_eq!(text(&out.stdout), "mkdir=1\nstill here\n");
    eperm(&out);

    let out = run(
        &["--read-only"],
        "lock5",
        "echo x > /written; echo write=$?",
    );
    assert_eq!(text(&out.stdout), "write=1\n");
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
}
