//! Shim benchmark: State latency under the issue-12336 load (150 loops of
//! `ctr task ls` against six running containers) and RSS per shim, for the
//! Kestrel shim and containerd-shim-runc-v2 side by side, in one run.
//!
//! Needs root, containerd, runc and release builds:
//!   cargo build --release --workspace && cargo bench -p kestrel-tests --bench shim

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::{StateRequest, StateResponse};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::r#async::Client;
use containerd_shim_protos::ttrpc::Request;
use kestrel_tests::containerd::{available, Containerd};
use kestrel_tests::{busybox_rootfs, percentile, require, rss_kib};

const CONTAINERS: usize = 6;
const LOOPS: usize = 150;
const STATES: usize = 2000;

struct Measured {
    runtime: &'static str,
    p50: Duration,
    p99: Duration,
    shim_rss_kib: Vec<u64>,
    agent_rss_kib: Vec<u64>,
}

/// Asks State the way containerd 1.6 does (task API v2), which both shims serve.
async fn state(client: &Client, id: &str) -> StateResponse {
    let req = StateRequest { id: id.into(), ..Default::default() };
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
        assert_eq!(status.code(), containerd_shim_protos::ttrpc::Code::OK, "State: {}", status.message());
    }
    StateResponse::parse_from_bytes(&resp.payload).expect("decode")
}

fn pids_with(needle: &str, also: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(needle) && cmdline.contains(also) {
            pids.push(pid);
        }
    }
    pids
}

fn measure(c: &Containerd, rootfs: &str, runtime: &'static str, shim_binary: &str) -> Measured {
    let ids: Vec<String> = (0..CONTAINERS).map(|i| format!("{}-{i}", shim_binary.split('-').nth(2).unwrap_or("x"))).collect();
    for id in &ids {
        let out = c.ctr(&["run", "-d", "--runtime", runtime, "--env", "PATH=/bin", "--rootfs", rootfs, id, "sleep", "1000"]);
        assert!(out.status.success(), "ctr run {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let script = format!("while :; do ctr --address {} task ls >/dev/null 2>&1; done", c.address.display());
    let mut loops: Vec<_> = (0..LOOPS)
        .map(|_| Command::new("sh").args(["-c", &script]).stdin(Stdio::null()).process_group(0).spawn().expect("loop"))
        .collect();
    std::thread::sleep(Duration::from_secs(2));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut times = rt.block_on(async {
        // One shim per container (`ctr run` gives each its own sandbox).
        let mut clients = Vec::new();
        for id in &ids {
            let file = c.path().join(format!("state/io.containerd.runtime.v2.task/default/{id}/address"));
            let address = std::fs::read_to_string(&file).expect("shim address file");
            clients.push(Client::connect(address.trim()).await.expect("connecting to the shim"));
        }
        let mut times = Vec::with_capacity(STATES);
        for n in 0..STATES {
            let i = n % ids.len();
            let t = Instant::now();
            let resp = state(&clients[i], &ids[i]).await;
            times.push(t.elapsed());
            assert_eq!(resp.status.value(), 2, "RUNNING");
        }
        times
    });
    times.sort();
    let address = c.address.display().to_string();
    let shim_rss_kib = pids_with(shim_binary, &address).into_iter().map(rss_kib).collect();
    let agent_rss_kib = pids_with("kestrel-agent", &c.path().display().to_string()).into_iter().map(rss_kib).collect();

    for l in &mut loops {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(l.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = l.wait();
    }
    for id in &ids {
        let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["task", "delete", id]).status.success() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.ctr(&["container", "delete", id]);
    }
    Measured {
        runtime,
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        shim_rss_kib,
        agent_rss_kib,
    }
}

fn mib(kib: &[u64]) -> String {
    if kib.is_empty() {
        return "-".into();
    }
    let each: Vec<String> = kib.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
    format!("{} MiB", each.join(" / "))
}

fn main() {
    if !require("shim bench") || !available("shim bench") {
        return;
    }
    let c = Containerd::start();
    let rootfs = busybox_rootfs(c.path());
    let rootfs = rootfs.to_str().unwrap();
    let results = [
        measure(&c, rootfs, "io.containerd.kestrel.v2", "containerd-shim-kestrel-v2"),
        measure(&c, rootfs, "io.containerd.runc.v2", "containerd-shim-runc-v2"),
    ];
    println!("State over the shim socket, {STATES} calls, {CONTAINERS} running containers, {LOOPS} `ctr task ls` loops:");
    println!("{:<28} {:>10} {:>10}   {:<28} {}", "runtime", "p50", "p99", "RSS per shim", "agent RSS (process sandbox)");
    for m in &results {
        println!(
            "{:<28} {:>10.2?} {:>10.2?}   {:<28} {}",
            m.runtime,
            m.p50,
            m.p99,
            mib(&m.shim_rss_kib),
            mib(&m.agent_rss_kib)
        );
    }
}
