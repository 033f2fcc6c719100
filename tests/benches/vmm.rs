//! Builtin VMM benchmark: how fast `kestrel-vmm` gets a guest running, and
//! how much memory it costs beyond the guest's own RAM, next to
//! Firecracker's published figures and our targets.
//!
//! - Start time: from just before the spawn (`KESTREL_VMM_T0_NS`, a
//!   CLOCK_MONOTONIC stamp) to vCPU 0 entering its first KVM_RUN, which the
//!   VMM logs at info level as `since_exec_us=N`.
//! - RSS beyond guest memory: once the guest runs, the sum of Rss over every
//!   mapping of the VMM except the guest RAM mapping (the anonymous one of
//!   exactly the guest's size), and the process's total VmRSS.
//!
//! The guest is a hand-made ELF64 "kernel" whose code is `jmp .`, so the VM
//! stays up without the guest image; the vsock device is included.
//!
//! Needs a usable /dev/kvm and the release VMM:
//!   cargo build --release -p kestrel-vmm
//!   cargo bench -p kestrel-tests --bench vmm
//! KESTREL_BENCH_LOOPS=N changes the number of runs (default 20).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kestrel_hypervisor::backend::select::{kvm_support, KvmSupport};
use kestrel_tests::spinning_kernel;
use kestrel_tests::vmm_memory::{rss_beyond_guest, Rss};
use kestrel_vmm::vm::vcpu::T0_ENV;
use nix::sys::signal::{kill, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;

const LOOPS: usize = 20;
const GUEST_MIB: u64 = 128;
/// How long one run may take to reach its first KVM_RUN.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Firecracker's figures and ours, for the table.
const FIRECRACKER_START_MS: f64 = 8.0;
const FIRECRACKER_OVERHEAD_MIB: f64 = 5.0;
const TARGET_START_MS: f64 = 5.0;
const TARGET_OVERHEAD_MIB: f64 = 3.0;

fn loops() -> usize {
    std::env::var("KESTREL_BENCH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(LOOPS)
}

/// target/release/kestrel-vmm, beside this benchmark's own directory.
fn release_vmm() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("kestrel-vmm");
    path.exists().then_some(path)
}

fn monotonic_ns() -> u128 {
    Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC")).as_nanos()
}

/// `since_exec_us=N` in a log line, whether or not it carries colour codes.
fn since_exec_us(line: &str) -> Option<u64> {
    let rest = &line[line.find("since_exec_us")? + "since_exec_us".len()..];
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

struct Sample {
    start: Duration,
    rss: Rss,
}

/// Starts one VM, measures it once its guest runs, and stops it.
fn run_once(vmm: &Path, kernel: &Path, dir: &Path, n: usize) -> Sample {
    let uds = dir.join(format!("vm-{n}.vsock"));
    let t0 = monotonic_ns();
    let mut child = Command::new(vmm)
        .env(T0_ENV, t0.to_string())
        .env("NO_COLOR", "1")
        .arg("--kernel")
        .arg(kernel)
        .arg("--memory")
        .arg(GUEST_MIB.to_string())
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--serial")
        .arg(dir.join("serial.log"))
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kestrel-vmm");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    // Drains stderr to the end, so the VMM never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(us) = since_exec_us(&line) {
                let _ = tx.send(us);
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let us = match rx.recv_timeout(START_TIMEOUT) {
        Ok(us) => us,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kestrel-vmm logged no first KVM_RUN within {START_TIMEOUT:?}:\n{}",
                reader.join().unwrap_or_default()
            );
        }
    };
    let pid = child.id();
    let rss = rss_beyond_guest(pid, GUEST_MIB * 1024)
        .unwrap_or_else(|| panic!("kestrel-vmm {pid} has no anonymous {GUEST_MIB} MiB mapping"));

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for kestrel-vmm") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kestrel-vmm did not stop within 5 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let log = reader.join().unwrap_or_default();
    assert!(
        status.success(),
        "kestrel-vmm stopped with {status}:\n{log}"
    );
    assert!(!uds.exists(), "kestrel-vmm left its vsock socket behind");
    Sample {
        start: Duration::from_micros(us),
        rss,
    }
}

/// The `p` quantile (0..=1) of sorted values.
fn quantile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn verdict(p90: f64, target: f64) -> &'static str {
    if p90 <= target {
        "met"
    } else {
        "missed"
    }
}

fn main() {
    let kvm = kvm_support();
    if let KvmSupport::Missing(why) = &kvm {
        eprintln!("SKIP vmm bench: needs a usable /dev/kvm: {why}");
        return;
    }
    let Some(vmm) = release_vmm() else {
        eprintln!(
            "vmm bench: target/release/kestrel-vmm is missing; build it first:\n  \
             cargo build --release -p kestrel-vmm"
        );
        std::process::exit(1);
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = spinning_kernel(dir.path());
    let runs = loops();
    let samples: Vec<Sample> = (0..runs)
        .map(|n| run_once(&vmm, &kernel, dir.path(), n))
        .collect();

    let mut start_ms: Vec<f64> = samples
        .iter()
        .map(|s| s.start.as_secs_f64() * 1e3)
        .collect();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut beyond: Vec<f64> = samples.iter().map(|s| mib(s.rss.beyond_guest)).collect();
    let mut private: Vec<f64> = samples
        .iter()
        .map(|s| mib(s.rss.private_beyond_guest))
        .collect();
    let mut total: Vec<f64> = samples.iter().map(|s| mib(s.rss.total)).collect();
    for v in [&mut start_ms, &mut beyond, &mut private, &mut total] {
        v.sort_by(f64::total_cmp);
    }

    println!(
        "kestrel-vmm ({}), {runs} runs: {GUEST_MIB} MiB guest, vsock device, a `jmp .` ELF kernel; KVM {} ({})",
        vmm.display(),
        kvm.state(),
        kvm.why()
    );
    println!(
        "{:<36} {:>8} {:>8} {:>8}   {:<28} {:<18}",
        "", "p50", "p90", "max", "Firecracker", "target (p90)"
    );
    let row = |name: &str, v: &[f64], anchor: &str, target: String| {
        println!(
            "{:<36} {:>8.2} {:>8.2} {:>8.2}   {:<28} {:<18}",
            name,
            quantile(v, 0.5),
            quantile(v, 0.9),
            quantile(v, 1.0),
            anchor,
            target
        );
    };
    row(
        "start: exec -> first KVM_RUN (ms)",
        &start_ms,
        &format!("~{FIRECRACKER_START_MS} CPU ms to API-ready"),
        format!(
            "<= {TARGET_START_MS} ms: {}",
            verdict(quantile(&start_ms, 0.9), TARGET_START_MS)
        ),
    );
    row(
        "RSS beyond guest memory (MiB)",
        &beyond,
        &format!("<= {FIRECRACKER_OVERHEAD_MIB} MiB overhead"),
        format!(
            "<= {TARGET_OVERHEAD_MIB} MiB: {}",
            verdict(quantile(&beyond, 0.9), TARGET_OVERHEAD_MIB)
        ),
    );
    row("  of which private (MiB)", &private, "", String::new());
    row("VmRSS, total (MiB)", &total, "", String::new());
}
