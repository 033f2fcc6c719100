//! Shim benchmark: State latency under the issue-12336 load (150 loops of
//! `ctr task ls`) and RSS per shim, for the Kestrel shim and
//! containerd-shim-runc-v2 side by side in one run. Both runtimes run six
//! containers at once and State calls alternate between them, so both see
//! the same load at the same moments (on a 2-core machine the load
//! saturates the CPU, and sequential runs would compare noise).
//!
//! Needs root, containerd, runc and release builds:
//!   cargo build --release --workspace && cargo bench -p kestrel-tests --bench shim
//! KESTREL_BENCH_LOOPS=N changes the number of loops (0: idle shims).

use std::time::{Duration, Instant};

use containerd_shim_protos::api::{StateRequest, StateResponse};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::r#async::Client;
use containerd_shim_protos::ttrpc::Request;
use kestrel_tests::containerd::{available, Containerd};
use kestrel_tests::{busybox_rootfs, percentile, require, rss_kib};

const CONTAINERS: usize = 6;
const LOOPS: usize = 150;
/// State calls per runtime.
const STATES: usize = 3000;

struct Runtime {
    name: &'static str,
    shim: &'static str,
    prefix: &'static str,
}

const RUNTIMES: [Runtime; 2] = [
    Runtime {
        name: "io.containerd.kestrel.v2",
        shim: "containerd-shim-kestrel-v2",
        prefix: "kestrel",
    },
    Runtime {
        name: "io.containerd.runc.v2",
        shim: "containerd-shim-runc-v2",
        prefix: "runc",
    },
];

/// Asks State the way containerd 1.6 does (task API v2), which both shims serve.
async fn state(client: &Client, id: &str) -> StateResponse {
    let req = StateRequest {
        id: id.into(),
        ..Default::default()
    };
    let resp = client
        .request(Request {
            service: "containerd.task.v2.Task".into(),
            method: "State".into(),
            payload: req.write_to_bytes().expect("encode"),
            timeout_nano: Duration::from_secs(2).as_nanos() as i64,
            ..Default::default()
        })
        .await
        .expect("State");
    if let Some(status) = resp.status.as_ref() {
        assert_eq!(
            status.code(),
            containerd_shim_protos::ttrpc::Code::OK,
            "State: {}",
            status.message()
        );
    }
    StateResponse::parse_from_bytes(&resp.payload).expect("decode")
}

fn pids_with(needle: &str, also: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(needle) && cmdline.contains(also) {
            pids.push(pid);
        }
    }
    pids
}

fn loops() -> usize {
    std::env::var("KESTREL_BENCH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LOOPS)
}

fn ids(r: &Runtime) -> Vec<String> {
    (0..CONTAINERS)
        .map(|i| format!("{}-{i}", r.prefix))
        .collect()
}

fn mib(kib: &[u64]) -> String {
    if kib.is_empty() {
        return "-".into();
    }
    let avg = kib.iter().sum::<u64>() as f64 / kib.len() as f64 / 1024.0;
    let max = *kib.iter().max().unwrap() as f64 / 1024.0;
    format!("{avg:.1} MiB (max {max:.1}, {} shims)", kib.len())
}

fn main() {
    if !require("shim bench") || !available("shim bench") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    for r in &RUNTIMES {
        for id in ids(r) {
            let out = c.ctr(&[
                "run",
                "-d",
                "--runtime",
                r.name,
                "--env",
                "PATH=/bin",
                "--rootfs",
                rootfs,
                &id,
                "sleep",
                "1000",
            ]);
            assert!(
                out.status.success(),
                "ctr run {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let load = c.task_ls_load(loops());
    std::thread::sleep(Duration::from_secs(2));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut times = rt.block_on(async {
        // Each `ctr run` container has its own shim.
        let mut clients = Vec::new();
        for r in &RUNTIMES {
            let mut per = Vec::new();
            for id in ids(r) {
                let file = c.path().join(format!(
                    "state/io.containerd.runtime.v2.task/default/{id}/address"
                ));
                let address = std::fs::read_to_string(&file).expect("shim address file");
                per.push((
                    id,
                    Client::connect(address.trim())
                        .await
                        .expect("connecting to the shim"),
                ));
            }
            clients.push(per);
        }
        let mut times = vec![Vec::with_capacity(STATES); RUNTIMES.len()];
        for n in 0..STATES {
            for (r, per) in clients.iter().enumerate() {
                let (id, client) = &per[n % per.len()];
                let t = Instant::now();
                let resp = state(client, id).await;
                times[r].push(t.elapsed());
                assert_eq!(resp.status.value(), 2, "{id} is RUNNING");
            }
        }
        times
    });
    let address = c.address.display().to_string();
    let shim_rss: Vec<Vec<u64>> = RUNTIMES
        .iter()
        .map(|r| {
            pids_with(r.shim, &address)
                .into_iter()
                .map(rss_kib)
                .collect()
        })
        .collect();
    let agent_rss: Vec<u64> = pids_with("kestrel-agent", &c.path().display().to_string())
        .into_iter()
        .map(rss_kib)
        .collect();

    drop(load);
    for r in &RUNTIMES {
        for id in ids(r) {
            let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !c.ctr(&["task", "delete", &id]).status.success() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.ctr(&["container", "delete", &id]);
        }
    }

    println!(
        "State over each shim's socket, {STATES} calls per runtime alternating, {} containers each, {} `ctr task ls` loops:",
        CONTAINERS,
        loops()
    );
    println!(
        "{:<26} {:>10} {:>10}   RSS per shim",
        "runtime", "p50", "p99"
    );
    for (i, r) in RUNTIMES.iter().enumerate() {
        let t = &mut times[i];
        t.sort();
        println!(
            "{:<26} {:>10.2?} {:>10.2?}   {}",
            r.name,
            percentile(t, 0.5),
            percentile(t, 0.99),
            mib(&shim_rss[i])
        );
    }
    println!(
        "kestrel-agent per process sandbox: {}",
        mib(&agent_rss).replace("shims", "agents")
    );
}
