//! Nested-KVM benchmark: kestrel-vmm beside QEMU microvm with KVM, on the
//! one KVM here that runs guest user space: inside `scripts/nested-kvm.sh`'s
//! L1 VM (QEMU TCG emulating AMD SVM). Run outside L1, the bench re-runs
//! itself there (directly where this host's KVM is native already) and
//! prints what the L1 run printed. Every figure is nested, L1 itself being
//! emulated: absolute numbers say little about bare metal, the ratios
//! between the two VMMs on the same L1 are the point.
//!
//! Both VMMs are started through the runtime's own launchers
//! (`kestrel_hypervisor`'s `builtin` and `qemu` backends, `accel = "kvm"`),
//! so they get the command lines `kestrel run` gives them: the guest image's
//! kernel and initrd, the same memory and vCPUs, and, for QEMU, our
//! vhost-user vsock backend (`kestrel-vmm vhost-user-vsock`).
//!
//! 1. Boot to agent SERVING, alternating between kestrel-vmm on the bzImage
//!    QEMU boots, kestrel-vmm on `vmlinux` (what the runtime gives it) and
//!    QEMU, after one untimed warm-up boot each.
//! 2. `kestrel run --rm --rootfs R ID -- true`, builtin against qemu,
//!    alternating, after one untimed builtin run.
//! 3. Start → first KVM_RUN (the kernel's `kvm:kvm_entry` tracepoint on
//!    CLOCK_MONOTONIC, the same for any VMM) and the VMM's RSS beyond guest
//!    memory once the agent serves, from the boots of 1.
//! 4. vsock throughput host↔guest through the agent's streams (the guest
//!    image has no other vsock peer): CopyFile host→guest, a container's
//!    stdout guest→host; both VMs up side by side, transfers alternating.
//!
//! Needs the release build, the guest image, qemu-system-x86_64 and
//! busybox-static:
//!   cargo build --release --workspace
//!   cargo bench -p kestrel-tests --bench nested
//! KESTREL_BENCH_BOOTS (default 10), KESTREL_BENCH_RUNS (3) and
//! KESTREL_BENCH_MIB (16, per transfer) size the runs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use kestrel_host::agent_client::AgentClient;
use kestrel_host::dial::Address;
use kestrel_host::rootfs::CHUNK;
use kestrel_hypervisor::backend::builtin::Builtin;
use kestrel_hypervisor::backend::qemu::{Qemu, QemuOptions};
use kestrel_hypervisor::backend::select::{kvm_support, KvmSupport};
use kestrel_hypervisor::{Hypervisor, SandboxSpec, VmShape, VmSpec};
use kestrel_tests::guest_agent::{self, console_tail, wait_serving};
use kestrel_tests::vmm_memory::rss_beyond_guest;
use kestrel_tests::{
    busybox_rootfs, nested_kvm_command, on_path, pseudo_random, BUSYBOX, NESTED_ENV,
};
use nix::time::{clock_gettime, ClockId};

/// L1's RAM: two 256 MiB guests side by side, QEMU, and the tmpfs that
/// holds whatever L1 writes.
const L1_MEMORY_MIB: u32 = 3072;
/// The runtime's default VM shape.
const SHAPE: VmShape = VmShape {
    memory_mib: 256,
    vcpus: 1,
};
const BOOTS: usize = 10;
const RUNS: usize = 3;
const TRANSFER_MIB: usize = 16;
const TRANSFER_ROUNDS: usize = 3;
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Goals from the issue.
const BOOT_RATIO_GOAL: f64 = 0.8;
const FIRST_RUN_GOAL_MS: f64 = 5.0;
const RSS_GOAL_MIB: f64 = 3.0;
const THROUGHPUT_RATIO_GOAL: f64 = 1.0;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// The workspace's release binaries the bench runs.
struct Binaries {
    vmm: PathBuf,
    kestrel: PathBuf,
}

