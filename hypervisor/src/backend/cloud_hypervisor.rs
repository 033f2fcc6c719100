//! The `cloud-hypervisor` backend: our guest image booted by Cloud
//! Hypervisor, the agent reached over its hybrid vsock socket
//! (`CONNECT 1024`).
//!
//! A shared directory is `--fs tag=…,socket=…` on virtiofsd's socket (guest
//! memory is already `shared=on`, which vhost-user needs).
//!
//! Cloud Hypervisor boots the uncompressed `vmlinux` directly (no firmware)
//! and serves a REST API on a Unix socket; stopping asks that API to shut
//! the VM and the VMM down before falling back to signals. The two API
//! calls are written by hand over a Unix stream: an HTTP client crate would
//! outweigh two bodiless PUTs whose answers only matter as "2xx or not".

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::child::{kernel_cmdline, vsock_socket, SingleVmm};
use super::virtiofsd;
use crate::{Error, GuestExit, Hypervisor, SandboxSpec, VmSpec};

const NAME: &str = super::Backend::CloudHypervisor.name();
/// The guest's context id; any value above 2 works, Kata uses 3 as well.
const GUEST_CID: u32 = 3;
/// The longest one API call may take when the grace period is longer.
const API_TIMEOUT: Duration = Duration::from_secs(2);

/// A Cloud Hypervisor VMM process running one sandbox's guest.
pub struct CloudHypervisor(SingleVmm);

impl CloudHypervisor {
    /// A backend that runs `binary`: a path, or a name looked up on `PATH`.
    pub fn new(binary: PathBuf) -> Self {
        CloudHypervisor(SingleVmm::new(
            NAME,
            "cloud-hypervisor",
            "the cloud-hypervisor binary",
            binary,
            "is not installed (no executable file there or on PATH)",
        ))
    }

    /// Runs `binary` as virtiofsd for sandboxes that share a directory.
    pub fn with_virtiofsd(self, binary: PathBuf) -> Self {
        CloudHypervisor(self.0.with_virtiofsd(binary))
    }
}

/// Cloud Hypervisor's REST API socket.
pub(crate) fn api_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("ch-api.sock")
}

/// The full command line (program first) that boots `vm` for `spec`.
///
/// There is no `--log-file`: Cloud Hypervisor then logs to stderr, which
/// goes to `vmm.log` together with anything else it prints, in one file
/// rather than two writers racing over it.
fn command_line(binary: &Path, spec: &SandboxSpec, vm: &VmSpec) -> Vec<OsString> {
    let dir = &spec.state_dir;
    let joined = |prefix: &str, path: PathBuf| {
        let mut arg = OsString::from(prefix);
        arg.push(path);
        arg
    };
    let mut argv: Vec<OsString> = vec![
        binary.into(),
        "--kernel".into(),
        vm.kernel.clone().into(),
        "--initramfs".into(),
        vm.initrd.clone().into(),
        "--cmdline".into(),
        kernel_cmdline(vm).into(),
        "--memory".into(),
        format!("size={}M,shared=on", vm.shape.memory_mib).into(),
        "--cpus".into(),
        format!("boot={}", vm.shape.vcpus).into(),
        "--vsock".into(),
        joined(&format!("cid={GUEST_CID},socket="), vsock_socket(dir)),
        "--api-socket".into(),
        joined("path=", api_socket(dir)),
        "--serial".into(),
        joined("file=", dir.join("console.log")),
        "--console".into(),
        "off".into(),
    ];
    if let Some(fs) = &spec.shared_fs {
        argv.push("--fs".into());
        argv.push(joined(
            &format!("tag={},socket=", fs.tag),
            virtiofsd::socket(dir),
        ));
    }
    // Cloud Hypervisor takes every card after one `--net`; `fd=` is a tap
    // it inherits, as Kata passes them.
    if !spec.nics.is_empty() {
        argv.push("--net".into());
        argv.extend(spec.nics.iter().map(|nic| {
            OsString::from(format!(
                "fd={},mac={},mtu={}{}",
                nic.tap.as_raw_fd(),
                nic.mac_string(),
                nic.mtu,
                if nic.offload {
                    ""
                } else {
                    ",offload_tso=off,offload_ufo=off,offload_csum=off"
                }
            ))
        }));
    }
    argv
}

