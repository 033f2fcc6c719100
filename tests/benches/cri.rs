//! CRI benchmark: how long a pod takes from RunPodSandbox until its first
//! container is Running (CreateContainer + StartContainer + ContainerStatus
//! polled every 10 ms), through containerd 1.6's CRI plugin, on Kestrel's
//! QEMU sandboxes with runc beside them for scale. Median and spread of
//! ten pods each, run one after the other; each pod is removed before the
//! next starts.
//!
//! Needs root, containerd, runc, the CNI plugins, QEMU, the guest image and
//! release builds:
//!   cargo build --release --workspace && cargo bench -p kestrel-tests --bench cri
//! KESTREL_BENCH_PODS=N changes the number of pods per runtime.

use std::time::{Duration, Instant};

use kestrel_cri::api::ContainerState;
use kestrel_cri::config;
use kestrel_tests::cri::{available, CriContainerd, BUSYBOX_IMAGE, KESTREL_QEMU, RUNC};
use kestrel_tests::{percentile, qemu_ready};

fn main() {
    let bench = "cri";
    if !available(bench) {
        return;
    }
    let Some(image) = qemu_ready(bench) else {
        return;
    };
    let pods: usize = std::env::var("KESTREL_BENCH_PODS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let c = CriContainerd::start(Some(&image));
    println!("RunPodSandbox -> first container Running, {pods} pods each, one at a time");
    for handler in [KESTREL_QEMU, RUNC] {
        let mut times = Vec::new();
        for i in 0..pods {
            let pod = c.pod_config(&format!("bench-{handler}-{i}"));
            let container = config::container("first", BUSYBOX_IMAGE, &["sleep", "300"]);
            let started = Instant::now();
            let pod_id = c.run_pod(&pod, handler);
            let id = c.run_container(&pod_id, &pod, container);
            c.wait_for_state(
                &id,
                ContainerState::ContainerRunning,
                Duration::from_secs(120),
            );
            times.push(started.elapsed());
            c.stop_and_remove_pod(&pod_id)
                .unwrap_or_else(|e| panic!("removing pod {pod_id}: {e}"));
        }
        times.sort();
        println!(
            "{handler:>8}: median {:>7.1} ms   min {:>7.1} ms   max {:>7.1} ms",
            ms(percentile(&times, 0.5)),
            ms(times[0]),
            ms(times[times.len() - 1]),
        );
    }
    c.finish();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
