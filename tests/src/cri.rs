//! A private containerd with its CRI plugin, for tests that drive pods the
//! way kubelet does (through [`kestrel_cri`]).
//!
//! containerd runs inside a network namespace the test made (entered with
//! `nsenter --net=…`: `ip netns exec` would remount /sys and hide the
//! cgroup mounts), with its root, state, sockets, CNI config, pod logs and
//! Kestrel's sandbox state under one temp dir. Pods get a CNI bridge in that
//! namespace (Debian's containernetworking-plugins). Images are made here,
//! offline: a busybox-static image and a pause image (the same layer, an
//! entrypoint that sleeps forever) written as OCI image layouts and
//! imported with `ctr -n k8s.io images import`.
//!
//! Runtime handlers: `runc`, `kestrel` (QEMU, when the test gives a guest
//! image) and `kestrel-process` (the agent on the host), each Kestrel one
//! with its own `ConfigPath` in the runtime options.

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kestrel_cri::api::{ContainerConfig, ContainerState, ContainerStatus, PodSandboxConfig};
use kestrel_cri::{config, CriClient, CriError, ExecOutput};

use crate::containerd::{processes_mentioning, text};
use crate::{binary, mounts_under, require, skip, GuestImage, SLOW_BOOT_AGENT_SECTION};

/// The image every test container runs: busybox-static with all its applets.
pub const BUSYBOX_IMAGE: &str = "docker.io/kestrel-test/busybox:1";
/// containerd's `sandbox_image`: the busybox layer, sleeping forever.
pub const PAUSE_IMAGE: &str = "docker.io/kestrel-test/pause:1";
/// containerd's namespace for CRI.
pub const NAMESPACE: &str = "k8s.io";

/// The runtime handlers this containerd knows.
pub const RUNC: &str = "runc";
pub const KESTREL_QEMU: &str = "kestrel";
pub const KESTREL_PROCESS: &str = "kestrel-process";
/// kestrel-vmm sandboxes: only where KVM runs guests (the nested-KVM
/// harness's L1 on these machines).
pub const KESTREL_BUILTIN: &str = "kestrel-builtin";

/// The CNI plugins the pod network needs, from containernetworking-plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// Returns false, recording why, when the machine lacks what a CRI test
/// needs: root, busybox, containerd and ctr, runc, iproute2, nsenter and
/// the CNI plugins.
pub fn available(test: &str) -> bool {
    if !require(test) {
        return false;
    }
    for (tool, package) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("tar", "tar"),
        ("gzip", "gzip"),
        ("sha256sum", "coreutils"),
    ] {
        if !crate::on_path(tool) {
            skip(test, &format!("needs {tool} (apt-get install {package})"));
            return false;
        }
    }
    for plugin in CNI_PLUGINS {
        if !Path::new(CNI_BIN_DIR).join(plugin).exists() {
            skip(
                test,
                &format!(
                    "needs the CNI plugin {CNI_BIN_DIR}/{plugin} (apt-get install containernetworking-plugins)"
                ),
            );
            return false;
        }
    }
    true
}

/// What a test on `handler` needs, or `None` with the skip recorded: the
/// CRI tools, and the guest image for the VM handlers. On a host whose KVM
/// cannot run guests, `kestrel-builtin` runs the test in the nested-KVM
/// harness's L1 and returns `None` here.
pub fn ready(test: &str, handler: &str) -> Option<Option<GuestImage>> {
    if handler == KESTREL_BUILTIN && !crate::kvm_runs_guests_here(test) {
        return None;
    }
    if !available(test) {
        return None;
    }
    match handler {
        KESTREL_QEMU => crate::qemu_ready(test).map(Some),
        KESTREL_BUILTIN => crate::guest_image(test).map(Some),
        _ => Some(None),
    }
}

/// containerd with CRI in a network namespace of its own; on drop every
/// pod is removed, containerd stopped and the namespace deleted (and, if
/// the test is failing, the end of containerd's log printed).
pub struct CriContainerd {
    pub dir: tempfile::TempDir,
    /// containerd's gRPC socket: the CRI endpoint.
    pub address: PathBuf,
    pub log: PathBuf,
    /// The network namespace's name (`ip netns`).
    pub netns: String,
    child: Option<Child>,
    runtime: tokio::runtime::Runtime,
    client: CriClient,
}

