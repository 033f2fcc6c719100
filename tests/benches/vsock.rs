//! vsock benchmark: our vhost-user vsock backend (`kestrel-vmm
//! vhost-user-vsock`) beside rust-vmm's `vhost-device-vsock`, each serving
//! the vsock device of a QEMU (TCG) guest that runs the Kestrel agent. For
//! each backend it records boot to a SERVING Health.Check, Health.Check
//! round trips, host→guest throughput (CopyFile of 64 MiB files in 1 MiB
//! chunks) and, where a busybox rootfs can be made, guest→host throughput
//! (ReadStdout of a container's `dd if=/dev/zero bs=1M`).
//!
//! Every round boots one VM per backend (the order alternates between
//! rounds), keeps them running side by side and alternates the measurements
//! between them, so both backends see the same load at the same moments:
//! on a small shared machine sequential runs would compare noise.
//!
//! Needs qemu-system-x86_64, the guest image and the backends:
//!   cargo build --release -p kestrel-vmm
//!   cargo install vhost-device-vsock
//!   cargo bench -p kestrel-tests --bench vsock
//! KESTREL_BENCH_ROUNDS=N changes the number of rounds (default 3).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_host::agent_client::AgentClient;
use kestrel_host::dial::Address;
use kestrel_host::rootfs::CHUNK;
use kestrel_protocols::health::CheckRequest;
use kestrel_protocols::health_ttrpc::HealthClient;
use kestrel_protocols::ttrpc::context;
use kestrel_tests::guest_agent::{self, console_tail, wait_serving, Serving};
use kestrel_tests::{busybox_rootfs, percentile, pseudo_random, BUSYBOX};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const ROUNDS: usize = 3;
/// Each file sent host→guest.
const FILE_SIZE: usize = 64 << 20;
/// Files per VM per round: at least 128 MiB a round.
const FILES: usize = 2;
/// Health.Check calls per VM per round, in batches alternating between VMs.
const CHECKS: usize = 200;
const CHECK_BATCH: usize = 20;
/// Bytes the container writes to its stdout (`dd bs=1M count=OUTPUT_MIB`).
const OUTPUT_MIB: usize = 64;
/// Guest memory, as tests/tests/guest_image.rs boots the image.
const GUEST_MEM: &str = "256M";
/// How long a guest may take to answer Health.Check with SERVING.
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// Boots tried per VM before the bench gives up.
const BOOT_TRIES: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kestrel,
    RustVmm,
}

struct Backend {
    kind: Kind,
    name: String,
    program: PathBuf,
}

impl Backend {
    fn command(&self, socket: &Path, uds: &Path) -> Command {
        let mut cmd = Command::new(&self.program);
        match self.kind {
            Kind::Kestrel => {
                cmd.args(["vhost-user-vsock", "--socket"])
                    .arg(socket)
                    .arg("--uds")
                    .arg(uds)
                    .args(["--guest-cid", "3"]);
            }
            Kind::RustVmm => {
                cmd.arg("--guest-cid=3")
                    .arg(format!("--socket={}", socket.display()))
                    .arg(format!("--uds-path={}", uds.display()));
            }
        }
        cmd
    }
}

/// The workspace's `target` directory (the bench runs from `target/release/deps`).
fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The backends this machine has, printing why any is left out.
fn backends() -> Vec<Backend> {
    let mut found = Vec::new();
    let ours = target_dir().and_then(|t| {
        ["release", "debug"]
            .iter()
            .map(|profile| (*profile, t.join(profile).join("kestrel-vmm")))
            .find(|(_, p)| p.is_file())
    });
    match ours {
        Some((profile, program)) => {
            if profile == "debug" {
                println!("note: target/release/kestrel-vmm is missing; measuring the debug build");
                println!("      (cargo build --release -p kestrel-vmm)");
            }
            found.push(Backend {
                kind: Kind::Kestrel,
                name: format!("kestrel-vmm ({profile})"),
                program,
            });
        }
        None => println!("SKIP kestrel-vmm: not built (cargo build --release -p kestrel-vmm)"),
    }
    match on_path("vhost-device-vsock") {
        Some(program) => found.push(Backend {
            kind: Kind::RustVmm,
            name: "vhost-device-vsock".into(),
            program,
        }),
        None => println!("SKIP vhost-device-vsock: not found (cargo install vhost-device-vsock)"),
    }
    found
}

