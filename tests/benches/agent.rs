//! Agent benchmark: static binary size, idle RSS, Health.Check round trip
//! over the unix socket, and create+start+wait latency of `true`, each
//! printed beside its target. Run with `cargo bench -p kestrel-tests --bench agent`
//! after building the static agent (see README).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kestrel_protocols::health::CheckRequest;
use kestrel_tests::*;

const CHECKS: usize = 5000;
const RUNS: usize = 40;

fn verdict(ok: bool) -> &'static str {
    if ok {
        "meets target"
    } else {
        "MISSES target"
    }
}

fn main() {
    let (agent_bin, kind): (PathBuf, &str) = match static_agent() {
        Some(p) => (p, "static release"),
        None => {
            println!(
                "note: static agent not built; measuring target/release/kestrel-agent instead"
            );
            println!("      build it with: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p kestrel-agent");
            (binary("kestrel-agent"), "dynamic release")
        }
    };
    let size = std::fs::metadata(&agent_bin).expect("agent binary").len();
    let mib = size as f64 / (1024.0 * 1024.0);
    println!(
        "agent binary ({kind}, static={}): {mib:.2} MiB  [target <= 6 MiB: {}]",
        is_static_elf(&agent_bin).unwrap_or(false),
        verdict(mib <= 6.0)
    );

    let agent = Agent::start_binary(&agent_bin);
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib(agent.pid()) as f64 / 1024.0;
    println!(
        "agent idle RSS: {rss:.2} MiB  [target <= 4 MiB: {}]",
        verdict(rss <= 4.0)
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, health) = agent.client().await;
        let req = CheckRequest::new();
        for _ in 0..200 {
            health.check(prompt(), &req).await.expect("warm-up Check");
        }
        let mut times = Vec::with_capacity(CHECKS);
        for _ in 0..CHECKS {
            let t = Instant::now();
            health.check(prompt(), &req).await.expect("Check");
            times.push(t.elapsed());
        }
        times.sort();
        let p50 = percentile(&times, 0.5);
        println!("Health.Check over unix socket ({CHECKS} calls): p50 {:.1} µs, p99 {:.1} µs  [target p50 <= 100 µs: {}]",
            p50.as_secs_f64() * 1e6, percentile(&times, 0.99).as_secs_f64() * 1e6, verdict(p50 <= Duration::from_micros(100)));

        if !require("create+start+wait benchmark") {
            return;
        }
        let rootfs = busybox_rootfs(agent.dir.path());
        let mut lat = Vec::with_capacity(RUNS);
        let mut removal = Vec::with_capacity(RUNS);
        for i in 0..RUNS {
            let id = format!("bench{i}");
            let t = Instant::now();
            client.create_container(prompt(), &create_request(&id, spec(&rootfs, &["true"]))).await.expect("create");
            start(&client, &id).await;
            assert_eq!(wait(&client, &id, "").await.expect("wait"), 0);
            lat.push(t.elapsed());
            let t = Instant::now();
            remove(&client, &id).await.expect("remove");
            removal.push(t.elapsed());
        }
        lat.sort();
        removal.sort();
        println!("create+start+wait of `true` ({RUNS} runs): p50 {:.2} ms, p99 {:.2} ms; RemoveContainer p50 {:.2} ms",
            percentile(&lat, 0.5).as_secs_f64() * 1e3, percentile(&lat, 0.99).as_secs_f64() * 1e3,
            percentile(&removal, 0.5).as_secs_f64() * 1e3);
        let rss_after = rss_kib(agent.pid()) as f64 / 1024.0;
        println!("agent RSS after {RUNS} containers: {rss_after:.2} MiB");
    });
}
