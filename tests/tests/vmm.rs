//! The builtin VMM, `kestrel-vmm`, as its user sees it: the guest kernel
//! prints on our serial console with our command line, SIGTERM stops the VM
//! and removes its vsock socket, bad input fails at once with exit code 1
//! and a message naming the problem, and (with hardware virtualization) the
//! guest image boots to a serving agent.
//!
//! Exit codes: 0 for a guest reset or a SIGTERM stop, 1 for a setup error,
//! 2 for a KVM exit the VMM cannot handle. Under the software-emulated KVM
//! of the development machines (`kvm_pvm`) the kernel prints its banner and
//! then stops on an instruction the emulator cannot run: exit code 2.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kestrel_hypervisor::backend::select::{kvm_support, KvmSupport};
use kestrel_tests::{binary, guest_image, kvm_runs_guests_here, skip, spinning_kernel};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The start of every command line a test gives the kernel: the guest
/// image's, with the boot messages the tests read (a marker unique to the
/// run follows).
fn base_cmdline() -> String {
    format!("{} loglevel=7", kestrel_guest_image::KERNEL_PARAMS)
}

/// The state of KVM here, or `None` with the reason printed when
/// `/dev/kvm` cannot be used at all.
fn kvm(test: &str) -> Option<KvmSupport> {
    match kvm_support() {
        KvmSupport::Missing(why) => {
            skip(test, &format!("needs a usable /dev/kvm: {why}"));
            None
        }
        support => Some(support),
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes
}

/// A running `kestrel-vmm` whose stderr goes to a file; killed on drop if
/// a test left it running.
struct Vmm {
    child: Child,
    stderr: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, args: &[OsString]) -> Vmm {
        let stderr = dir.join("vmm.stderr");
        let child = Command::new(binary("kestrel-vmm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("creating the stderr file"))
            .spawn()
            .expect("starting kestrel-vmm");
        Vmm { child, stderr }
    }

    /// The exit status, if the VMM exits within `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for kestrel-vmm") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and returns the exit status, which must come within
    /// five seconds.
    fn terminate(&mut self) -> ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("sending SIGTERM");
        let status = self.exit_within(Duration::from_secs(5));
        status.unwrap_or_else(|| {
            panic!(
                "kestrel-vmm still runs 5 s after SIGTERM; stderr:\n{}",
                self.stderr()
            )
        })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `kestrel-vmm` with arguments that must be refused, and returns its
/// exit status and stderr.
fn refused(dir: &Path, args: &[OsString]) -> (ExitStatus, String) {
    let mut vmm = Vmm::start(dir, args);
    let status = vmm
        .exit_within(Duration::from_secs(10))
        .expect("kestrel-vmm exits at once on bad input");
    (status, vmm.stderr())
}

fn args(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            eprintln!("gave up after {timeout:?} waiting for {what}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn kernel_starts_and_prints_its_banner_and_our_command_line() {
    let test = "kernel_starts_and_prints_its_banner_and_our_command_line";
    let Some(support) = kvm(test) else { return };
    let Some(image) = guest_image(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (serial, uds) = (dir.path().join("serial.log"), dir.path().join("vm.vsock"));
    let marker: String = random_bytes(8).iter().map(|b| format!("{b:02x}")).collect();
    let marker = format!("kestrel.test={marker}");
    let mut vmm = Vmm::start(
        dir.path(),
        &args(&[
            &"--kernel",
            &image.vmlinux,
            &"--initrd",
            &image.initrd,
            &"--cmdline",
            &format!("{} {marker}", base_cmdline()),
            &"--serial",
            &serial,
            &"--vsock-uds",
            &uds,
        ]),
    );
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();
    let printed = wait_until("the banner", Duration::from_secs(60), || {
        let log = console();
        log.contains("Linux version")
            && log
                .lines()
                .any(|l| l.starts_with("Command line:") && l.contains(&marker))
    });
    assert!(
        printed,
        "no banner with our command line in 60 s\nconsole:\n{}\nstderr:\n{}",
        console(),
        vmm.stderr()
    );

    if let KvmSupport::Native(_) = support {
        let status = vmm.terminate();
        assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr());
    } else {
        match vmm.exit_within(Duration::from_secs(120)) {
            Some(status) => {
                let stderr = vmm.stderr();
                assert_eq!(
                    status.code(),
                    Some(2),
                    "an unhandled KVM exit is exit code 2\nstderr:\n{stderr}"
                );
                assert!(stderr.contains("KVM internal error"), "{stderr}");
                assert!(stderr.contains("RIP 0x"), "{stderr}");
                eprintln!(
                    "{test}: KVM is {}: the kernel printed its banner, then {}",
                    support.state(),
                    stderr.trim()
                );
            }
            None => {
                let status = vmm.terminate();
                assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr());
            }
        }
    }
    assert!(!uds.exists(), "the vsock socket was left behind");
}

#[test]
fn sigterm_stops_the_vm_and_removes_the_socket() {
    let test = "sigterm_stops_the_vm_and_removes_the_socket";
    if kvm(test).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let kernel = spinning_kernel(dir.path());
    let mut vmm = Vmm::start(
        dir.path(),
        &args(&[
            &"--kernel",
            &kernel,
            &"--serial",
            &dir.path().join("serial.log"),
            &"--vsock-uds",
            &uds,
        ]),
    );
    assert!(
        wait_until("the vsock socket", Duration::from_secs(10), || uds.exists()),
        "no vsock socket; stderr:\n{}",
        vmm.stderr()
    );
    assert_eq!(
        vmm.exit_within(Duration::ZERO),
        None,
        "the spinning guest keeps the VM up"
    );
    let status = vmm.terminate();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr());
    assert!(!uds.exists(), "the vsock socket was left behind");
}

/// Asserts a refusal: exit code 1, `message` on stderr, no socket at `uds`.
fn assert_refused(dir: &Path, args: &[OsString], message: &str, uds: &Path) {
    let (status, stderr) = refused(dir, args);
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in:\n{stderr}"
    );
    assert!(!uds.exists(), "a vsock socket was left behind");
}

#[test]
fn a_missing_kernel_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, uds) = (dir.path().join("no-vmlinux"), dir.path().join("vm.vsock"));
    let (status, stderr) = refused(
        dir.path(),
        &args(&[&"--kernel", &kernel, &"--vsock-uds", &uds]),
    );
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains(&*kernel.to_string_lossy()), "{stderr}");
    assert!(!uds.exists(), "a vsock socket was left behind");
}