struct Image {
    bzimage: PathBuf,
    initrd: PathBuf,
}

/// The cached guest image `kestrel image build` leaves in ~/.cache/kestrel/image.
fn image() -> Option<Image> {
    let dir = kestrel_guest_image::default_cache().join("image");
    let image = Image {
        bzimage: dir.join("bzImage"),
        initrd: dir.join("initrd.img"),
    };
    if image.bzimage.is_file() && image.initrd.is_file() {
        return Some(image);
    }
    println!(
        "SKIP vsock bench: no guest image in {} (build the static agent as the README says, then \
         `cargo build -p kestrel-host --bin kestrel && ./target/debug/kestrel image build`; \
         it needs linux-source-6.1, make, gcc, flex, bison and bc)",
        dir.display()
    );
    None
}

fn wait_timeout(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends `child`: SIGTERM, then SIGKILL after `grace`. Says which it took.
fn terminate(child: &mut Child, grace: Duration) -> &'static str {
    let pid = Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(Some(_))) {
        return "had already exited";
    }
    let _ = kill(pid, Signal::SIGTERM);
    if wait_timeout(child, grace) {
        return "exited on SIGTERM";
    }
    let _ = child.kill();
    let _ = child.wait();
    "needed SIGKILL"
}

/// A VM's processes, stopped in order: QEMU first, so the guest is gone
/// before its device is, then the backend.
struct Procs {
    qemu: Option<Child>,
    backend: Option<Child>,
}

