//! Pod network benchmark: TCP throughput both ways and round-trip time
//! between a pod and the host side of its CNI bridge, through containerd's
//! CRI, on a Kestrel VM beside a runc container on the same bridge. Here
//! that is QEMU (TCG) first; then, where this host's KVM cannot run guest
//! user space, the bench re-runs itself inside `scripts/nested-kvm.sh`'s
//! L1 for kestrel-vmm (`kestrel-builtin`) beside runc there (everything in
//! L1 is emulated: compare the ratio to runc, not absolute figures).
//!
//! The pod's containers run busybox: an `nc` sink (host → pod), `httpd`
//! serving a file (pod → host; it sends with sendfile, where `dd | nc`
//! would measure nc's small copy loop under TCG) and an `nc -e cat` echo
//! (one byte at a time, for the RTT). All traffic stays between the
//! harness's bridge and its pods.
//!
//! Needs root, containerd, runc, the CNI plugins, QEMU, the guest image and
//! release builds:
//!   cargo build --release --workspace && cargo bench -p kestrel-tests --bench network
//! KESTREL_BENCH_MIB (default 32) sizes each transfer, KESTREL_BENCH_PINGS
//! (200) the round trips.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use kestrel_cri::api::ContainerState;
use kestrel_cri::config;
use kestrel_hypervisor::backend::select::{kvm_support, KvmSupport};
use kestrel_tests::cri::{
    available, CriContainerd, BUSYBOX_IMAGE, KESTREL_BUILTIN, KESTREL_QEMU, RUNC,
};
use kestrel_tests::{guest_image, nested_kvm_command, netns, percentile, qemu_ready, NESTED_ENV};

const START: Duration = Duration::from_secs(180);
/// L1's RAM: a 256 MiB guest, containerd, runc and the image store.
const L1_MEMORY_MIB: u32 = 3072;

