//! Fixtures shared by Kestrel's end-to-end tests and benchmarks: finding the
//! workspace's binaries, a busybox rootfs, the agent in host mode, and OCI
//! specs for it.
//!
//! Tests that need something this machine lacks (root, busybox) call
//! [`require`] and return early after [`skip`] recorded why.

pub mod containerd;
pub mod cri;
pub mod guest_agent;
pub mod kata_wire;
pub mod netns;
pub mod shim;
pub mod vmm_memory;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_protocols::agent::{
    CreateContainerRequest, ReadStreamRequest, RemoveContainerRequest, StartContainerRequest,
    WaitProcessRequest,
};
use kestrel_protocols::agent_ttrpc::AgentServiceClient;
use kestrel_protocols::health_ttrpc::HealthClient;
use kestrel_protocols::oci;
use kestrel_protocols::ttrpc::{self, context, r#async::Client, Code};

/// Where Debian's busybox-static installs busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked into the test rootfs.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "hostname", "dd", "id", "ls", "stty", "tty",
    "head", "yes", "env", "pwd", "mount", "grep",
];

/// The file `scripts/test.sh` names for skip records: one line per skipped
/// test, `<test>\t<reason>`, so the summary can count and name them (cargo
/// shows nothing of what a passing test printed).
pub const SKIP_LOG_ENV: &str = "KESTREL_SKIP_LOG";

/// Records that `test` did not run and why: on stderr, and as a line in
/// the file [`SKIP_LOG_ENV`] names.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
    let Some(log) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let line = format!("{test}\t{}\n", why.replace(['\n', '\t'], " "));
    // One append per record: concurrent tests never interleave a line.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut file| std::io::Write::write_all(&mut file, line.as_bytes()));
    if let Err(e) = written {
        panic!(
            "recording the skip of {test} in {}: {e}",
            log.to_string_lossy()
        );
    }
}

/// Returns false, recording why, when the machine lacks what a test needs.
pub fn require(test: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("needs root (namespaces, mounts and cgroups)".to_string())
    } else if !Path::new(BUSYBOX).exists() {
        Some(format!("needs {BUSYBOX} (apt-get install busybox-static)"))
    } else {
        None
    };
    match missing {
        Some(why) => {
            skip(test, &why);
            false
        }
        None => true,
    }
}

/// Whether `program` is an executable file in a `PATH` directory.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A binary of this workspace, built beside the test executable
/// (`cargo build --workspace` puts it there).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// Builds a minimal busybox rootfs under `dir` and returns its path.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet link");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    root
}