#[test]
fn a_kernel_of_random_bytes_is_refused_as_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, uds) = (dir.path().join("noise"), dir.path().join("vm.vsock"));
    let mut noise = random_bytes(64 * 1024);
    // Not that chance would ever make it one, but never an ELF magic.
    noise[0] = 0;
    std::fs::write(&kernel, noise).unwrap();
    assert_refused(
        dir.path(),
        &args(&[&"--kernel", &kernel, &"--vsock-uds", &uds]),
        "neither an ELF vmlinux nor a bzImage",
        &uds,
    );
}

#[test]
fn an_initrd_larger_than_guest_memory_is_refused_as_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let (initrd, uds) = (dir.path().join("huge.img"), dir.path().join("vm.vsock"));
    // Sparse: 100 MiB without writing them.
    File::create(&initrd)
        .and_then(|f| f.set_len(100 * 1024 * 1024))
        .unwrap();
    let kernel = spinning_kernel(dir.path());
    assert_refused(
        dir.path(),
        &args(&[
            &"--kernel",
            &kernel,
            &"--initrd",
            &initrd,
            &"--memory",
            &"64",
            &"--vsock-uds",
            &uds,
        ]),
        "too small",
        &uds,
    );
}

#[test]
fn guest_memory_below_the_minimum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let kernel = spinning_kernel(dir.path());
    assert_refused(
        dir.path(),
        &args(&[
            &"--kernel",
            &kernel,
            &"--memory",
            &"8",
            &"--vsock-uds",
            &uds,
        ]),
        "below the minimum",
        &uds,
    );
}