impl CriContainerd {
    /// Starts containerd; `image` (the guest image) enables the `kestrel`
    /// handler's QEMU sandboxes.
    pub fn start(image: Option<&GuestImage>) -> CriContainerd {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // In the nested-KVM harness's L1, /tmp is on the overlay over the
        // host's files, which overlayfs refuses as an upper layer: the
        // snapshotter's layers go on L1's own tmpfs there.
        let dir = if std::env::var_os(crate::NESTED_ENV).is_some() {
            tempfile::tempdir_in("/run")
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir");
        let d = dir.path().to_path_buf();
        let netns = format!("kcri-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &netns]));
        run_ok(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]));

        // The subnet is only seen inside the namespace; a different one per
        // harness keeps logs unambiguous when tests run side by side.
        let subnet = format!("10.88.{}.0/24", (std::process::id() + n) % 250);
        std::fs::create_dir_all(d.join("cni")).expect("cni dir");
        std::fs::write(
            d.join("cni/10-kestrel-test.conflist"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "kestrel-test",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "kcri0",
                        "isGateway": true,
                        "ipMasq": false,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{ "subnet": subnet }]],
                            "dataDir": d.join("cni-ipam").display().to_string(),
                        },
                    },
                    { "type": "loopback" },
                ],
            }))
            .unwrap(),
        )
        .expect("cni conflist");

        let agent = binary("kestrel-agent");
        let kestrel_config = |name: &str, sandbox: &str| {
            let path = d.join(format!("kestrel-{name}.toml"));
            let vm = match image {
                Some(image) => format!(
                    "[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
                    image.vmlinux.display(),
                    image.initrd.display()
                ),
                None => String::new(),
            };
            std::fs::write(
                &path,
                format!(
                    "[sandbox]\n{sandbox}\nagent_path = \"{}\"\nstate_dir = \"{}\"\n\n{SLOW_BOOT_AGENT_SECTION}\n{vm}",
                    agent.display(),
                    d.join(format!("sb-{name}")).display(),
                ),
            )
            .expect("kestrel config");
            path
        };
        let qemu_config = kestrel_config("qemu", "hypervisor = \"qemu\"");
        let process_config = kestrel_config("process", "hypervisor = \"process\"");
        let builtin_config = kestrel_config("builtin", "hypervisor = \"builtin\"");

        let address = d.join("containerd.sock");
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let runtimes = format!("{cri}.containerd.runtimes");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "info"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{runtimes}.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtimes}.{KESTREL_QEMU}]
  runtime_type = "{runtime}"
[{runtimes}.{KESTREL_QEMU}.options]
  ConfigPath = "{qemu_config}"
[{runtimes}.{KESTREL_PROCESS}]
  runtime_type = "{runtime}"
[{runtimes}.{KESTREL_PROCESS}.options]
  ConfigPath = "{process_config}"
[{runtimes}.{KESTREL_BUILTIN}]
  runtime_type = "{runtime}"