/// target/release, where the bench itself runs from (target/release/deps).
fn binaries() -> Result<Binaries, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the bench is not in target/release/deps")?;
    let missing: Vec<String> = ["kestrel-vmm", "kestrel", "containerd-shim-kestrel-v2"]
        .iter()
        .map(|name| release.join(name))
        .filter(|path| !path.is_file())
        .map(|path| path.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing {}: run `cargo build --release --workspace` first",
            missing.join(", ")
        ));
    }
    Ok(Binaries {
        vmm: release.join("kestrel-vmm"),
        kestrel: release.join("kestrel"),
    })
}

/// The guest image `kestrel image build` leaves in the user's cache.
struct Image {
    vmlinux: PathBuf,
    bzimage: PathBuf,
    initrd: PathBuf,
}

fn image() -> Result<Image, String> {
    let dir = kestrel_guest_image::default_cache().join("image");
    let image = Image {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initrd: dir.join("initrd.img"),
    };
    for path in [&image.vmlinux, &image.bzimage, &image.initrd] {
        if !path.is_file() {
            return Err(format!(
                "{} is missing: build the guest image as the README says (static agent, then \
                 `kestrel image build`)",
                path.display()
            ));
        }
    }
    Ok(image)
}

/// What the bench needs wherever it runs; a clear error for the first gap.
fn preflight() -> Result<(Binaries, Image), String> {
    let binaries = binaries()?;
    let image = image()?;
    if !on_path("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Err(format!(
            "{BUSYBOX} is missing (apt-get install busybox-static)"
        ));
    }
    Ok((binaries, image))
}

fn main() -> ExitCode {
    let (binaries, image) = match preflight() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("nested bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    let in_l1 = std::env::var_os(NESTED_ENV).is_some();
    let kvm = kvm_support();
    if in_l1 || matches!(kvm, KvmSupport::Native(_)) {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("nested bench: needs root (KVM, the guest's containers, tracefs)");
            return ExitCode::FAILURE;
        }
        return measure(&binaries, &image, in_l1);
    }
    println!(
        "KVM here is {} ({}): running the bench inside scripts/nested-kvm.sh's L1 VM \
         (--memory {L1_MEMORY_MIB}); its output follows",
        kvm.state(),
        kvm.why()
    );
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("nested bench: current_exe: {e}");
            return ExitCode::FAILURE;
        }
    };
    // L1 gets none of our environment: the settings travel as env(1)
    // arguments before the program.
    let mut args: Vec<String> = [
        "KESTREL_BENCH_BOOTS",
        "KESTREL_BENCH_RUNS",
        "KESTREL_BENCH_MIB",
    ]
    .iter()
    .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
    .collect();
    args.push(exe.display().to_string());
    let mut command = nested_kvm_command(Some(L1_MEMORY_MIB), &args);
    let started = Instant::now();
    let status = command.stdin(Stdio::null()).status();
    println!(
        "nested bench: {:.0} s in all, L1's boot and shutdown included",
        started.elapsed().as_secs_f64()
    );
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("nested bench: the run in L1 failed ({status})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nested bench: running scripts/nested-kvm.sh: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The two VMMs, as the runtime's backends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Kestrel,
    Qemu,
}

/// One VM configuration of the boot comparison.
struct Setup {
    name: &'static str,
    vmm: Vmm,
    kernel: PathBuf,
}

/// The CLOCK_MONOTONIC time, as tracefs's `mono` clock reads it.
fn monotonic() -> Duration {
    Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC"))
}