impl Procs {
    /// Stops both, QEMU first; says how each ended.
    fn stop(&mut self) -> String {
        let qemu = self
            .qemu
            .take()
            .map(|mut q| terminate(&mut q, Duration::from_secs(5)));
        let backend = self.backend.take().map(|mut b| {
            // A backend serving one front end may leave by itself when QEMU
            // disconnects; give it a moment before asking.
            if wait_timeout(&mut b, Duration::from_millis(500)) {
                "exited by itself"
            } else {
                terminate(&mut b, Duration::from_secs(2))
            }
        });
        format!(
            "QEMU {}, backend {}",
            qemu.unwrap_or("-"),
            backend.unwrap_or("-")
        )
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One guest served by one backend. Field order is drop order: the
/// processes end before their directory goes.
struct Vm {
    procs: Procs,
    client: AgentClient,
    health: HealthClient,
    boot: Duration,
    dir: tempfile::TempDir,
}

impl Vm {
    fn console_tail(&self) -> String {
        console_tail(&self.dir.path().join("console.log"), 20)
    }

    /// CPU time the backend and QEMU have used so far.
    fn cpu(&self) -> Cpu {
        let of = |c: &Option<Child>| c.as_ref().map(|c| cpu_time(c.id())).unwrap_or_default();
        Cpu {
            backend: of(&self.procs.backend),
            qemu: of(&self.procs.qemu),
        }
    }

    /// Stops QEMU, then the backend, then removes the directory.
    fn shut_down(mut self) -> String {
        let how = self.procs.stop();
        let dir = self.dir.path().to_path_buf();
        drop(self);
        if dir.exists() {
            format!("{how}; {} NOT removed", dir.display())
        } else {
            how
        }
    }
}

/// CPU time of a VM's two processes.
#[derive(Clone, Copy)]
struct Cpu {
    backend: Duration,
    qemu: Duration,
}

impl Cpu {
    /// Seconds of CPU per GiB for `bytes` moved since `before`.
    fn per_gib(self, before: Cpu, bytes: usize) -> (f64, f64) {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let s = |now: Duration, then: Duration| now.saturating_sub(then).as_secs_f64() / gib;
        (s(self.backend, before.backend), s(self.qemu, before.qemu))
    }
}

/// User plus system time of process `pid` (all its threads).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // utime and stime are the 14th and 15th fields, the 12th and 13th after
    // the parenthesised command name (which may hold spaces).
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .unwrap_or(100) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Starts `backend`, boots QEMU on it and waits until the agent answers
/// SERVING. The boot time runs from QEMU's start.
async fn boot(backend: &Backend, image: &Image) -> Result<Vm, String> {
    let dir = tempfile::Builder::new()
        .prefix("kestrel-vsock-bench")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let socket = dir.path().join("vhost.sock");
    let uds = dir.path().join("vm.vsock");
    let console = dir.path().join("console.log");
    let backend_log = dir.path().join("backend.log");
    let log = File::create(&backend_log).map_err(|e| format!("backend log: {e}"))?;
    let child = backend
        .command(&socket, &uds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", backend.program.display()))?;
    let mut procs = Procs {
        qemu: None,
        backend: Some(child),
    };
    let backend_failed = |why: &str| {
        format!(
            "{} {why}:\n{}",
            backend.name,
            std::fs::read_to_string(&backend_log).unwrap_or_default()
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(b) = procs.backend.as_mut() {
            if matches!(b.try_wait(), Ok(Some(_))) {
                return Err(backend_failed("exited before creating its socket"));
            }
        }
        if Instant::now() >= deadline {
            return Err(backend_failed("did not create its socket in 10 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off,memory-backend=mem0"])
        .args(["-accel", "tcg", "-m", GUEST_MEM])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem0,size={GUEST_MEM},share=on"
        ))
        .arg("-kernel")
        .arg(&image.bzimage)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-chardev")
        .arg(format!("socket,id=vsock0,path={}", socket.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock0"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.path().join("qemu.log")).map_err(|e| format!("qemu log: {e}"))?)
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    procs.qemu = Some(qemu);

    let address = Address::Hvsock {
        path: uds.clone(),
        port: kestrel_protocols::AGENT_VSOCK_PORT,
    };
    let qemu_log = dir.path().join("qemu.log");
    let qemu = &mut procs.qemu;
    let serving = wait_serving(&address, &console, BOOT_DEADLINE, || {
        match qemu.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) => Err(format!(
                "QEMU exited during boot: {}",
                std::fs::read_to_string(&qemu_log).unwrap_or_default()
            )),
            _ => Ok(()),
        }
    })
    .await
    .map_err(|e| {
        format!(
            "{}: {e}; console:\n{}",
            backend.name,
            console_tail(&console, 20)
        )
    })?;
    let Serving { client, health } = serving;
    Ok(Vm {
        boot: started.elapsed(),
        client,
        health,
        procs,
        dir,
    })
}

async fn checks(vm: &Vm, n: usize, out: &mut Vec<Duration>) {
    let req = CheckRequest::new();
    for _ in 0..n {
        let t = Instant::now();
        vm.health
            .check(context::with_duration(Duration::from_secs(10)), &req)
            .await
            .unwrap_or_else(|e| panic!("Health.Check: {e}\nconsole:\n{}", vm.console_tail()));
        out.push(t.elapsed());
    }
}

/// Sends one `FILE_SIZE` file, panicking with the console's tail on error.
async fn copy_file(vm: &Vm, chunk: &[u8]) -> Duration {
    guest_agent::copy_file(&vm.client, chunk, FILE_SIZE)
        .await
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", vm.console_tail()))
}

#[derive(Default)]
struct Results {
    boots: Vec<Duration>,
    boot_failures: Vec<String>,
    checks: Vec<Duration>,
    /// Host→guest bytes per second, one per round.
    to_guest: Vec<f64>,
    /// Guest→host bytes per second, one per round.
    to_host: Vec<f64>,
    /// CPU seconds per GiB moved (backend, QEMU), one per round.
    cpu_to_guest: Vec<(f64, f64)>,
    cpu_to_host: Vec<(f64, f64)>,
    shutdowns: Vec<String>,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

fn median_duration(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    (!v.is_empty()).then(|| percentile(&v, 0.5))
}

fn mib_s(v: &[f64]) -> String {
    match (median(v), v.iter().copied().reduce(f64::max)) {
        (Some(m), Some(best)) => format!(
            "{:.1} (best {:.1})",
            m / (1 << 20) as f64,
            best / (1 << 20) as f64
        ),
        _ => "-".into(),
    }
}

/// Boots a VM, retrying a boot that never serves (noting why).
fn boot_tries(
    rt: &tokio::runtime::Runtime,
    backend: &Backend,
    image: &Image,
    results: &mut Results,
) -> Vm {
    for _ in 1..BOOT_TRIES {
        match rt.block_on(boot(backend, image)) {
            Ok(vm) => return vm,
            Err(e) => {
                let first = e.lines().next().unwrap_or_default().to_string();
                println!("\nnote: {first}; booting again");
                results.boot_failures.push(first);
            }
        }
    }
    rt.block_on(boot(backend, image))
        .unwrap_or_else(|e| panic!("{} failed {BOOT_TRIES} boots in a row: {e}", backend.name))
}

fn rounds() -> usize {
    std::env::var("KESTREL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(ROUNDS)
}

fn main() {
    if on_path("qemu-system-x86_64").is_none() {
        println!("SKIP vsock bench: needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
        return;
    }
    let Some(image) = image() else {
        return;
    };
    let backends = backends();
    if backends.is_empty() {
        println!("SKIP vsock bench: no vhost-user vsock backend to measure");
        return;
    }
    let scratch = tempfile::tempdir().expect("temp dir");
    let rootfs = if Path::new(BUSYBOX).exists() {
        Some(busybox_rootfs(scratch.path()))
    } else {
        println!("note: no guest→host figure: needs {BUSYBOX} for the container's rootfs (apt-get install busybox-static)");
        None
    };
    let mut output_skipped: Option<String> = None;
    let chunk = pseudo_random(CHUNK);
    let rounds = rounds();
    let mut results: Vec<Results> = backends.iter().map(|_| Results::default()).collect();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for round in 0..rounds {
        // Boot one VM per backend, alternating who boots first.
        let mut order: Vec<usize> = (0..backends.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut vms: Vec<Option<Vm>> = backends.iter().map(|_| None).collect();
        for &i in &order {
            let vm = boot_tries(&rt, &backends[i], &image, &mut results[i]);
            results[i].boots.push(vm.boot);
            vms[i] = Some(vm);
        }
        let vms: Vec<Vm> = vms.into_iter().map(|v| v.expect("booted")).collect();
        rt.block_on(async {
            for vm in &vms {
                // Warm up: the first requests fault in the agent's pages.
                checks(vm, 20, &mut Vec::new()).await;
            }
            for _ in 0..CHECKS / CHECK_BATCH {
                for &i in &order {
                    checks(&vms[i], CHECK_BATCH, &mut results[i].checks).await;
                }
            }
            let mut sent = vec![Duration::ZERO; vms.len()];
            let cpu: Vec<Cpu> = vms.iter().map(Vm::cpu).collect();
            for _ in 0..FILES {
                for &i in &order {
                    sent[i] += copy_file(&vms[i], &chunk).await;
                }
            }
            for (i, t) in sent.iter().enumerate() {
                results[i]
                    .to_guest
                    .push((FILES * FILE_SIZE) as f64 / t.as_secs_f64());
                let used = vms[i].cpu().per_gib(cpu[i], FILES * FILE_SIZE);
                results[i].cpu_to_guest.push(used);
            }
            if let (Some(rootfs), None) = (&rootfs, &output_skipped) {
                for &i in &order {
                    let cpu = vms[i].cpu();
                    match guest_agent::output_rate(
                        &vms[i].client,
                        rootfs,
                        &format!("out{round}"),
                        OUTPUT_MIB,
                    )
                    .await
                    {
                        Ok(rate) => {
                            results[i].to_host.push(rate);
                            let used = vms[i].cpu().per_gib(cpu, OUTPUT_MIB << 20);
                            results[i].cpu_to_host.push(used);
                        }
                        Err(e) => {
                            output_skipped = Some(format!("{}: {e}", backends[i].name));
                            break;
                        }
                    }
                }
            }
        });
        for (i, vm) in vms.into_iter().enumerate() {
            results[i].shutdowns.push(vm.shut_down());
        }
        print!(".");
        let _ = std::io::stdout().flush();
    }
    println!();

    println!(
        "QEMU TCG guest ({GUEST_MEM}), {rounds} rounds, VMs side by side, measurements alternating:"
    );
    println!(
        "  boot→SERVING: median of {rounds} boots; Check p50/p99: {} Health.Check calls;",
        rounds * CHECKS
    );
    println!(
        "  host→guest: CopyFile, {FILES}×{} MiB in {} KiB chunks per round, MiB/s median (best) of {rounds};",
        FILE_SIZE >> 20,
        CHUNK >> 10
    );
    println!("  guest→host: ReadStdout of `dd if=/dev/zero bs=1M count={OUTPUT_MIB}` in a container, MiB/s median (best)");
    println!(
        "{:<22} {:>12} {:>10} {:>10} {:>20} {:>20}",
        "backend", "boot→SERVING", "Check p50", "Check p99", "host→guest MiB/s", "guest→host MiB/s"
    );
    for (b, r) in backends.iter().zip(&mut results) {
        r.checks.sort();
        println!(
            "{:<22} {:>12.2?} {:>10.2?} {:>10.2?} {:>20} {:>20}",
            b.name,
            median_duration(&r.boots).unwrap_or_default(),
            percentile(&r.checks, 0.5),
            percentile(&r.checks, 0.99),
            mib_s(&r.to_guest),
            mib_s(&r.to_host),
        );
    }
    println!("CPU seconds per GiB moved (median of rounds; QEMU's includes the guest's TCG vCPU):");
    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>14}",
        "backend", "backend h→g", "QEMU h→g", "backend g→h", "QEMU g→h"
    );
    for (b, r) in backends.iter().zip(&results) {
        let col = |v: &[(f64, f64)], qemu: bool| {
            let v: Vec<f64> = v.iter().map(|c| if qemu { c.1 } else { c.0 }).collect();
            median(&v).map_or("-".into(), |m| format!("{m:.2}"))
        };
        println!(
            "{:<22} {:>14} {:>14} {:>14} {:>14}",
            b.name,
            col(&r.cpu_to_guest, false),
            col(&r.cpu_to_guest, true),
            col(&r.cpu_to_host, false),
            col(&r.cpu_to_host, true),
        );
    }
    let ours = backends.iter().position(|b| b.kind == Kind::Kestrel);
    let theirs = backends.iter().position(|b| b.kind == Kind::RustVmm);
    if let (Some(o), Some(t)) = (ours, theirs) {
        let (o, t) = (&results[o], &results[t]);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "-".into(),
        };
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        println!("ours / vhost-device-vsock (≥ 1.0× means ours is as good or better):");
        println!(
            "  host→guest throughput {}  [goal ≥ 1.0×]",
            ratio(median(&o.to_guest), median(&t.to_guest))
        );
        println!(
            "  guest→host throughput {}",
            ratio(median(&o.to_host), median(&t.to_host))
        );
        println!(
            "  Check speed (their p50 / our p50) {}",
            ratio(
                Some(percentile(&t.checks, 0.5).as_secs_f64()),
                Some(percentile(&o.checks, 0.5).as_secs_f64())
            )
        );
        println!(
            "  boot speed (their boot / our boot) {}",
            ratio(
                secs(median_duration(&t.boots)),
                secs(median_duration(&o.boots))
            )
        );
        let backend_cpu = |v: &[(f64, f64)]| median(&v.iter().map(|c| c.0).collect::<Vec<_>>());
        println!(
            "  backend CPU per GiB, host→guest (theirs / ours) {}",
            ratio(backend_cpu(&t.cpu_to_guest), backend_cpu(&o.cpu_to_guest))
        );
        println!(
            "  backend CPU per GiB, guest→host (theirs / ours) {}",
            ratio(backend_cpu(&t.cpu_to_host), backend_cpu(&o.cpu_to_host))
        );
    }
    if let Some(why) = output_skipped {
        println!("note: guest→host stopped: {why}");
    }
    for (b, r) in backends.iter().zip(&results) {
        for why in &r.boot_failures {
            println!("boot retried, {}: {why}", b.name);
        }
        let mut seen: Vec<&String> = Vec::new();
        for s in &r.shutdowns {
            if !seen.contains(&s) {
                seen.push(s);
            }
        }
        let joined: Vec<&str> = seen.iter().map(|s| s.as_str()).collect();
        println!("shutdown, {}: {}", b.name, joined.join(" | "));
    }
}
