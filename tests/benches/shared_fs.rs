//! Shared-filesystem benchmark, in one run on QEMU (TCG here):
//!
//! 1. `kestrel run` → the container's first output, for a busybox rootfs
//!    with a 200 MiB file in it: copied into the guest with CopyFile
//!    (`[sandbox] shared_fs = "none"`) against shared through virtio-fs
//!    (`"virtio-fs"`), alternating, after one untimed run of each.
//! 2. A sequential read of a 256 MiB file: `dd` inside the guest through
//!    virtio-fs, against the same `dd` on the host.
//!
//! Needs root, QEMU, virtiofsd, the guest image and release builds:
//!   cargo build --release --workspace && cargo bench -p kestrel-tests --bench shared_fs
//! KESTREL_BENCH_RUNS (default 3) sets the timed runs per mode.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_tests::{binary, busybox_rootfs, guest_image, on_path, percentile, pseudo_random};

const IMAGE_MIB: usize = 200;
const READ_MIB: usize = 256;

struct Bench {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
}

impl Bench {
    fn config(&self, shared_fs: &str, image: &kestrel_tests::GuestImage) -> PathBuf {
        let path = self.dir.path().join(format!("kestrel-{shared_fs}.toml"));
        std::fs::write(
            &path,
            format!(
                "[sandbox]\nhypervisor = \"qemu\"\nshared_fs = \"{shared_fs}\"\nstate_dir = \"{}\"\n\
                 [vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 1024\n",
                self.dir.path().join("sandboxes").display(),
                image.vmlinux.display(),
                image.initrd.display()
            ),
        )
        .expect("config");
        path
    }

    /// `kestrel run --rm` of `args`: the time to the first byte of its
    /// output, and all of it.
    fn run(&self, config: &Path, id: &str, args: &[&str]) -> (Duration, String) {
        let started = Instant::now();
        let mut child = Command::new(binary("kestrel"))
            .env("KESTREL_CONFIG", config)
            .env("KESTREL_CLI_ROOT", self.dir.path().join("cli"))
            .args(["run", "--rm", "--rootfs"])
            .arg(&self.rootfs)
            .arg(id)
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kestrel run");
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
        let status = child.wait().expect("kestrel run");
        assert!(
            status.success() && n == 1,
            "kestrel run {id}: {status}: {err}"
        );
        (
            to_first,
            format!("{}{rest}{err}", String::from_utf8_lossy(&first[..n])),
        )
    }
}

/// busybox dd's "… copied, S seconds, R" line → MB/s as dd prints it.
fn dd_rate(output: &str) -> String {
    output
        .lines()
        .find(|l| l.contains("copied"))
        .and_then(|l| l.rsplit(", ").next())
        .unwrap_or("?")
        .trim()
        .to_string()
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
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = busybox_rootfs(dir.path());
    // Random bytes: nothing on the way may shortcut zeros.
    let chunk = pseudo_random(1 << 20);
    let mut big = std::fs::File::create(rootfs.join("image-data")).expect("image file");
    for _ in 0..IMAGE_MIB {
        std::io::Write::write_all(&mut big, &chunk).expect("writing the image file");
    }
    drop(big);
    let b = Bench { dir, rootfs };
    let copy = b.config("none", &image);
    let shared = b.config("virtio-fs", &image);

    println!("kestrel run -> first output, a rootfs with a {IMAGE_MIB} MiB file, {runs} runs each (QEMU)");
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..=runs {
        for (m, config) in [&copy, &shared].into_iter().enumerate() {
            let (t, _) = b.run(config, &format!("fsbench-{m}-{i}"), &["echo", "up"]);
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

    // Sequential read: the 256 MiB file through virtio-fs, then on the host.
    let mut big = std::fs::File::create(b.rootfs.join("read-data")).expect("read file");
    for _ in 0..READ_MIB {
        std::io::Write::write_all(&mut big, &chunk).expect("writing the read file");
    }
    drop(big);
    let (_, guest) = b.run(
        &shared,
        "fsbench-read",
        &["dd", "if=/read-data", "of=/dev/null", "bs=1048576"],
    );
    let host = Command::new("dd")
        .arg(format!("if={}", b.rootfs.join("read-data").display()))
        .args(["of=/dev/null", "bs=1M"])
        .output()
        .expect("dd on the host");
    println!(
        "sequential read of {READ_MIB} MiB: guest through virtio-fs {}, host {}",
        dd_rate(&guest),
        dd_rate(&String::from_utf8_lossy(&host.stderr))
    );
}