#[test]
fn an_existing_vsock_path_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    std::fs::write(&uds, "someone else's file\n").unwrap();
    let kernel = spinning_kernel(dir.path());
    let (status, stderr) = refused(
        dir.path(),
        &args(&[&"--kernel", &kernel, &"--vsock-uds", &uds]),
    );
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&uds).expect("the existing file is still there"),
        "someone else's file\n"
    );
}

#[test]
fn zero_vcpus_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let kernel = spinning_kernel(dir.path());
    assert_refused(
        dir.path(),
        &args(&[&"--kernel", &kernel, &"--vcpus", &"0", &"--vsock-uds", &uds]),
        "--vcpus must be at least 1",
        &uds,
    );
}

#[test]
fn full_boot_reaches_a_serving_agent() {
    let test = "full_boot_reaches_a_serving_agent";
    // Where KVM cannot run guest user space, the test runs itself again in
    // an L1 VM whose KVM can (scripts/nested-kvm.sh).
    if !kvm_runs_guests_here(test) {
        return;
    }
    let Some(image) = guest_image(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (serial, uds) = (dir.path().join("serial.log"), dir.path().join("vm.vsock"));
    // Every boot message, so the console check below sees them all.
    let cmdline = kestrel_guest_image::KERNEL_PARAMS.replace(" quiet", "");
    let mut vmm = Vmm::start(
        dir.path(),
        &args(&[
            &"--kernel",
            &image.vmlinux,
            &"--initrd",
            &image.initrd,
            &"--cmdline",
            &cmdline,
            &"--log-level",
            &"info",
            &"--serial",
            &serial,
            &"--vsock-uds",
            &uds,
        ]),
    );
    let address = format!("hvsock://{}:1024", uds.display());
    let mut last = String::new();
    let serving = wait_until("a serving agent", Duration::from_secs(30), || {
        let out = Command::new(binary("kestrel"))
            .args(["agent", "check", "--timeout", "5", "--address", &address])
            .stdin(Stdio::null())
            .output()
            .expect("running kestrel agent check");
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success() && last.lines().next() == Some("SERVING")
    });
    assert!(
        serving,
        "the guest's agent never answered SERVING; last check:\n{last}\nconsole:\n{}\nstderr:\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default(),
        vmm.stderr()
    );

    // DestroySandbox: the agent ends the guest (a reboot, as the VM has no
    // ACPI), and the VMM takes the i8042 reset as the end: status 0, no
    // signal from us.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let agent = kestrel_host::agent_client::AgentClient::connect(
            &address.parse().unwrap(),
            &kestrel_host::config::AgentConfig::default(),
        )
        .await
        .expect("dialling the agent");
        agent.destroy_sandbox().await.expect("DestroySandbox");
    });
    let status = vmm.exit_within(Duration::from_secs(30));
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the VMM did not end by itself after DestroySandbox\nstderr:\n{}\nconsole:\n{console}",
        vmm.stderr()
    );
    assert!(
        vmm.stderr().contains("the guest reset the machine"),
        "{}",
        vmm.stderr()
    );
    assert!(!uds.exists(), "the vsock socket was left behind");
    assert_clean_console(&console);
}

/// Console lines no boot may print, and the ones we allow, each with why.
const CONSOLE_FAULTS: [&str; 4] = ["WARNING", "BUG", "Error", "ignoring arguments"];
const CONSOLE_ALLOWED: [(&str, &str); 0] = [];

/// A boot's console names no fault: no kernel WARNING or BUG, no firmware
/// or driver `Error`, and no argument the agent (as /init) was handed but
/// does not know.
fn assert_clean_console(console: &str) {
    assert!(console.contains("Run /init as init process"), "{console}");
    let faults: Vec<&str> = console
        .lines()
        .filter(|line| CONSOLE_FAULTS.iter().any(|f| line.contains(f)))
        .filter(|line| {
            !CONSOLE_ALLOWED
                .iter()
                .any(|(allowed, _why)| line.contains(allowed))
        })
        .collect();
    assert_eq!(
        faults,
        Vec::<&str>::new(),
        "faults on the console:\n{console}"
    );
}