/// An OCI spec running `args` in `rootfs` with the mounts `ctr` would give.
pub fn spec(rootfs: &Path, args: &[&str]) -> oci::Spec {
    let mut s = oci::Spec::new();
    s.Version = "1.1.0".into();
    let root = s.Root.mut_or_insert_default();
    root.Path = rootfs.to_string_lossy().into_owned();
    let p = s.Process.mut_or_insert_default();
    p.Args = args.iter().map(|a| a.to_string()).collect();
    p.Env = vec!["PATH=/bin".into(), "HOME=/root".into()];
    p.Cwd = "/".into();
    s.Hostname = "kestrel-test".into();
    let mounts: &[(&str, &str, &str, &[&str])] = &[
        ("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        (
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        (
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        ),
        (
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        (
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        (
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ];
    for (dest, ty, src, opts) in mounts {
        let mut m = oci::Mount::new();
        m.destination = dest.to_string();
        m.type_ = ty.to_string();
        m.source = src.to_string();
        m.options = opts.iter().map(|o| o.to_string()).collect();
        s.Mounts.push(m);
    }
    let linux = s.Linux.mut_or_insert_default();
    for ns in ["pid", "ipc", "uts", "mount", "cgroup"] {
        let mut n = oci::LinuxNamespace::new();
        n.Type = ns.into();
        linux.Namespaces.push(n);
    }
    s
}

/// A kestrel-agent running in host mode on a private socket; killed on drop.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub shared_dir: PathBuf,
    child: Child,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_binary(&binary("kestrel-agent"))
    }

    /// Starts a specific agent binary (the benchmark uses the static one).
    pub fn start_binary(program: &Path) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let shared_dir = dir.path().join("shared");
        let child = Command::new(program)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .arg("--shared-dir")
            .arg(&shared_dir)
            .arg("--log-level")
            .arg(std::env::var("KESTREL_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting kestrel-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "kestrel-agent did not start listening"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent {
            dir,
            socket,
            shared_dir,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> (AgentServiceClient, HealthClient) {
        let c = Client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .expect("connecting to the agent");
        (AgentServiceClient::new(c.clone()), HealthClient::new(c))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// No client-side timeout: for calls that block by design.
pub fn forever() -> context::Context {
    context::with_timeout(0)
}

/// A ten-second timeout for calls that should answer promptly.
pub fn prompt() -> context::Context {
    context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

/// The ttrpc code of an error, for asserting on it.
pub fn code(err: &ttrpc::Error) -> Code {
    match err {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

pub fn create_request(id: &str, spec: oci::Spec) -> CreateContainerRequest {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.exec_id = id.into();
    req.OCI = Some(spec).into();
    req
}

/// Reads a stream until the agent reports its end.
pub async fn read_all(
    client: &AgentServiceClient,
    id: &str,
    exec_id: &str,
    stderr: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut req = ReadStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.len = 64 * 1024;
        let r = if stderr {
            client.read_stderr(forever(), &req).await
        } else {
            client.read_stdout(forever(), &req).await
        };
        match r {
            Ok(resp) => out.extend(resp.data),
            Err(e) if code(&e) == Code::OUT_OF_RANGE => return out,
            Err(e) => panic!("reading output of {id}/{exec_id}: {e:?}"),
        }
    }
}

pub async fn start(client: &AgentServiceClient, id: &str) {
    let mut req = StartContainerRequest::new();
    req.container_id = id.into();
    client
        .start_container(prompt(), &req)
        .await
        .expect("StartContainer");
}

pub async fn wait(client: &AgentServiceClient, id: &str, exec_id: &str) -> ttrpc::Result<i32> {
    let mut req = WaitProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    client.wait_process(forever(), &req).await.map(|r| r.status)
}

pub async fn remove(client: &AgentServiceClient, id: &str) -> ttrpc::Result<()> {
    let mut req = RemoveContainerRequest::new();
    req.container_id = id.into();
    req.timeout = 10;
    client.remove_container(prompt(), &req).await.map(drop)
}

/// Creates and starts a container, collects stdout and stderr, waits for
/// its exit and removes it.
pub async fn run(client: &AgentServiceClient, id: &str, spec: oci::Spec) -> (String, String, i32) {
    client
        .create_container(prompt(), &create_request(id, spec))
        .await
        .expect("CreateContainer");
    start(client, id).await;
    let (out, err) = tokio::join!(
        read_all(client, id, "", false),
        read_all(client, id, "", true)
    );
    let status = wait(client, id, "").await.expect("WaitProcess");
    remove(client, id).await.expect("RemoveContainer");
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        status,
    )
}

/// The directories the agent uses for container `id`'s cgroup by default.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join("kestrel").join(id)];
    }
    ["memory", "cpu", "cpuacct", "pids", "freezer", "cpuset"]
        .iter()
        .map(|c| root.join(c))
        .filter(|p| p.is_dir())
        .map(|p| p.join("kestrel").join(id))
        .collect()
}

/// Whether the container's cgroup reads as frozen.
pub fn cgroup_frozen(id: &str) -> bool {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        let events = std::fs::read_to_string(root.join("kestrel").join(id).join("cgroup.events"))
            .unwrap_or_default();
        events.lines().any(|l| l == "frozen 1")
    } else {
        let state =
            std::fs::read_to_string(root.join("freezer/kestrel").join(id).join("freezer.state"))
                .unwrap_or_default();
        state.trim() == "FROZEN"
    }
}

/// Lines of the host's mount table that mention `path`.
pub fn mounts_under(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Whether `path` is an ELF executable without a program interpreter,
/// i.e. statically linked.
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    Ok(kestrel_guest_image::is_static_elf(&std::fs::read(path)?))
}

/// The statically linked release agent that goes into the guest image,
/// built with `RUSTFLAGS="-C target-feature=+crt-static" cargo build
/// --release --target x86_64-unknown-linux-gnu -p kestrel-agent`.
pub fn static_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let target = exe
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))?;
    let path = target.join("x86_64-unknown-linux-gnu/release/kestrel-agent");
    path.exists().then_some(path)
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A process's resident set size in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The guest image's files, as `kestrel image build --json` names them.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (or reuses, from the user's cache) the guest image with the
/// workspace's static agent. `None`, with the reason printed, where it
/// cannot be built.
pub fn guest_image(test: &str) -> Option<GuestImage> {
    let Some(agent) = static_agent() else {
        skip(test, "needs the static agent (./scripts/test.sh builds it)");
        return None;
    };
    let output = std::process::Command::new(binary("kestrel"))
        .args(["image", "build", "--json", "--agent"])
        .arg(agent)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running kestrel image build");
    if !output.status.success() {
        skip(
            test,
            &format!(
                "kestrel image build failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        );
        return None;
    }
    let paths: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("kestrel image build --json prints JSON");
    let path = |key: &str| PathBuf::from(paths[key].as_str().expect("a path"));
    Some(GuestImage {
        vmlinux: path("vmlinux"),
        bzimage: path("bzimage"),
        initrd: path("initrd"),
    })
}

/// A do-nothing x86_64 kernel: a vmlinux-shaped ELF64 whose one segment,
/// loaded and entered at 16 MiB, is `jmp .`, so the guest spins until the
/// VMM is stopped. It boots in no time, and without the guest image.
pub fn spinning_kernel(dir: &Path) -> PathBuf {
    const PADDR: u64 = 0x100_0000;
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    const CODE: [u8; 2] = [0xeb, 0xfe];
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    // 64-bit, little-endian, ELF version 1, System V ABI, padding.
    elf.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&PADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&[0; 6]); // no section headers
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&u64::from(EHDR_SIZE + PHDR_SIZE).to_le_bytes()); // offset
    elf.extend_from_slice(&PADDR.to_le_bytes()); // vaddr
    elf.extend_from_slice(&PADDR.to_le_bytes()); // paddr
    elf.extend_from_slice(&(CODE.len() as u64).to_le_bytes()); // filesz
    elf.extend_from_slice(&(CODE.len() as u64).to_le_bytes()); // memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(&CODE);
    let path = dir.join("spin.elf");
    std::fs::write(&path, elf).expect("writing the spinning kernel");
    path
}

/// Deterministic pseudo-random bytes (xorshift): a misplaced chunk shows,
/// and nothing on the way can shortcut them as it could zeros.
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a test that boots a VM under QEMU needs: root, QEMU and the guest
/// image. `None`, with the skip recorded, when one is missing.
pub fn qemu_ready(test: &str) -> Option<GuestImage> {
    if !require(test) {
        return None;
    }
    if !on_path("qemu-system-x86_64") {
        skip(
            test,
            "needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
        );
        return None;
    }
    guest_image(test)
}

/// Holds the machine for one of the 12336 load scenarios (150 `ctr task ls`
/// loops against six sandboxes) until dropped. Each scenario is a load test
/// of its own: two at once (a QEMU one on the host beside a kestrel-vmm one
/// in the nested L1, both TCG-emulated on the same two cores) only measure
/// each other, and State's 2 s deadline is what they check. Taken before a
/// test re-runs itself in L1; inside L1 the file is L1's own.
pub fn one_load_scenario_at_a_time() -> nix::fcntl::Flock<std::fs::File> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("kestrel-load-scenario.lock"))
        .expect("opening the load-scenario lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking the load-scenario lock file")
}

/// Set inside the L1 VM of [`run_in_nested_kvm`], so a test run there does
/// not try to nest again.
pub const NESTED_ENV: &str = "KESTREL_IN_NESTED_KVM";

/// For a test that needs KVM backed by hardware, on a host whose KVM is
/// emulated: runs this same test (`test`, in this test binary) again inside
/// `scripts/nested-kvm.sh`'s L1 VM, where KVM is native, and returns
/// whether it passed there with what it printed. [`Nested::RunHere`] inside
/// L1; [`Nested::Skipped`], with the skip recorded, only when QEMU, which
/// the harness needs, is missing.
pub fn run_in_nested_kvm(test: &str) -> Nested {
    if std::env::var_os(NESTED_ENV).is_some() {
        return Nested::RunHere;
    }
    if !on_path("qemu-system-x86_64") {
        skip(
            test,
            "KVM here cannot run guest user space, and the nested-KVM harness needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
        );
        return Nested::Skipped;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // One L1 at a time: each is a CPU-bound TCG thread with 2 GiB, and
    // tests run in parallel; side by side they only slow each other down
    // (and the guests' timing-bound assertions with them).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("kestrel-nested-kvm.lock"))
        .expect("opening the nested-KVM lock file");
    let _one_at_a_time = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking the nested-KVM lock file");
    let args = [
        exe.display().to_string(),
        test.to_string(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let mut text = String::new();
    // A frozen L1 (the script's 124: its kernel stopped running, QEMU still
    // up) is QEMU TCG's nested-SVM emulation failing, not the code under
    // test, which runs as L1 user space and cannot stop L1's kernel: the
    // run is tried once more, with the first picture kept in the output.
    for _ in 0..2 {
        // 3 GiB: the 12336 scenario runs six 256 MiB guests beside
        // containerd, debug-build shims and 150 ctr loops.
        let output = nested_kvm_command(Some(NESTED_TEST_MEMORY_MIB), &args)
            // A hang in L1 ends the run with every L1 process's state and
            // wchan, instead of holding CI until its own limit.
            .env("KESTREL_NESTED_TIMEOUT", NESTED_TEST_LIMIT_S.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("running scripts/nested-kvm.sh");
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        if output.status.code() == Some(L1_FROZE) {
            text.push_str("\n(L1 froze: running the test in a fresh L1)\n");
            continue;
        }
        // libtest's own verdict line, so a harness that ran nothing fails;
        // and a test that skipped in L1 did not pass there.
        let passed = output.status.success()
            && text.contains("test result: ok. 1 passed")
            && !text.contains(&format!("SKIP {test}:"));
        return Nested::Ran {
            passed,
            output: text,
        };
    }
    Nested::Ran {
        passed: false,
        output: text,
    }
}

/// `scripts/nested-kvm.sh` running `args` inside its L1 VM (with
/// `memory_mib` of RAM, else the script's default), marked with
/// [`NESTED_ENV`] so that what runs there does not try to nest again, and
/// with this process's `XDG_CACHE_HOME`, where the guest image is found.
/// L1 inherits no other environment; `args` go to env(1), so they may
/// start with `NAME=VALUE` settings.
pub fn nested_kvm_command(memory_mib: Option<u32>, args: &[String]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nested-kvm.sh");
    let mut command = Command::new(script);
    if let Some(mib) = memory_mib {
        command.arg("--memory").arg(mib.to_string());
    }
    command.args(["--", "env", &format!("{NESTED_ENV}=1")]);
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
        command.arg(format!("XDG_CACHE_HOME={}", cache.to_string_lossy()));
    }
    command.args(args);
    command
}

/// How long a test may run inside L1 (the longest, the builtin 12336
/// scenario, takes about 200–370 s).
const NESTED_TEST_LIMIT_S: u32 = 900;

/// `scripts/nested-kvm.sh`'s exit status when L1's kernel stopped running.
const L1_FROZE: i32 = 124;

/// L1's memory for tests.
const NESTED_TEST_MEMORY_MIB: u32 = 3072;

/// What [`run_in_nested_kvm`] did.
#[derive(Debug)]
pub enum Nested {
    /// KVM is native or this is L1: run the test's body here.
    RunHere,
    /// The harness cannot run here; the skip is recorded.
    Skipped,
    /// The test ran in L1.
    Ran { passed: bool, output: String },
}

/// The `[agent]` section of VM tests' configurations: Kata's 10 s dial
/// timeout is too short for a boot under TCG beside other tests' VMs, or in
/// the nested-KVM harness's L1, where every guest shares one emulated CPU
/// with the guests already running (the sixth of the 12336 scenario boots
/// far slower than the first).
pub const SLOW_BOOT_AGENT_SECTION: &str = "[agent]\ndial_timeout_ms = 120000\n";

/// For a test whose body boots guests with the builtin VMM: `true` when the
/// body should run here (KVM runs guest user space: hardware KVM, or inside
/// the nested harness's L1); otherwise the test has been run again in L1
/// (and has passed there: this asserts it) or skipped, and `false` says so.
pub fn kvm_runs_guests_here(test: &str) -> bool {
    use kestrel_hypervisor::backend::select::{kvm_support, KvmSupport};
    if matches!(kvm_support(), KvmSupport::Native(_)) {
        return true;
    }
    match run_in_nested_kvm(test) {
        Nested::RunHere => panic!(
            "KVM in the nested-KVM harness is not native: {:?}",
            kvm_support()
        ),
        Nested::Skipped => false,
        Nested::Ran { passed, output } => {
            assert!(passed, "in the nested-KVM harness:\n{output}");
            false
        }
    }
}