/// Sends `PUT endpoint` with no body to the API on `socket`; succeeds on a
/// 2xx answer.
async fn api_put(socket: &Path, endpoint: &str) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(socket).await?;
    let request = format!(
        "PUT {endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need; stop at the end of the headers.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let status = String::from_utf8_lossy(&answer);
    let status = status.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "PUT {endpoint} answered {status:?}"
        ))),
    }
}

#[async_trait]
impl Hypervisor for CloudHypervisor {
    fn backend(&self) -> super::Backend {
        super::Backend::CloudHypervisor
    }

    async fn prepare(&mut self, spec: &SandboxSpec) -> Result<(), Error> {
        self.0.prepare(spec)
    }

    async fn start(&mut self) -> Result<(), Error> {
        self.0.start(command_line).await
    }

    fn agent_address(&self) -> Option<String> {
        self.0.agent_address()
    }

    fn pid(&self) -> Option<u32> {
        self.0.vmm.pid()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<GuestExit>> {
        self.0.vmm.exit_watch()
    }

    async fn stop(&self, grace: Duration) -> Result<Option<GuestExit>, Error> {
        let Some(spec) = self.0.spec() else {
            return Ok(None);
        };
        let deadline = Instant::now() + grace;
        let mut asked = false;
        if self.0.vmm.pid().is_some() && !self.0.vmm.has_exited() {
            let api = api_socket(&spec.state_dir);
            let call_deadline = deadline.min(Instant::now() + API_TIMEOUT);
            asked = true;
            for endpoint in ["/api/v1/vm.shutdown", "/api/v1/vmm.shutdown"] {
                let answer = tokio::time::timeout_at(call_deadline, api_put(&api, endpoint))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                if let Err(e) = answer {
                    tracing::debug!(sandbox_id = %spec.id, endpoint, error = %e, "cloud-hypervisor API call failed");
                    asked = false;
                    break;
                }
            }
        }
        // A VMM that accepted vmm.shutdown is on its way out; signal only
        // one whose API did not answer.
        let polite = (!asked).then_some(Signal::SIGTERM);
        self.0.begin_stop();
        let exit = self.0.vmm.stop(polite, deadline).await;
        self.0.stop_helpers().await;
        crate::state_dir::remove(&spec.state_dir)?;
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{wait_exit, BASE_KERNEL_PARAMS};
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    use std::os::unix::fs::PermissionsExt;
    use tokio::net::UnixListener;

    fn vm(dir: &Path) -> VmSpec {
        VmSpec {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
            shape: crate::VmShape {
                memory_mib: 256,
                vcpus: 2,
            },
            kernel_params: String::new(),
        }
    }

    fn spec(dir: &Path) -> SandboxSpec {
        SandboxSpec {
            id: "sb".into(),
            state_dir: dir.join("sb"),
            agent_path: "/unused/kestrel-agent".into(),
            agent_log_level: "info".into(),
            vm: Some(vm(dir)),
            netns: None,
            nics: Vec::new(),
            shared_fs: None,
        }
    }

    #[test]
    fn a_shared_dir_is_an_fs_option_on_virtiofsds_socket() {
        let mut spec = spec(Path::new("/run/x"));
        spec.shared_fs = Some(crate::SharedFs {
            dir: "/run/x/sb/shared".into(),
            tag: "kestrel".into(),
            cache: crate::FsCache::Auto,
        });
        let argv = command_line(Path::new("/bin/ch"), &spec, spec.vm.as_ref().unwrap());
        let fs: Vec<String> = argv
            .windows(2)
            .filter(|w| w[0] == "--fs")
            .map(|w| w[1].to_string_lossy().into_owned())
            .collect();
        assert_eq!(fs, ["tag=kestrel,socket=/run/x/sb/virtiofsd.sock"]);
    }

    /// A guest image (two placeholder files) and a fake `cloud-hypervisor`
    /// that records its arguments in `args` and then runs `body`.
    fn fake_host(dir: &Path, body: &str) -> PathBuf {
        std::fs::write(dir.join("vmlinux"), "kernel").unwrap();
        std::fs::write(dir.join("initrd.img"), "initrd").unwrap();
        let binary = dir.join("cloud-hypervisor");
        let args = dir.join("args");
        std::fs::write(
            &binary,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > '{}'\n{body}\n",
                args.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        binary
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn command_line_boots_the_image_with_hybrid_vsock_and_api_in_the_state_dir() {
        let spec = spec(Path::new("/run/k"));
        let vm = spec.vm.clone().unwrap();
        assert_eq!(
            strings(&command_line(
                Path::new("/usr/bin/cloud-hypervisor"),
                &spec,
                &vm
            )),
            [
                "/usr/bin/cloud-hypervisor",
                "--kernel",
                "/run/k/vmlinux",
                "--initramfs",
                "/run/k/initrd.img",
                "--cmdline",
                BASE_KERNEL_PARAMS,
                "--memory",
                "size=256M,shared=on",
                "--cpus",
                "boot=2",
                "--vsock",
                "cid=3,socket=/run/k/sb/vsock",
                "--api-socket",
                "path=/run/k/sb/ch-api.sock",
                "--serial",
                "file=/run/k/sb/console.log",
                "--console",
                "off",
            ]
        );
    }

    #[test]
    fn configured_kernel_params_follow_the_base_ones() {
        let mut vm = vm(Path::new("/i"));
        vm.kernel_params = " agent.log=debug ".into();
        let args = strings(&command_line(Path::new("ch"), &spec(Path::new("/s")), &vm));
        let at = args.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(
            args[at + 1],
            format!("{BASE_KERNEL_PARAMS} agent.log=debug")
        );
    }

    #[tokio::test]
    async fn prepare_refuses_a_spec_without_a_vm() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_host(dir.path(), "exit 0");
        let mut spec = spec(dir.path());
        spec.vm = None;
        let err = CloudHypervisor::new(binary)
            .prepare(&spec)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a VM spec"), "{err}");
    }

    #[tokio::test]
    async fn prepare_refuses_a_missing_kernel_and_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_host(dir.path(), "exit 0");
        std::fs::remove_file(dir.path().join("vmlinux")).unwrap();
        let err = CloudHypervisor::new(binary)
            .prepare(&spec(dir.path()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest kernel")
                && err.contains("vmlinux")
                && err.contains("kestrel image build"),
            "{err}"
        );
        assert!(!dir.path().join("sb").exists());
    }

    #[tokio::test]
    async fn prepare_refuses_a_missing_binary_saying_it_is_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path(), "exit 0");
        for binary in [
            PathBuf::from("kestrel-no-such-cloud-hypervisor"),
            dir.path().join("nope/cloud-hypervisor"),
        ] {
            let err = CloudHypervisor::new(binary.clone())
                .prepare(&spec(dir.path()))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&*binary.to_string_lossy()) && err.contains("not installed"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn start_before_prepare_is_refused() {
        let err = CloudHypervisor::new("cloud-hypervisor".into())
            .start()
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::NotPrepared("cloud-hypervisor", "start")
        ));
    }

    #[tokio::test]
    async fn agent_address_is_the_hybrid_vsock_socket_on_port_1024() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_host(dir.path(), "exit 0");
        let mut backend = CloudHypervisor::new(binary);
        assert_eq!(backend.agent_address(), None);
        backend.prepare(&spec(dir.path())).await.unwrap();
        assert_eq!(
            backend.agent_address().unwrap(),
            format!("hvsock://{}/sb/vsock:1024", dir.path().display())
        );
        assert!(dir.path().join("sb").is_dir());
    }