/// The kernel's `kvm:kvm_entry` tracepoint on the `mono` trace clock: when
/// any VMM's vCPU first entered its guest, on the clock the bench reads,
/// without help from the VMM. Without overwriting, the small buffer keeps
/// the first entries and drops the rest. The settings it changed are put
/// back on drop.
struct KvmEntries {
    dir: PathBuf,
    saved: Vec<(&'static str, String)>,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl KvmEntries {
    /// Turns the tracepoint on; in L1, mounts tracefs first if need be.
    fn open(in_l1: bool) -> Result<KvmEntries, String> {
        let dir = PathBuf::from(TRACEFS);
        if !dir.join("trace").exists() && in_l1 {
            nix::mount::mount(
                Some("tracefs"),
                TRACEFS,
                Some("tracefs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| format!("mounting tracefs on {TRACEFS}: {e}"))?;
        }
        if !dir.join("events/kvm/kvm_entry").is_dir() {
            return Err(format!("no kvm:kvm_entry tracepoint in {TRACEFS}"));
        }
        let mut entries = KvmEntries {
            dir,
            saved: Vec::new(),
        };
        for (file, value) in [
            ("trace_clock", "mono"),
            ("options/overwrite", "0"),
            ("buffer_size_kb", "64"),
            ("events/kvm/kvm_entry/enable", "1"),
            ("tracing_on", "1"),
        ] {
            entries.set(file, value)?;
        }
        Ok(entries)
    }

    fn set(&mut self, file: &'static str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        let old = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        // trace_clock lists every clock with the current one in brackets;
        // buffer_size_kb may read `7 (expanded: 1408)`.
        let old = match old.split_once('[') {
            Some((_, rest)) => rest.split(']').next().unwrap_or_default().to_string(),
            None => old
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        std::fs::write(&path, value).map_err(|e| format!("writing {}: {e}", path.display()))?;
        self.saved.push((file, old));
        Ok(())
    }

    /// Empties the buffer.
    fn clear(&self) {
        let _ = std::fs::write(self.dir.join("trace"), "");
    }

    /// The timestamp of the first `kvm_entry` in the buffer.
    fn first(&self) -> Option<Duration> {
        let trace = std::fs::read_to_string(self.dir.join("trace")).ok()?;
        let line = trace.lines().find(|l| l.contains(": kvm_entry:"))?;
        let stamp = line[..line.find(": kvm_entry:")?]
            .split_whitespace()
            .last()?;
        let (secs, micros) = stamp.split_once('.')?;
        Some(Duration::from_secs(secs.parse().ok()?) + Duration::from_micros(micros.parse().ok()?))
    }
}

impl Drop for KvmEntries {
    fn drop(&mut self) {
        for (file, value) in self.saved.iter().rev() {
            let _ = std::fs::write(self.dir.join(file), value);
        }
    }
}

/// The pids of our children whose command line holds `word`.
fn children_with(word: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent is the 2nd field after the parenthesised name.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            parent.as_deref() == Some(me.as_str())
                && cmdline.split(|&b| b == 0).any(|arg| arg == word.as_bytes())
        })
        .collect()
}

/// A running VM and a client of its agent. Field order is drop order.
struct Vm {
    hv: Box<dyn Hypervisor>,
    client: AgentClient,
    console: PathBuf,
    _dir: tempfile::TempDir,
}

/// What one boot measured.
struct Boot {
    serving: Duration,
    first_kvm_run: Option<Duration>,
    /// KiB; QEMU's figure includes its vsock backend's.
    rss_beyond_guest: Option<u64>,
}

fn launcher(vmm: Vmm, binaries: &Binaries) -> Box<dyn Hypervisor> {
    match vmm {
        Vmm::Kestrel => Box::new(Builtin::new(binaries.vmm.clone())),
        Vmm::Qemu => Box::new(Qemu::new(QemuOptions {
            binary: "qemu-system-x86_64".into(),
            vmm_binary: binaries.vmm.clone(),
            accel: "kvm".into(),
            virtiofsd: kestrel_hypervisor::backend::virtiofsd::DEFAULT_BINARY.into(),
        })),
    }
}

/// Starts `setup`'s VM through its runtime launcher and waits for SERVING.
async fn boot(
    setup: &Setup,
    binaries: &Binaries,
    image: &Image,
    trace: Option<&KvmEntries>,
) -> Result<(Vm, Boot), String> {
    let dir = tempfile::Builder::new()
        .prefix("kestrel-nested-bench")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let state_dir = dir.path().join("sandbox");
    let spec = SandboxSpec {
        id: "bench".into(),
        state_dir: state_dir.clone(),
        agent_path: "/unused".into(),
        agent_log_level: "info".into(),
        vm: Some(VmSpec {
            kernel: setup.kernel.clone(),
            initrd: image.initrd.clone(),
            shape: SHAPE,
            kernel_params: String::new(),
        }),
        netns: None,
        nics: Vec::new(),
        shared_fs: None,
    };
    let mut hv = launcher(setup.vmm, binaries);
    hv.prepare(&spec)
        .await
        .map_err(|e| format!("{}: prepare: {e}", setup.name))?;
    let address: Address = hv
        .agent_address()
        .ok_or("no agent address")?
        .parse()
        .map_err(|e| format!("the agent address: {e}"))?;
    let console = state_dir.join("console.log");
    if let Some(trace) = trace {
        trace.clear();
    }
    let t0 = monotonic();
    let started = Instant::now();
    hv.start()
        .await
        .map_err(|e| format!("{}: start: {e}", setup.name))?;
    let exit = hv.exit_watch();
    let served = wait_serving(&address, &console, BOOT_DEADLINE, || match *exit.borrow() {
        Some(how) => Err(format!("the VMM {how}")),
        None => Ok(()),
    })
    .await;
    let serving = started.elapsed();
    let served = match served {
        Ok(served) => served,
        Err(e) => {
            let log = std::fs::read_to_string(state_dir.join("vmm.log")).unwrap_or_default();
            let _ = hv.stop(STOP_GRACE).await;
            return Err(format!(
                "{}: {e}\nVMM log:\n{log}\nconsole:\n{}",
                setup.name,
                console_tail(&console, 20)
            ));
        }
    };
    let first_kvm_run = trace
        .and_then(KvmEntries::first)
        .map(|t| t.saturating_sub(t0));
    let guest_kib = u64::from(SHAPE.memory_mib) * 1024;
    let mut pids: Vec<u32> = hv.pid().into_iter().collect();
    let backends = children_with("vhost-user-vsock");
    match setup.vmm {
        Vmm::Qemu if backends.len() == 1 => pids.extend(backends),
        // Without its one backend QEMU's figure would be short.
        Vmm::Qemu => pids.clear(),
        Vmm::Kestrel => {}
    }
    let rss: Option<Vec<u64>> = (!pids.is_empty())
        .then(|| {
            pids.iter()
                .map(|&pid| rss_beyond_guest(pid, guest_kib).map(|r| r.beyond_guest))
                .collect()
        })
        .flatten();
    let boot = Boot {
        serving,
        first_kvm_run,
        rss_beyond_guest: rss.map(|r| r.iter().sum()),
    };
    Ok((
        Vm {
            hv,
            client: served.client,
            console,
            _dir: dir,
        },
        boot,
    ))
}

impl Vm {
    /// Stops the VM; says how it ended when that was not a clean exit.
    async fn stop(self) -> Option<String> {
        match self.hv.stop(STOP_GRACE).await {
            Ok(Some(kestrel_hypervisor::GuestExit::Exited(0))) => None,
            Ok(how) => Some(format!("{} ended: {how:?}", self.hv.name())),
            Err(e) => Some(format!("{}: stop: {e}", self.hv.name())),
        }
    }
}

/// What went wrong or differently along the way, printed under the table.
#[derive(Default)]
struct Notes {
    /// Something did not run: the bench fails.
    failures: Vec<String>,
    /// Worth knowing, with how often it happened.
    remarks: Vec<(String, usize)>,
}

impl Notes {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn remark(&mut self, what: String) {
        match self.remarks.iter_mut().find(|(r, _)| *r == what) {
            Some((_, n)) => *n += 1,
            None => self.remarks.push((what, 1)),
        }
    }

    /// Prints them; failure if anything failed.
    fn print(&self) -> ExitCode {
        for (remark, n) in &self.remarks {
            println!("note ({n}×): {remark}");
        }
        for failure in &self.failures {
            println!("FAILED: {failure}");
        }
        if self.failures.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Median and extremes of some samples.
#[derive(Clone, Copy)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &[f64]) -> Option<Stats> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| Stats {
        median: if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        },
        min: v[0],
        max: v[n - 1],
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What every phase gathered, per VM configuration.
#[derive(Default)]
struct Samples {
    serving_ms: Vec<f64>,
    first_run_ms: Vec<f64>,
    rss_mib: Vec<f64>,
}

/// Phase 1 (and 3): boots every setup `boots` times, alternating.
fn boots<const N: usize>(
    rt: &tokio::runtime::Runtime,
    setups: &[Setup; N],
    binaries: &Binaries,
    image: &Image,
    trace: Option<&KvmEntries>,
    boots: usize,
    notes: &mut Notes,
) -> [Samples; N] {
    let mut samples: [Samples; N] = std::array::from_fn(|_| Samples::default());
    // Round 0 is the untimed warm-up: L1 reads every binary and the image
    // over 9p the first time.
    for round in 0..=boots {
        for k in 0..setups.len() {
            let i = (k + round) % setups.len();
            let setup = &setups[i];
            match rt.block_on(boot(setup, binaries, image, trace)) {
                Ok((vm, b)) => {
                    if let Some(how) = rt.block_on(vm.stop()) {
                        notes.remark(how);
                    }
                    if round == 0 {
                        continue;
                    }
                    let s = &mut samples[i];
                    s.serving_ms.push(ms(b.serving));
                    s.first_run_ms.extend(b.first_kvm_run.map(ms));
                    s.rss_mib
                        .extend(b.rss_beyond_guest.map(|kib| kib as f64 / 1024.0));
                }
                Err(e) => notes.fail(format!("boot failed: {e}")),
            }
            eprint!(".");
        }
    }
    eprintln!();
    samples
}

/// Phase 2: `kestrel run --rm -- true` per backend, alternating.
fn runs(binaries: &Binaries, image: &Image, runs: usize, notes: &mut Notes) -> [Vec<f64>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    let dir = match tempfile::Builder::new()
        .prefix("kestrel-nested-run")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(e) => {
            notes.fail(format!("kestrel run: temp dir: {e}"));
            return out;
        }
    };
    let rootfs = busybox_rootfs(dir.path());
    let config = dir.path().join("kestrel.toml");
    let toml = format!(
        "[sandbox]\nstate_dir = \"{}\"\n[agent]\ndial_timeout_ms = {}\n[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = {}\nvcpus = {}\naccel = \"kvm\"\n",
        dir.path().join("sandboxes").display(),
        BOOT_DEADLINE.as_millis(),
        image.vmlinux.display(),
        image.initrd.display(),
        SHAPE.memory_mib,
        SHAPE.vcpus
    );
    if let Err(e) = std::fs::write(&config, toml) {
        notes.fail(format!("kestrel run: writing {}: {e}", config.display()));
        return out;
    }
    let backends = ["builtin", "qemu"];
    let run = |backend: &str, id: &str, notes: &mut Notes| -> Option<f64> {
        let started = Instant::now();
        let output = Command::new(&binaries.kestrel)
            .env("KESTREL_CONFIG", &config)
            .env("KESTREL_CLI_ROOT", dir.path().join("cli"))
            .args(["run", "--hypervisor", backend, "--rm", "--rootfs"])
            .arg(&rootfs)
            .arg(id)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .output();
        let elapsed = started.elapsed();
        eprint!(".");
        match output {
            Ok(o) if o.status.success() => Some(ms(elapsed)),
            Ok(o) => {
                notes.fail(format!(
                    "kestrel run --hypervisor {backend} failed ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                notes.fail(format!("running {}: {e}", binaries.kestrel.display()));
                None
            }
        }
    };
    // Untimed: L1 reads the CLI and the shim over 9p the first time; the
    // boots already read QEMU, kestrel-vmm and the guest image.
    run("builtin", "warm-up", notes);
    for round in 0..runs {
        for k in 0..2 {
            let i = (k + round) % 2;
            if let Some(t) = run(backends[i], &format!("r{round}{}", backends[i]), notes) {
                out[i].push(t);
            }
        }
    }
    eprintln!();
    out
}

/// Phase 4: both VMs up side by side, transfers alternating between them.
/// Returns MiB/s, [host→guest, guest→host] per setup.
fn transfers(
    rt: &tokio::runtime::Runtime,
    setups: [&Setup; 2],
    binaries: &Binaries,
    image: &Image,
    mib: usize,
    rounds: usize,
    notes: &mut Notes,
) -> [[Vec<f64>; 2]; 2] {
    let mut out: [[Vec<f64>; 2]; 2] = Default::default();
    let scratch = match tempfile::Builder::new()
        .prefix("kestrel-nested-io")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(e) => {
            notes.fail(format!("transfers: temp dir: {e}"));
            return out;
        }
    };
    let rootfs = busybox_rootfs(scratch.path());
    let mut vms = Vec::new();
    for setup in setups {
        match rt.block_on(boot(setup, binaries, image, None)) {
            Ok((vm, _)) => vms.push(vm),
            Err(e) => {
                notes.fail(format!("transfers: boot failed: {e}"));
                for vm in vms {
                    rt.block_on(vm.stop());
                }
                return out;
            }
        }
    }
    let chunk = pseudo_random(CHUNK);
    let per_mib = |d: Duration| mib as f64 / d.as_secs_f64();
    rt.block_on(async {
        // Untimed warm-up: the first requests fault in the agent's pages.
        for vm in &vms {
            if let Err(e) = guest_agent::copy_file(&vm.client, &chunk, CHUNK).await {
                notes.fail(format!("warm-up CopyFile: {e}"));
            }
        }
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                vec![0, 1]
            } else {
                vec![1, 0]
            };
            for &i in &order {
                match guest_agent::copy_file(&vms[i].client, &chunk, mib << 20).await {
                    Ok(t) => out[i][0].push(per_mib(t)),
                    Err(e) => notes.fail(format!(
                        "{} CopyFile: {e}\nconsole:\n{}",
                        setups[i].name,
                        console_tail(&vms[i].console, 10)
                    )),
                }
            }
            for &i in &order {
                let id = format!("out{round}");
                match guest_agent::output_rate(&vms[i].client, &rootfs, &id, mib).await {
                    Ok(bytes_per_s) => out[i][1].push(bytes_per_s / (1 << 20) as f64),
                    Err(e) => notes.fail(format!(
                        "{} stdout: {e}\nconsole:\n{}",
                        setups[i].name,
                        console_tail(&vms[i].console, 10)
                    )),
                }
            }
            eprint!(".");
        }
    });
    eprintln!();
    for vm in vms {
        if let Some(how) = rt.block_on(vm.stop()) {
            notes.remark(how);
        }
    }
    out
}

/// This machine: kernel, CPUs, RAM.
fn machine_description() -> String {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(String::from("?"), |kib| format!("{} MiB", kib / 1024));
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!("kernel {release}, {cpus} CPU, {mem} RAM")
}

/// One row of the table: a measure, each VMM's samples, the goal and
/// whether it is met.
struct Row {
    measure: String,
    /// Decimals shown.
    decimals: usize,
    ours: Option<Stats>,
    theirs: Option<Stats>,
    goal: String,
    met: Option<bool>,
}

fn cell(s: Option<Stats>, decimals: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} [{:.d$}–{:.d$}]",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        None => "-".into(),
    }
}