struct Figures {
    to_pod_mib_s: f64,
    from_pod_mib_s: f64,
    rtt_median: Duration,
    rtt_p90: Duration,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let bench = "network";
    let in_l1 = std::env::var_os(NESTED_ENV).is_some();
    if !available(bench) {
        return ExitCode::SUCCESS;
    }
    let (vm, image) = if in_l1 {
        match guest_image(bench) {
            Some(image) => (KESTREL_BUILTIN, image),
            None => return ExitCode::FAILURE,
        }
    } else {
        match qemu_ready(bench) {
            Some(image) => (KESTREL_QEMU, image),
            None => return ExitCode::SUCCESS,
        }
    };
    let mib = env_usize("KESTREL_BENCH_MIB", 32);
    let pings = env_usize("KESTREL_BENCH_PINGS", 200);
    let c = CriContainerd::start(Some(&image));
    println!("pod <-> bridge over TCP: {mib} MiB each way, {pings} one-byte round trips");
    // The VM's cards with offloads (the default), then without: the
    // handler's configuration file is read afresh by each new sandbox.
    let vm_config = c.path().join(match vm {
        KESTREL_BUILTIN => "kestrel-builtin.toml",
        _ => "kestrel-qemu.toml",
    });
    let with_offloads = std::fs::read_to_string(&vm_config).expect("the VM handler's config");
    assert!(
        with_offloads.lines().rfind(|l| l.starts_with('[')) == Some("[vm]"),
        "the [vm] table comes last in {}",
        vm_config.display()
    );
    let runs = [
        (vm.to_string(), false, None),
        (
            format!("{vm} no offload"),
            false,
            Some("net_offload = false\n"),
        ),
        ("runc".to_string(), true, None),
    ];
    let mut results = Vec::new();
    for (label, is_runc, extra) in runs {
        std::fs::write(
            &vm_config,
            format!("{with_offloads}{}", extra.unwrap_or("")),
        )
        .expect("writing the VM handler's config");
        let handler = if is_runc { RUNC } else { vm };
        let figures = measure(&c, handler, mib, pings);
        println!(
            "{label:>26}: to pod {:>8.1} MiB/s   from pod {:>8.1} MiB/s   RTT median {:>7.3} ms  p90 {:>7.3} ms",
            figures.to_pod_mib_s,
            figures.from_pod_mib_s,
            ms(figures.rtt_median),
            ms(figures.rtt_p90),
        );
        results.push((label, figures));
    }
    std::fs::write(&vm_config, &with_offloads).expect("restoring the VM handler's config");
    let runc_figures = &results[2].1;
    for (label, figures) in &results[..2] {
        println!(
            "{label} / runc: throughput to pod {:.3}x, from pod {:.3}x; RTT {:.1}x",
            figures.to_pod_mib_s / runc_figures.to_pod_mib_s,
            figures.from_pod_mib_s / runc_figures.from_pod_mib_s,
            ms(figures.rtt_median) / ms(runc_figures.rtt_median),
        );
    }
    c.finish();
    if in_l1 || matches!(kvm_support(), KvmSupport::Native(_)) {
        return ExitCode::SUCCESS;
    }
    println!(
        "kestrel-vmm: running this bench inside scripts/nested-kvm.sh's L1; its output follows"
    );
    let exe = std::env::current_exe().expect("current_exe");
    let mut args: Vec<String> = ["KESTREL_BENCH_MIB", "KESTREL_BENCH_PINGS"]
        .iter()
        .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
        .collect();
    args.push(exe.display().to_string());
    let status = nested_kvm_command(Some(L1_MEMORY_MIB), &args)
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        other => {
            eprintln!("network bench: the run in L1 failed: {other:?}");
            ExitCode::FAILURE
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(c: &CriContainerd, handler: &str, mib: usize, pings: usize) -> Figures {
    let pod = c.pod_config(&format!("net-bench-{handler}"));
    let pod_id = c.run_pod(&pod, handler);
    let run = |name: &str, script: &str| {
        let id = c.run_container(
            &pod_id,
            &pod,
            config::container(name, BUSYBOX_IMAGE, &["sh", "-c", script]),
        );
        c.wait_for_state(&id, ContainerState::ContainerRunning, START);
        id
    };
    let status = c
        .block_on(c.client().pod_sandbox_status(&pod_id))
        .expect("PodSandboxStatus");
    let ip: Ipv4Addr = status
        .network
        .map(|n| n.ip)
        .unwrap_or_default()
        .parse()
        .expect("the pod's IPv4 address");
    let test_netns = netns::path(&c.netns);

    // Host -> pod: a sink that reads until EOF, then closes.
    run("sink", "while true; do nc -l -p 5001 > /dev/null; done");
    run("echo", "nc -ll -p 5002 -e cat");
    let to_pod = netns::spawn_in(&test_netns, move || {
        let sink = SocketAddr::new(IpAddr::V4(ip), 5001);
        let mut stream = connect(sink);
        let chunk = vec![0x5a_u8; 64 * 1024];
        let started = Instant::now();
        for _ in 0..mib * 16 {
            stream.write_all(&chunk).expect("sending to the pod");
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        // The sink closes once it has read everything.
        let _ = stream.read(&mut [0u8; 1]);
        mib as f64 / started.elapsed().as_secs_f64()
    })
    .join()
    .expect("to-pod thread");

    // Pod -> host: the pod serves a file with busybox httpd (sendfile:
    // the stack's speed, not a small copy loop's), the host fetches it.
    run(
        "source",
        &format!(
            "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1048576 count={mib} 2>/dev/null \
             && exec httpd -f -p 5003 -h /www"
        ),
    );
    let from_pod = netns::spawn_in(&test_netns, move || {
        let mut stream = connect(SocketAddr::new(IpAddr::V4(ip), 5003));
        stream
            .write_all(b"GET /blob HTTP/1.0\r\n\r\n")
            .expect("asking the pod for its file");
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        let mut started = None;
        loop {
            let n = stream.read(&mut buf).expect("receiving from the pod");
            if n == 0 {
                break;
            }
            started.get_or_insert_with(Instant::now);
            total += n;
        }
        let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
        // The file and a short header.
        assert!(
            total > mib * 1024 * 1024 && total < mib * 1024 * 1024 + 4096,
            "{total} bytes from the pod's httpd"
        );
        mib as f64 / elapsed.as_secs_f64()
    })
    .join()
    .expect("from-pod thread");

    // Round trips: one byte out, the same byte back.
    let mut rtts = netns::spawn_in(&test_netns, move || {
        let mut stream = connect(SocketAddr::new(IpAddr::V4(ip), 5002));
        stream.set_nodelay(true).ok();
        let mut rtts = Vec::with_capacity(pings);
        let mut byte = [0u8; 1];
        for i in 0..pings + 10 {
            let started = Instant::now();
            stream.write_all(b"k").expect("ping");
            stream.read_exact(&mut byte).expect("pong");
            // The first few warm the path (ARP, the echo's start).
            if i >= 10 {
                rtts.push(started.elapsed());
            }
        }
        rtts
    })
    .join()
    .expect("rtt thread");
    rtts.sort();

    c.stop_and_remove_pod(&pod_id)
        .unwrap_or_else(|e| panic!("removing pod {pod_id}: {e}"));
    Figures {
        to_pod_mib_s: to_pod,
        from_pod_mib_s: from_pod,
        rtt_median: percentile(&rtts, 0.5),
        rtt_p90: percentile(&rtts, 0.9),
    }
}

/// Connects to a server the pod is starting, retrying for up to a minute.
fn connect(address: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => {
                stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
                return stream;
            }
            Err(e) if Instant::now() >= deadline => panic!("connecting to {address}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
