//! A private containerd for end-to-end tests: its own root, state and
//! sockets under a temp dir, the Kestrel shim on its PATH, and a Kestrel
//! configuration that puts sandboxes under the same temp dir.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, mounts_under, skip};

/// Returns false, printing why, when containerd or ctr is missing.
pub fn available(test: &str) -> bool {
    for tool in ["containerd", "ctr"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            skip(test, &format!("needs {tool} (apt-get install containerd)"));
            return false;
        }
    }
    true
}

pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub address: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd and waits until it answers; Kestrel runs process
    /// sandboxes (the agent on the host).
    pub fn start() -> Containerd {
        Containerd::start_configured("hypervisor = \"process\"", "")
    }

    /// Starts containerd with `sandbox_keys` added to Kestrel's `[sandbox]`
    /// section and `extra` sections after it.
    pub fn start_configured(sandbox_keys: &str, extra: &str) -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let address = d.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{address}\"\n[ttrpc]\n  address = \"{address}.ttrpc\"\n\
             [debug]\n  level = \"info\"\n{timeouts}",
            root = d.join("root").display(),
            state = d.join("state").display(),
            address = address.display(),
            timeouts = nested_timeouts(),
        );
        std::fs::write(d.join("containerd.toml"), config).expect("containerd config");
        let kestrel = format!(
            "[sandbox]\nagent_path = \"{agent}\"\nstate_dir = \"{dir}\"\n{sandbox_keys}\n{extra}\n",
            agent = binary("kestrel-agent").display(),
            dir = d.join("sandboxes").display(),
        );
        std::fs::write(d.join("kestrel.toml"), kestrel).expect("kestrel config");
        let shim_dir = binary("containerd-shim-kestrel-v2")
            .parent()
            .unwrap()
            .to_path_buf();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = d.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", path)
            .env("KESTREL_CONFIG", d.join("kestrel.toml"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            )
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            dir,
            address,
            log,
            child,
        };
        // Generous: in the nested-KVM harness containerd starts under TCG.
        let deadline = Instant::now() + Duration::from_secs(90);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `ctr --address … args`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("running ctr")
    }

    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        // ctr gives up dialling after 10 s by default; under the
        // nested-KVM harness's TCG, with the 12336 load, that is too soon.
        cmd.arg("--address")
            .arg(&self.address)
            .args(["--connect-timeout", "120s"])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// The kata-containers issue 12336 scenario on running containers
    /// `ids`: under 150 background loops of `ctr task ls`, each is SIGKILLed
    /// and deleted; containerd must never have logged "failed to find
    /// container" or "get state for", nor any error (a normal teardown is
    /// not one), and nothing may be left.
    pub fn force_delete_under_task_ls_load(&self, ids: &[String]) {
        let load = self.task_ls_load(150);
        std::thread::sleep(Duration::from_secs(2));
        for id in ids {
            self.kill_and_delete(id);
        }
        std::thread::sleep(Duration::from_secs(1));
        drop(load);
        let log = self.log_text();
        assert!(!log.contains("failed to find container"), "{log}");
        assert!(!log.contains("get state for"), "{log}");
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("level=error") && !closed_client_got_a_reply(l))
            .collect();
        assert_eq!(errors, Vec::<&str>::new(), "errors in containerd's log");
        self.assert_nothing_left();
    }

    /// Starts `loops` shell loops running `ctr task ls` back to back, as in
    /// kata-containers issue 12336; they stop when the value is dropped.
    pub fn task_ls_load(&self, loops: usize) -> TaskLsLoad {
        TaskLsLoad::start(&self.address, "default", loops, None)
    }

    /// `ctr run` in the foreground: (stdout, exit code).
    pub fn run(&self, rootfs: &str, id: &str, args: &[&str]) -> (String, i32) {
        let out = self.ctr(&run_argv(false, rootfs, id, args));
        (text(&out.stdout), out.status.code().unwrap_or(-1))
    }

    /// The spec `ctr` would make for `args` in `rootfs`, as JSON to edit
    /// (hooks, annotations) before [`Containerd::run_spec`].
    pub fn default_spec(&self, rootfs: &str, args: &[&str]) -> serde_json::Value {
        let out = self.ctr(&["oci", "spec"]);
        assert!(out.status.success(), "ctr oci spec: {}", text(&out.stderr));
        let mut spec: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ctr oci spec");
        spec["root"]["path"] = rootfs.into();
        spec["process"]["args"] = serde_json::json!(args);
        spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
        // `ctr run` appends the id to the cgroup path; a spec file is taken
        // as it is, and every container would share "/default". Empty: the
        // agent's own per-container cgroup.
        spec["linux"]["cgroupsPath"] = "".into();
        spec
    }

    /// `ctr run --config FILE ID` with `spec` in FILE: the whole bundle
    /// config as the test wrote it, hooks included.
    pub fn run_spec(&self, detach: bool, id: &str, spec: &serde_json::Value) -> Output {
        let file = self.path().join(format!("{id}.spec.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(spec).expect("spec JSON"))
            .expect("spec file");
        let file = file.display().to_string();
        let mut argv = vec!["run"];
        if detach {
            argv.push("-d");
        }
        argv.extend(["--runtime", RUNTIME, "--config", file.as_str(), id]);
        self.ctr(&argv)
    }

    /// The bundle directory containerd gives the shim for task `id`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.path()
            .join("state/io.containerd.runtime.v2.task/default")
            .join(id)
    }

    pub fn run_detached(&self, rootfs: &str, id: &str, args: &[&str]) {
        let out = self.ctr(&run_argv(true, rootfs, id, args));
        assert!(
            out.status.success(),
            "ctr run -d {id}: {}\n{}",
            text(&out.stderr),
            self.log_text()
        );
    }

    /// Deletes a task once its exit is recorded (containerd refuses to delete
    /// a running task), then its container.
    pub fn delete(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.ctr(&["task", "delete", id]);
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
        let out = self.ctr(&["container", "delete", id]);
        assert!(
            out.status.success(),
            "ctr container delete {id}: {}",
            text(&out.stderr)
        );
    }

    /// `ctr task exec --exec-id EXEC_ID ID ARGS...`, in the foreground.
    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Output {
        let mut argv = vec!["task", "exec", "--exec-id", exec_id, id];
        argv.extend_from_slice(args);
        self.ctr(&argv)
    }

    /// SIGKILLs a task, then deletes it and its container.
    pub fn kill_and_delete(&self, id: &str) {
        let kill = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(
            kill.status.success(),
            "ctr task kill {id}: {}",
            text(&kill.stderr)
        );
        self.delete(id);
    }

    pub fn assert_nothing_left(&self) {
        let tasks = text(&self.ctr(&["task", "ls", "-q"]).stdout);
        assert_eq!(tasks.trim(), "", "tasks left");
        let containers = text(&self.ctr(&["container", "ls", "-q"]).stdout);
        assert_eq!(containers.trim(), "", "containers left");
        assert_processes_end(
            || self.leftover_processes(),
            Duration::from_secs(10),
            "shim or agent processes left",
        );
        let sandboxes = self.path().join("sandboxes");
        let left: Vec<_> = std::fs::read_dir(&sandboxes)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!(left, Vec::<std::path::PathBuf>::new(), "sandbox state left");
        assert_eq!(
            mounts_under(self.path()),
            Vec::<String>::new(),
            "mounts left"
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILLs this containerd's one Kestrel shim, then waits, up to
    /// `within`, until containerd has noticed, run the shim's `delete` (which
    /// kills the sandbox) and dropped task `id`.
    pub fn kill_the_shim_and_await_task_gone(&self, id: &str, within: Duration) {
        let address = self.address.display().to_string();
        let shims: Vec<u32> = self
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-kestrel-v2") && cmd.contains(&address))
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(shims.len(), 1, "{:?}", self.leftover_processes());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shims[0] as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("killing the shim");
        let deadline = Instant::now() + within;
        while text(&self.ctr(&["task", "ls", "-q"]).stdout).contains(id) {
            assert!(
                Instant::now() < deadline,
                "containerd kept the task of a dead shim:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of processes whose command line mentions this containerd's
    /// directory: shims (their -address) and agents (their socket).
    pub fn leftover_processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(self.path(), self.child.id())
    }
}

/// Waits up to `within` for `scan` to find no process (shims exit after
/// containerd's Shutdown: they get a moment), then asserts it finds none.
pub fn assert_processes_end(scan: impl Fn() -> Vec<(u32, String)>, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while !scan().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(scan(), vec![], "{what}");
}

/// Live processes other than this one and `except` whose command line
/// mentions `dir`, `ctr` clients left out: what a test's shims, agents and
/// VMs leave behind (their sockets and state live under the test's dir).
pub fn processes_mentioning(dir: &Path, except: u32) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || pid == except {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if cmdline.contains(&needle) && !cmdline.starts_with("ctr ") && !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

/// `ctr events`, subscribed: the lines it printed so far, read as they come.
pub struct Events {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Events {
    /// Starts `ctr events` on `c` and returns once it is subscribed: it has
    /// printed the event of a namespace label this sets. A fixed pause is
    /// not enough where ctr starts slowly (under TCG), and an event
    /// published before the subscription is lost.
    pub fn subscribe(c: &Containerd) -> Events {
        use std::io::BufRead;
        let mut child = c
            .ctr_command(&["events"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("ctr events");
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        let events = Events { child, lines };
        let deadline = Instant::now() + Duration::from_secs(60);
        for probe in 0.. {
            let label = format!("kestrel-test-probe={probe}");
            let printed = format!("\"kestrel-test-probe\":\"{probe}\"");
            let out = c.ctr(&["namespaces", "label", "default", &label]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let seen = Instant::now() + Duration::from_millis(500);
            while Instant::now() < seen {
                if events.seen(|l| l.contains("/namespaces/update") && l.contains(&printed)) {
                    return events;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(Instant::now() < deadline, "ctr events never subscribed");
        }
        unreachable!()
    }

    /// Whether a line printed so far matches.
    pub fn seen(&self, matches: impl Fn(&str) -> bool) -> bool {
        self.lines.lock().unwrap().iter().any(|l| matches(l))
    }

    /// Waits up to `timeout` for a matching line; all lines on failure.
    pub fn wait_for(
        &self,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.seen(&matches) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(self.lines.lock().unwrap().join("\n"))
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a log line is containerd's own ttrpc client (1.6) reporting a
/// reply that reached it after it had closed its connection to a shim: it
/// closes the connection once Shutdown returns, while `ctr task ls` State
/// calls sent just before are still being answered. Any shim's reply can
/// race that close; it says nothing about the shim or the sandbox.
pub fn closed_client_got_a_reply(line: &str) -> bool {
    line.contains("msg=\"ttrpc: failed to look up active call: ttrpc: closed\"")
}

/// Background `ctr task ls` loops, stopped on drop: those with a stop
/// file finish their current ctr first, the others are killed with it.
pub struct TaskLsLoad {
    loops: Vec<Child>,
    stop_file: Option<PathBuf>,
}

impl TaskLsLoad {
    /// `loops` shell loops of `ctr -n NAMESPACE task ls` on the containerd
    /// at `address`. With `stderr_dir`, loop N appends what ctr printed on
    /// stderr to `stderr_dir/task-ls-N.log`, for the test to read, and the
    /// loops stop after their current ctr once `stderr_dir/stop` exists: a
    /// ctr killed in the middle of a State call makes containerd log `get
    /// state for <id>: context canceled`, which is no runtime's doing.
    pub fn start(
        address: &Path,
        namespace: &str,
        loops: usize,
        stderr_dir: Option<&Path>,
    ) -> TaskLsLoad {
        // In the nested-KVM harness's L1 everything shares one emulated
        // CPU: at equal priority the loops starve the teardown they race
        // against (and containerd's 5 s limit on a shim's delete action
        // kills it). There they run as SCHED_IDLE (nice 19 is not enough:
        // 150 of them still outweigh everything else); they still keep
        // containerd and the shims busy answering State.
        let idle: &[&str] = if std::env::var_os(crate::NESTED_ENV).is_some() {
            &["chrt", "--idle", "0"]
        } else {
            &[]
        };
        let stop_file = stderr_dir.map(|dir| dir.join("stop"));
        let condition = match &stop_file {
            Some(file) => format!("[ ! -e {} ]", file.display()),
            None => ":".into(),
        };
        let children = (0..loops)
            .map(|n| {
                let stderr = match stderr_dir {
                    Some(dir) => format!("2>>{}/task-ls-{n}.log", dir.display()),
                    None => "2>/dev/null".into(),
                };
                let script = format!(
                    "while {condition}; do ctr --address {} --connect-timeout 120s -n {namespace} task ls >/dev/null {stderr}; done",
                    address.display()
                );
                Command::new("env")
                    .args(idle)
                    .args(["sh", "-c", &script])
                    .stdin(Stdio::null())
                    .process_group(0)
                    .spawn()
                    .expect("starting a task ls loop")
            })
            .collect();
        TaskLsLoad {
            loops: children,
            stop_file,
        }
    }
}

impl Drop for TaskLsLoad {
    fn drop(&mut self) {
        if let Some(file) = &self.stop_file {
            let _ = std::fs::write(file, b"");
            let deadline = Instant::now() + Duration::from_secs(60);
            for child in &mut self.loops {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for child in &mut self.loops {
            if let Ok(Some(_)) = child.try_wait() {
                continue;
            }
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for (pid, _) in self.leftover_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The runtime name containerd knows Kestrel by.
pub const RUNTIME: &str = "io.containerd.kestrel.v2";

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn run_argv<'a>(detach: bool, rootfs: &'a str, id: &'a str, args: &[&'a str]) -> Vec<&'a str> {
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

/// containerd's `[timeouts]` for a test containerd. containerd gives the
/// shim's delete action 5 s after every shim exit; in the nested-KVM L1 (one
/// emulated CPU shared with six guests and 150 ctr loops) starting it alone
/// can take longer, and containerd then kills it: there it gets 60 s.
pub fn nested_timeouts() -> &'static str {
    if std::env::var_os(crate::NESTED_ENV).is_some() {
        "[timeouts]\n  \"io.containerd.timeout.shim.cleanup\" = \"60s\"\n"
    } else {
        ""
    }
}