fn ratio(ours: Option<Stats>, theirs: Option<Stats>) -> Option<f64> {
    match (ours, theirs) {
        (Some(o), Some(t)) if t.median > 0.0 => Some(o.median / t.median),
        _ => None,
    }
}

fn measure(binaries: &Binaries, image: &Image, in_l1: bool) -> ExitCode {
    let bench_started = Instant::now();
    let boots_n = setting("KESTREL_BENCH_BOOTS", BOOTS);
    let runs_n = setting("KESTREL_BENCH_RUNS", RUNS);
    let mib = setting("KESTREL_BENCH_MIB", TRANSFER_MIB);
    let mut notes = Notes::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if in_l1 {
        // L1's kernel logs a harmless `Unhandled WRMSR` (design.md) on every
        // L2 boot, to the console this bench prints on: alerts only.
        let _ = std::fs::write("/proc/sys/kernel/printk", "1");
    }
    let trace = match KvmEntries::open(in_l1) {
        Ok(trace) => Some(trace),
        Err(e) => {
            notes.remark(format!("no start → first KVM_RUN figures: {e}"));
            None
        }
    };
    let kestrel_bz = Setup {
        name: "kestrel-vmm (bzImage)",
        vmm: Vmm::Kestrel,
        kernel: image.bzimage.clone(),
    };
    let kestrel = Setup {
        name: "kestrel-vmm (vmlinux)",
        vmm: Vmm::Kestrel,
        kernel: image.vmlinux.clone(),
    };
    let qemu = Setup {
        name: "QEMU microvm (bzImage)",
        vmm: Vmm::Qemu,
        // The launcher swaps a vmlinux for the bzImage beside it anyway.
        kernel: image.bzimage.clone(),
    };
    let setups = [kestrel_bz, kestrel, qemu];

    let t = Instant::now();
    eprint!("boots ({boots_n} each + 1 warm-up) ");
    let booted = boots(
        &rt,
        &setups,
        binaries,
        image,
        trace.as_ref(),
        boots_n,
        &mut notes,
    );
    drop(trace);
    let boot_time = t.elapsed();

    let t = Instant::now();
    eprint!("kestrel run ({runs_n} each + 1 warm-up) ");
    let [run_builtin, run_qemu] = runs(binaries, image, runs_n, &mut notes);
    let run_time = t.elapsed();

    let t = Instant::now();
    eprint!("transfers ({TRANSFER_ROUNDS} rounds of {mib} MiB each way) ");
    let [ours_io, theirs_io] = transfers(
        &rt,
        [&setups[1], &setups[2]],
        binaries,
        image,
        mib,
        TRANSFER_ROUNDS,
        &mut notes,
    );
    let io_time = t.elapsed();

    println!();
    if in_l1 {
        println!(
            "Nested KVM: L1 = QEMU TCG -cpu max (emulated SVM) running Debian {}; L2 guests on L1's KVM.",
            machine_description()
        );
    } else {
        println!("Native KVM: {}.", machine_description());
    }
    println!(
        "Guests: the guest image ({} MiB, {} vCPU), agent as /init; QEMU: -M microvm,acpi=off -accel kvm -cpu host, memfd RAM, vhost-user-vsock-device served by kestrel-vmm vhost-user-vsock.",
        SHAPE.memory_mib, SHAPE.vcpus
    );
    println!(
        "Cells: median [min–max]. Figures are nested: compare the ratios, not the absolute values."
    );
    println!();
    println!("Per configuration ({boots_n} boots each, alternating):");
    println!(
        "{:<26} {:>26} {:>26} {:>26}",
        "", "boot → SERVING (ms)", "start → 1st KVM_RUN (ms)", "RSS beyond guest (MiB)"
    );
    for (setup, s) in setups.iter().zip(&booted) {
        println!(
            "{:<26} {:>26} {:>26} {:>26}",
            setup.name,
            cell(stats(&s.serving_ms), 0),
            cell(stats(&s.first_run_ms), 1),
            cell(stats(&s.rss_mib), 2),
        );
    }

    let [bz, vml, q] = &booted;
    let serving = |s: &Samples| stats(&s.serving_ms);
    let mut rows = Vec::new();
    for (label, ours) in [
        ("boot → agent SERVING, ms (same bzImage)", bz),
        ("boot → agent SERVING, ms (ours: vmlinux)", vml),
    ] {
        let r = ratio(serving(ours), serving(q));
        rows.push(Row {
            measure: label.into(),
            decimals: 0,
            ours: serving(ours),
            theirs: serving(q),
            goal: format!("≤ {BOOT_RATIO_GOAL}× QEMU"),
            met: r.map(|r| r <= BOOT_RATIO_GOAL),
        });
    }
    rows.push(Row {
        measure: "kestrel run --rm -- true, ms".into(),
        decimals: 0,
        ours: stats(&run_builtin),
        theirs: stats(&run_qemu),
        goal: "-".into(),
        met: None,
    });
    let first = |s: &Samples| stats(&s.first_run_ms);
    rows.push(Row {
        measure: "start → first KVM_RUN, ms (vmlinux)".into(),
        decimals: 1,
        ours: first(vml),
        theirs: first(q),
        goal: format!("ours ≤ {FIRST_RUN_GOAL_MS} ms"),
        met: first(vml).map(|s| s.median <= FIRST_RUN_GOAL_MS),
    });
    let rss = |s: &Samples| stats(&s.rss_mib);
    rows.push(Row {
        measure: "VMM RSS beyond guest RAM, MiB".into(),
        decimals: 1,
        ours: rss(vml),
        theirs: rss(q),
        goal: format!("ours ≤ {RSS_GOAL_MIB} MiB"),
        met: rss(vml).map(|s| s.median <= RSS_GOAL_MIB),
    });
    for (label, dir) in [
        ("vsock host→guest MiB/s (CopyFile)", 0),
        ("vsock guest→host MiB/s (stdout)", 1),
    ] {
        let (o, t) = (stats(&ours_io[dir]), stats(&theirs_io[dir]));
        rows.push(Row {
            measure: label.into(),
            decimals: 1,
            ours: o,
            theirs: t,
            goal: format!("≥ {THROUGHPUT_RATIO_GOAL:.1}× QEMU"),
            met: ratio(o, t).map(|r| r >= THROUGHPUT_RATIO_GOAL),
        });
    }

    println!();
    println!(
        "{:<42} {:>22} {:>22} {:>7}  {:<16} met?",
        "measure", "kestrel-vmm", "QEMU microvm", "ratio", "goal"
    );
    for row in &rows {
        println!(
            "{:<42} {:>22} {:>22} {:>7}  {:<16} {}",
            row.measure,
            cell(row.ours, row.decimals),
            cell(row.theirs, row.decimals),
            ratio(row.ours, row.theirs).map_or("-".into(), |r| format!("{r:.2}×")),
            row.goal,
            match row.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
        );
    }
    println!();
    println!("How each is taken:");
    println!(
        "- boot → SERVING: from the launcher's start() (for QEMU: spawning the vhost-user backend, waiting for its socket, spawning QEMU) \
         to the agent's Health.Check answering SERVING over the hybrid vsock socket; the agent is dialled once its console shows `agent serving` \
         (and blindly every 0.5 s before). {boots_n} boots per configuration after one warm-up, rotating the order."
    );
    println!(
        "- kestrel run: wall time of `kestrel run --hypervisor builtin|qemu --rm --rootfs <busybox> ID -- true` (shim start, VM boot, rootfs \
         copied in by CopyFile, container, teardown), [vm] accel = \"kvm\", the runtime's kernel (vmlinux; QEMU swaps in the bzImage), \
         [agent] dial_timeout_ms = {} (the default 10 s is shorter than a nested QEMU boot); {runs_n} runs each after one builtin warm-up, alternating.",
        BOOT_DEADLINE.as_millis()
    );
    println!(
        "- start → first KVM_RUN: CLOCK_MONOTONIC before start() to the first kvm:kvm_entry tracepoint event (trace_clock mono) of that boot; \
         QEMU's includes starting its vsock backend. Goals judged on medians."
    );
    println!(
        "- RSS beyond guest RAM: once SERVING, Rss summed over /proc/PID/smaps except the guest RAM mapping (anonymous, or QEMU's memfd); \
         QEMU's figure adds its kestrel-vmm vhost-user-vsock backend's."
    );
    println!(
        "- vsock throughput: no raw vsock peer exists in the guest image, so it goes through the agent: host→guest = CopyFile of {mib} MiB \
         in {} KiB chunks; guest→host = ReadStdout of a container's `dd if=/dev/zero bs=1M count={mib}` (from its first byte). \
         Both VMs (vmlinux / bzImage) up side by side, {TRANSFER_ROUNDS} rounds alternating; builtin = kestrel-vmm's virtio-mmio vsock device, \
         QEMU = vhost-user-vsock-device + our backend.",
        CHUNK >> 10
    );
    println!(
        "Phases: boots {:.0} s, kestrel run {:.0} s, transfers {:.0} s; {:.0} s in L1 in all.",
        boot_time.as_secs_f64(),
        run_time.as_secs_f64(),
        io_time.as_secs_f64(),
        bench_started.elapsed().as_secs_f64()
    );
    notes.print()
}