[{runtimes}.{KESTREL_BUILTIN}.options]
  ConfigPath = "{builtin_config}"
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni}"
  max_conf_num = 1
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            address = address.display(),
            runtime = crate::containerd::RUNTIME,
            qemu_config = qemu_config.display(),
            process_config = process_config.display(),
            builtin_config = builtin_config.display(),
            cni = d.join("cni").display(),
        ) + crate::containerd::nested_timeouts();
        std::fs::write(d.join("containerd.toml"), config).expect("containerd config");

        let log = d.join("containerd.log");
        let child = spawn_containerd(&d, &netns, &log);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = connect(&runtime, &address, &log);
        let c = CriContainerd {
            dir,
            address,
            log,
            netns,
            child: Some(child),
            runtime,
            client,
        };
        c.import_images();
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stops containerd and starts it again on the same root and state:
    /// CRI rebuilds its view from containerd's metadata. containerd 1.6
    /// cannot remove a pod one of whose containers was deleted behind
    /// CRI's back (RemovePodSandbox answers NOT_FOUND for that container
    /// for ever); after a restart CRI no longer knows the container, and
    /// the pod can be removed.
    pub fn restart(&mut self) {
        self.stop_containerd();
        self.child = Some(spawn_containerd(self.dir.path(), &self.netns, &self.log));
        self.client = connect(&self.runtime, &self.address, &self.log);
    }

    pub fn client(&self) -> &CriClient {
        &self.client
    }

    /// Runs a CRI call (or any future) to completion.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// `ctr --address … -n k8s.io ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["--connect-timeout", "120s", "-n", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// containerd's `level=error` lines.
    pub fn log_errors(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("level=error"))
            .map(str::to_string)
            .collect()
    }

    /// A pod config named `name` (unique uid), its container logs under
    /// this harness's `logs/NAME`.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let uid = format!("uid-{name}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut pod = config::pod(name, "default", &uid);
        let logs = self.path().join("logs").join(name);
        pod.log_directory = logs.display().to_string();
        pod
    }

    /// RunPodSandbox, asserting success.
    pub fn run_pod(&self, pod: &PodSandboxConfig, handler: &str) -> String {
        self.block_on(self.client.run_pod_sandbox(pod.clone(), handler))
            .unwrap_or_else(|e| panic!("RunPodSandbox on {handler}: {e}"))
    }

    /// CreateContainer + StartContainer, asserting success; the container's id.
    pub fn run_container(
        &self,
        pod_id: &str,
        pod: &PodSandboxConfig,
        container: ContainerConfig,
    ) -> String {
        let name = container.metadata.clone().unwrap_or_default().name;
        let id = self
            .block_on(self.client.create_container(pod_id, container, pod.clone()))
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"));
        self.block_on(self.client.start_container(&id))
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        id
    }

    pub fn container_status(&self, id: &str) -> ContainerStatus {
        self.block_on(self.client.container_status(id))
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
    }

    /// Waits up to `timeout` for container `id` to be in `state`.
    pub fn wait_for_state(
        &self,
        id: &str,
        state: ContainerState,
        timeout: Duration,
    ) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(id);
            if status.state == state as i32 {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} is not {state:?} after {timeout:?}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// ExecSync of `cmd` in `id` (60 s at most), asserting the call succeeded.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> ExecOutput {
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        self.block_on(
            self.client
                .exec_sync(id, &cmd, Some(Duration::from_secs(60))),
        )
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
    }

    /// ExecSync's stdout, asserting exit code 0.
    pub fn exec_stdout(&self, id: &str, cmd: &[&str]) -> String {
        let out = self.exec(id, cmd);
        assert_eq!(
            out.exit_code,
            0,
            "{cmd:?} in {id}: stdout {:?}, stderr {:?}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// StopPodSandbox then RemovePodSandbox. Returns RemovePodSandbox's
    /// error: containerd 1.6 answers NOT_FOUND for containers deleted
    /// behind CRI's back (with `ctr`), with runc as with any runtime.
    pub fn stop_and_remove_pod(&self, pod_id: &str) -> Result<(), CriError> {
        self.block_on(self.client.stop_pod_sandbox(pod_id))
            .unwrap_or_else(|e| panic!("StopPodSandbox {pod_id}: {e}"));
        self.block_on(self.client.remove_pod_sandbox(pod_id))
    }

    /// Pids and command lines of the shims, agents, VMs and vsock backends
    /// started for this containerd (all name its directory).
    pub fn leftover_processes(&self) -> Vec<(u32, String)> {
        let containerd = self.child.as_ref().map_or(0, Child::id);
        processes_mentioning(self.path(), containerd)
    }

    /// SIGKILLs this containerd's one Kestrel shim, then waits until
    /// containerd's `delete` action has cleaned up after it: no shim, VM or
    /// agent left, no sandbox state.
    pub fn kill_the_shim_and_await_cleanup(&self) {
        let shims: Vec<u32> = self
            .leftover_processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-kestrel-v2"))
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(shims.len(), 1, "one shim: {shims:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shims[0] as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("killing the shim");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !(self.leftover_processes().is_empty() && self.sandbox_state_left().is_empty()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the delete action left {:?} and {:?}\n{}",
                self.leftover_processes(),
                self.sandbox_state_left(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kestrel's sandbox state directories still present.
    pub fn sandbox_state_left(&self) -> Vec<PathBuf> {
        ["sb-qemu", "sb-process", "sb-builtin"]
            .iter()
            .flat_map(|d| std::fs::read_dir(self.path().join(d)).into_iter().flatten())
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    /// No pod, no container, no process, mount or sandbox state left.
    pub fn assert_nothing_left(&self) {
        let pods = self
            .block_on(self.client.list_pod_sandbox(None))
            .expect("ListPodSandbox");
        assert_eq!(pods, vec![], "pods left");
        let containers = self
            .block_on(self.client.list_containers(None))
            .expect("ListContainers");
        assert_eq!(containers, vec![], "containers left");
        self.assert_nothing_running();
    }

    /// No shim, agent, VM or vsock backend process, mount under the temp
    /// dir or Kestrel sandbox state left (whatever CRI still lists).
    pub fn assert_nothing_running(&self) {
        crate::containerd::assert_processes_end(
            || self.leftover_processes(),
            Duration::from_secs(20),
            "shim, agent, VM or vsock backend processes left",
        );
        assert_eq!(
            self.sandbox_state_left(),
            Vec::<PathBuf>::new(),
            "sandbox state left"
        );
        assert_eq!(
            mounts_under(self.path()),
            Vec::<String>::new(),
            "mounts left"
        );
    }

    /// Removes every pod, stops containerd, deletes the network namespace
    /// and asserts nothing is left: for the end of a test.
    pub fn finish(mut self) {
        self.remove_every_pod();
        self.assert_nothing_left();
        self.stop_containerd();
        assert_eq!(
            self.leftover_processes(),
            vec![],
            "processes left after containerd stopped"
        );
        assert_eq!(
            mounts_under(self.path()),
            Vec::<String>::new(),
            "mounts left"
        );
        self.delete_netns();
        let namespaces = text(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        );
        assert!(
            !namespaces
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&self.netns)),
            "network namespace {} left",
            self.netns
        );
    }

    fn remove_every_pod(&self) {
        let Ok(pods) = self.block_on(self.client.list_pod_sandbox(None)) else {
            return;
        };
        for pod in pods {
            let _ = self.block_on(self.client.stop_pod_sandbox(&pod.id));
            // A second try removes a pod whose first try met a container
            // deleted behind CRI's back.
            if self
                .block_on(self.client.remove_pod_sandbox(&pod.id))
                .is_err()
            {
                let _ = self.block_on(self.client.remove_pod_sandbox(&pod.id));
            }
        }
    }

    fn stop_containerd(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn delete_netns(&self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .stderr(Stdio::null())
            .status();
    }

    fn import_images(&self) {
        let images = self.path().join("images");
        let layer = busybox_layer(&images);
        for (name, entrypoint) in [
            (BUSYBOX_IMAGE, &["/bin/sh"][..]),
            (PAUSE_IMAGE, &["/bin/sleep", "2147483647"][..]),
        ] {
            let archive = oci_archive(&images, &layer, name, entrypoint);
            let out = self.ctr(&["images", "import", &archive.display().to_string()]);
            assert!(
                out.status.success(),
                "ctr images import {name}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        // CRI learns of imported images from containerd's events.
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in [BUSYBOX_IMAGE, PAUSE_IMAGE] {
            while self
                .block_on(self.client.image_status(name))
                .ok()
                .flatten()
                .is_none()
            {
                assert!(Instant::now() < deadline, "CRI never saw image {name}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "--- the last {} lines of containerd's log ({}) ---\n{}\n--- end of containerd's log ---",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
        if self.child.is_some() {
            self.remove_every_pod();
            for (pid, _) in self.leftover_processes() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            self.stop_containerd();
        }
        // What a failed test left mounted would keep the temp dir.
        for line in mounts_under(self.path()) {
            if let Some(target) = line.split_whitespace().nth(4) {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        self.delete_netns();
    }
}

/// Starts containerd in network namespace `netns` with the config in
/// `dir`, Kestrel's shim on its PATH, its output appended to `log`.
fn spawn_containerd(dir: &Path, netns: &str, log: &Path) -> Child {
    let shim_dir = binary("containerd-shim-kestrel-v2")
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("containerd's log");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("containerd's log"))
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .expect("starting containerd")
}

/// Connects to containerd's CRI once it answers (60 s at most).
fn connect(runtime: &tokio::runtime::Runtime, address: &Path, log: &Path) -> CriClient {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = runtime.block_on(async {
            let client = CriClient::connect_path(address).await?;
            client.version().await?;
            Ok::<_, CriError>(client)
        });
        match attempt {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!(
                "containerd's CRI did not answer: {e}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// A gzip layer of a busybox-static rootfs with every applet linked in
/// /bin: (path of the .tar.gz, its digest, the uncompressed tar's digest).
struct Layer {
    gz: PathBuf,
    digest: String,
    diff_id: String,
}

fn busybox_layer(dir: &Path) -> Layer {
    let root = dir.join("rootfs");
    for d in [
        "bin", "proc", "dev", "sys", "tmp", "etc", "root", "run", "var",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    std::fs::copy(crate::BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    let list = run_ok(Command::new(crate::BUSYBOX).arg("--list"));
    for applet in text(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .expect("applet link");
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    let tar = dir.join("layer.tar");
    run_ok(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--sort=name",
                "--mtime=@0",
            ])
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    let diff_id = sha256_file(&tar);
    run_ok(Command::new("gzip").args(["-n", "-f"]).arg(&tar));
    let gz = dir.join("layer.tar.gz");
    let digest = sha256_file(&gz);
    Layer {
        gz,
        digest,
        diff_id,
    }
}

/// An OCI image layout holding `layer` under the name `name`, as a tar
/// archive for `ctr images import`.
fn oci_archive(dir: &Path, layer: &Layer, name: &str, entrypoint: &[&str]) -> PathBuf {
    let tag = name.rsplit(':').next().unwrap_or("latest");
    let layout = dir.join(name.replace(['/', ':'], "_"));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs dir");
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = blobs.join("incoming");
        std::fs::write(&tmp, bytes).expect("blob");
        let digest = sha256_file(&tmp);
        std::fs::rename(&tmp, blobs.join(&digest)).expect("blob");
        (digest, bytes.len())
    };
    std::fs::copy(&layer.gz, blobs.join(&layer.digest)).expect("layer blob");
    let layer_size = std::fs::metadata(&layer.gz).expect("layer").len();
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": entrypoint,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", layer.diff_id)] },
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&image_config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", layer.digest),
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let archive = layout.with_extension("tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    archive
}
