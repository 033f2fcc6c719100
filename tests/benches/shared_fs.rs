//! Shared-filesystem benchmark, in one run on QEMU (TCG here):
//!
//! 1. Container create → its first output, in a running QEMU pod (ctr
//!    through a private containerd, pods by `io.kubernetes.cri.sandbox-id`
//!    as CRI makes them), for a busybox rootfs with a 200 MiB file in it:
//!    copied into the guest with CopyFile (a pod with `[sandbox] shared_fs
//!    = "none"`) against shared through virtio-fs (`"virtio-fs"`),
//!    alternating, after one untimed run of each.
//! 2. A sequential read of a 256 MiB file: `dd` inside the guest through
//!    virtio-fs, against the same `dd` on the host.
//!
//! Needs root, containerd, QEMU, virtiofsd, the guest image and release builds:
//!   cargo build --release --workspace && cargo bench -p kestrel-tests --bench shared_fs
//! KESTREL_BENCH_RUNS (default 3) sets the timed runs per mode.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_tests::containerd::{text, Containerd, RUNTIME};
use kestrel_tests::{binary, busybox_rootfs, guest_image, on_path, percentile, pseudo_random};

const IMAGE_MIB: usize = 200;
const READ_MIB: usize = 256;

/// Kestrel's shim under a private containerd, with a QEMU pod per mode.
struct Bench {
    c: Containerd,
    small: PathBuf,
    big: PathBuf,
}

impl Bench {
    /// The configuration a mode's pod starts with.
    fn config(&self, shared_fs: &str, image: &kestrel_tests::GuestImage) -> PathBuf {
        let path = self.c.path().join(format!("kestrel-{shared_fs}.toml"));
        std::fs::write(
            &path,
            format!(
                "[sandbox]\nhypervisor = \"qemu\"\nshared_fs = \"{shared_fs}\"\nagent_path = \"{}\"\n\
                 state_dir = \"{}\"\n[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 1024\n",
                binary("kestrel-agent").display(),
                self.c.path().join("sandboxes").display(),
                image.vmlinux.display(),
                image.initrd.display()
            ),
        )
        .expect("config");
        path
    }

    /// Starts the pod `pod` (its first container, which sleeps) on `config`.
    fn pod(&self, config: &Path, pod: &str) {
        let out = self.c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            config.to_str().unwrap(),
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &format!("io.kubernetes.cri.sandbox-id={pod}"),
            "--env",
            "PATH=/bin",
            "--rootfs",
            self.small.to_str().unwrap(),
            pod,
            "sleep",
            "3600",
        ]);
        assert!(out.status.success(), "pod {pod}: {}", text(&out.stderr));
    }

    /// `ctr run --rm` of `args` in pod `pod` from the big rootfs: the time
    /// from the command to the first byte of its output, and the output.
    fn run(&self, pod: &str, id: &str, args: &[&str]) -> (Duration, String) {
        let sandbox = format!("io.kubernetes.cri.sandbox-id={pod}");
        let mut argv = vec![
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            &sandbox,
            "--env",
            "PATH=/bin",
            "--rootfs",
            self.big.to_str().unwrap(),
            id,
        ];
        argv.extend_from_slice(args);
        let started = Instant::now();
        let mut child = self
            .c
            .ctr_command(&argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr run");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut first = [0u8; 1];
        let n = stdout
            .read(&mut first)
            .expect("reading the container's output");
        let to_first = started.elapsed();
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).expect("output");
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .ok();
        let status = child.wait().expect("ctr run");
        assert!(status.success() && n == 1, "ctr run {id}: {status}: {err}");
        (
            to_first,
            format!("{}{rest}", String::from_utf8_lossy(&first[..n])),
        )
    }
}

fn main() {
    let bench = "shared_fs";
    if !nix::unistd::geteuid().is_root() {
        eprintln!("shared_fs bench: needs root");
        return;
    }
    for program in [
        "qemu-system-x86_64",
        kestrel_hypervisor::backend::virtiofsd::DEFAULT_BINARY,
    ] {
        if !on_path(program) {
            eprintln!("shared_fs bench: needs {program}");
            return;
        }
    }
    let Some(image) = guest_image(bench) else {
        return;
    };
    let runs: usize = std::env::var("KESTREL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let c = Containerd::start_configured("", "");
    let small = busybox_rootfs(&c.path().join("small"));
    let big = busybox_rootfs(&c.path().join("big"));
    // Random bytes: nothing on the way may shortcut zeros.
    let chunk = pseudo_random(1 << 20);
    let write = |name: &str, mib: usize| {
        let mut file = std::fs::File::create(big.join(name)).expect("data file");
        for _ in 0..mib {
            std::io::Write::write_all(&mut file, &chunk).expect("writing the data file");
        }
    };
    write("image-data", IMAGE_MIB);
    write("read-data", READ_MIB);
    let b = Bench { c, small, big };
    let modes = ["none", "virtio-fs"];
    for mode in modes {
        b.pod(&b.config(mode, &image), &format!("fspod-{mode}"));
    }

    println!(
        "container create -> first output in a running QEMU pod, a rootfs with a {IMAGE_MIB} MiB file, {runs} runs each"
    );
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..=runs {
        for (m, mode) in modes.iter().enumerate() {
            let (t, _) = b.run(
                &format!("fspod-{mode}"),
                &format!("fsbench-{m}-{i}"),
                &["echo", "up"],
            );
            if i > 0 {
                times[m].push(t);
            }
        }
    }
    let medians: Vec<Duration> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            percentile(t, 0.5)
        })
        .collect();
    for (label, median) in ["CopyFile", "virtio-fs"].iter().zip(&medians) {
        println!(
            "{label:>10}: median {:>8.1} ms",
            median.as_secs_f64() * 1000.0
        );
    }
    println!(
        "virtio-fs is {:.1}x faster to first output",
        medians[0].as_secs_f64() / medians[1].as_secs_f64()
    );

    // Sequential read: the 256 MiB file on the host, then through
    // virtio-fs (from the host's page cache both times: the host's read
    // fills it). The guest times its own read by its uptime clock (busybox
    // dd prints no rate here).
    let started = Instant::now();
    let host = Command::new("dd")
        .arg(format!("if={}", b.big.join("read-data").display()))
        .args(["of=/dev/null", "bs=1M"])
        .output()
        .expect("dd on the host");
    assert!(host.status.success(), "dd on the host");
    let host_s = started.elapsed().as_secs_f64();
    let (_, guest) = b.run(
        "fspod-virtio-fs",
        "fsbench-read",
        &[
            "sh",
            "-c",
            "a=$(cut -d' ' -f1 /proc/uptime); dd if=/read-data of=/dev/null bs=1048576 2>/dev/null; \
             b=$(cut -d' ' -f1 /proc/uptime); echo $a $b",
        ],
    );
    let clock: Vec<f64> = guest
        .split_whitespace()
        .map(|t| t.parse().expect("uptime"))
        .collect();
    let guest_s = (clock[1] - clock[0]).max(0.01);
    let mib = READ_MIB as f64;
    println!(
        "sequential read of {READ_MIB} MiB: guest through virtio-fs {:.1} MiB/s, host {:.1} MiB/s ({:.3}x)",
        mib / guest_s,
        mib / host_s,
        host_s / guest_s
    );
    for mode in modes {
        b.c.kill_and_delete(&format!("fspod-{mode}"));
    }
    b.c.assert_nothing_left();
}