    #[tokio::test]
    async fn start_runs_the_binary_with_the_command_line_and_stop_removes_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_host(dir.path(), "exec sleep 100");
        let mut backend = CloudHypervisor::new(binary.clone());
        let spec = spec(dir.path());
        backend.prepare(&spec).await.unwrap();
        backend.start().await.unwrap();
        let pid = backend.pid().expect("a pid once started");
        assert!(kill(Pid::from_raw(pid as i32), None).is_ok());
        let args = dir.path().join("args");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&args).is_ok_and(|a| a.ends_with("off\n")) {
            assert!(std::time::Instant::now() < deadline, "the fake never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let recorded: Vec<String> = std::fs::read_to_string(&args)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let expected = strings(&command_line(&binary, &spec, spec.vm.as_ref().unwrap()));
        assert_eq!(recorded, expected[1..]);
        // No API answers, so stop falls back to SIGTERM.
        let exit = backend.stop(Duration::from_secs(5)).await.unwrap();
        assert_eq!(exit, Some(GuestExit::Signaled(libc::SIGTERM)));
        assert!(!dir.path().join("sb").exists());
    }

    #[tokio::test]
    async fn stop_kills_a_vmm_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_host(dir.path(), "trap '' TERM\nwhile :; do sleep 1; done");
        let mut backend = CloudHypervisor::new(binary);
        backend.prepare(&spec(dir.path())).await.unwrap();
        backend.start().await.unwrap();
        // Let the shell install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let exit = backend.stop(Duration::from_millis(300)).await.unwrap();
        assert_eq!(exit, Some(GuestExit::Signaled(libc::SIGKILL)));
        assert!(!dir.path().join("sb").exists());
    }

    #[tokio::test]
    async fn exit_watch_reports_a_vmm_that_dies_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_host(dir.path(), "exit 7");
        let mut backend = CloudHypervisor::new(binary);
        backend.prepare(&spec(dir.path())).await.unwrap();
        backend.start().await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), wait_exit(backend.exit_watch()))
            .await
            .unwrap();
        assert_eq!(exit, Some(GuestExit::Exited(7)));
        // Stopping an ended VMM only cleans up.
        assert_eq!(
            backend.stop(Duration::from_millis(10)).await.unwrap(),
            Some(GuestExit::Exited(7))
        );
        assert!(!dir.path().join("sb").exists());
    }

    #[tokio::test]
    async fn stop_asks_the_api_to_shut_down_the_vm_then_the_vmm_before_any_signal() {
        let dir = tempfile::tempdir().unwrap();
        // Ignores SIGTERM; leaves cleanly on SIGUSR1, which stands in for
        // the real VMM's reaction to vmm.shutdown.
        let binary = fake_host(
            dir.path(),
            "trap '' TERM\ntrap 'exit 0' USR1\nwhile :; do sleep 0.05; done",
        );
        let mut backend = CloudHypervisor::new(binary);
        backend.prepare(&spec(dir.path())).await.unwrap();
        let listener = UnixListener::bind(api_socket(&dir.path().join("sb"))).unwrap();
        backend.start().await.unwrap();
        let pid = Pid::from_raw(backend.pid().unwrap() as i32);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let api = tokio::spawn(async move {
            let mut requests = Vec::new();
            for _ in 0..2 {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = conn.read(&mut buf).await.unwrap();
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
                if request.starts_with("PUT /api/v1/vmm.shutdown ") {
                    kill(pid, Signal::SIGUSR1).unwrap();
                }
                requests.push(request.lines().next().unwrap_or_default().to_string());
            }
            requests
        });
        let exit = backend.stop(Duration::from_secs(5)).await.unwrap();
        assert_eq!(exit, Some(GuestExit::Exited(0)));
        assert_eq!(
            api.await.unwrap(),
            [
                "PUT /api/v1/vm.shutdown HTTP/1.1",
                "PUT /api/v1/vmm.shutdown HTTP/1.1"
            ]
        );
    }

    #[tokio::test]
    async fn an_api_error_answer_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let err = api_put(&socket, "/api/v1/vm.shutdown").await.unwrap_err();
        assert!(err.to_string().contains("405"), "{err}");
    }
}
