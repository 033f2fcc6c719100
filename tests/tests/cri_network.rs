//! Pod networking through containerd's CRI: the CNI's network (a bridge in
//! the network namespace the harness made, containerd inside it) reaches
//! the containers of a pod — in a VM on `kestrel` (QEMU) and
//! `kestrel-builtin` (kestrel-vmm, in the nested-KVM harness), on the host
//! with `kestrel-process`, and with `runc` as the reference. Every packet
//! goes between addresses the test's own namespaces hold.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kestrel_cri::api::{ContainerState, DnsConfig};
use kestrel_cri::config;
use kestrel_tests::cri::{
    ready, CriContainerd, BUSYBOX_IMAGE, KESTREL_BUILTIN, KESTREL_PROCESS, KESTREL_QEMU, RUNC,
};
use kestrel_tests::netns::{self, PageServer};

/// A QEMU sandbox boots under TCG; in the nested harness everything is slower.
const START: Duration = Duration::from_secs(180);

fn pod_ip(c: &CriContainerd, pod_id: &str) -> Ipv4Addr {
    let status = c
        .block_on(c.client().pod_sandbox_status(pod_id))
        .expect("PodSandboxStatus");
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    ip.parse()
        .unwrap_or_else(|_| panic!("pod {pod_id} has no IPv4 address: {ip:?}"))
}

/// The CNI bridge's own address: the harness's bridge is the gateway `.1`
/// of the pods' /24.
fn bridge_address(pod: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = pod.octets();
    Ipv4Addr::new(a, b, c, 1)
}

/// The network namespace the CNI plugin put the pod in (its sandbox
/// container's spec names it).
fn pod_netns(c: &CriContainerd, pod_id: &str) -> PathBuf {
    let out = c.ctr(&["containers", "info", pod_id]);
    assert!(out.status.success(), "ctr containers info {pod_id}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("container info");
    let namespaces = info["Spec"]["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    namespaces
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .map(PathBuf::from)
        .expect("the pod's network namespace path")
}

/// `ip -o link` and `tc qdisc` inside the namespace at `path`.
fn in_netns(path: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", path.display()))
        .arg(program)
        .args(args)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Prints what the pod's container and its network namespace see: for a
/// failure's report.
fn diagnose(c: &CriContainerd, container: &str, pod_id: &str) {
    let inside = c.exec(
        container,
        &[
            "sh",
            "-c",
            "ip addr; ip route; ip neigh; netstat -tln; cat /proc/net/dev",
        ],
    );
    eprintln!(
        "in the container:\n{}{}",
        String::from_utf8_lossy(&inside.stdout),
        String::from_utf8_lossy(&inside.stderr)
    );
    let netns = pod_netns(c, pod_id);
    eprintln!(
        "in the pod's namespace:\n{}",
        in_netns(&netns, "ip", &["-s", "addr"])
    );
    eprintln!(
        "its tc filters:\n{}",
        in_netns(
            &netns,
            "tc",
            &["-s", "filter", "show", "dev", "eth0", "ingress"]
        )
    );
}

/// `GET /` from inside container `id`, with busybox `nc` (Debian's static
/// busybox `wget` crashes resolving even a literal address): the body.
fn fetch(c: &CriContainerd, id: &str, address: SocketAddr) -> String {
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {} {}",
        address.ip(),
        address.port()
    );
    let response = c.exec_stdout(id, &["sh", "-c", &script]);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response from {address}: {response:?}"));
    assert!(head.contains(" 200 "), "{address} answered {head:?}");
    body.to_string()
}

/// A pod serving a page with busybox httpd is fetched from the bridge's
/// side; a container fetches a page the test serves on the bridge; a
/// second pod fetches the first one's page; the pod's DNS settings are in
/// its containers' resolv.conf; after RemovePodSandbox nothing is left.
fn the_pod_network_reaches_containers(test: &str, handler: &str) {
    let Some(image) = ready(test, handler) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let test_netns = netns::path(&c.netns);
    let links_before = netns::links(&c.netns);

    let mut web_pod = c.pod_config("web");
    web_pod.dns_config = Some(DnsConfig {
        servers: vec!["10.77.0.53".into()],
        searches: vec!["pods.kestrel.test".into()],
        options: vec!["ndots:3".into()],
    });
    let web_id = c.run_pod(&web_pod, handler);
    let web = c.run_container(
        &web_id,
        &web_pod,
        config::container(
            "httpd",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo page-of-$(hostname) > /www/index.html && exec httpd -f -p 80 -h /www",
            ],
        ),
    );
    c.wait_for_state(&web, ContainerState::ContainerRunning, START);
    let web_ip = pod_ip(&c, &web_id);
    let page = format!("page-of-{}", web_pod.hostname);

    // The bridge's side (the test's namespace) reaches the pod.
    let got = netns::http_get(&test_netns, IpAddr::V4(web_ip), 80, Duration::from_secs(60))
        .unwrap_or_else(|e| {
            diagnose(&c, &web, &web_id);
            panic!("{handler}: fetching the pod's page: {e}")
        });
    assert_eq!(
        got.trim(),
        page,
        "{handler}: the pod's page from the bridge"
    );

    // The pod reaches a server on the bridge.
    let server = PageServer::start(
        &test_netns,
        SocketAddr::new(IpAddr::V4(bridge_address(web_ip)), 0),
        "page-of-the-bridge",
        1,
        Duration::from_secs(120),
    );
    let got = fetch(&c, &web, server.address);
    assert_eq!(
        got.trim(),
        "page-of-the-bridge",
        "{handler}: the bridge's page from the pod"
    );
    assert_eq!(server.served(), 1);

    // Pod to pod, across the bridge.
    let client_pod = c.pod_config("client");
    let client_id = c.run_pod(&client_pod, handler);
    let client = c.run_container(
        &client_id,
        &client_pod,
        config::container("client", BUSYBOX_IMAGE, &["sleep", "300"]),
    );
    c.wait_for_state(&client, ContainerState::ContainerRunning, START);
    let got = fetch(&c, &client, SocketAddr::new(IpAddr::V4(web_ip), 80));
    assert_eq!(got.trim(), page, "{handler}: one pod's page from another");

    // The pod's DNS settings, as CRI wrote them for it.
    let resolv = c.exec_stdout(&web, &["cat", "/etc/resolv.conf"]);
    for line in [
        "nameserver 10.77.0.53",
        "search pods.kestrel.test",
        "options ndots:3",
    ] {
        assert!(
            resolv.lines().any(|l| l.trim() == line),
            "{handler}: {line:?} in {resolv:?}"
        );
    }

    // A VM's card is a tap mirrored to the pod's veth; it goes with the pod.
    let web_netns = pod_netns(&c, &web_id);
    let vm = handler == KESTREL_QEMU || handler == KESTREL_BUILTIN;
    if vm {
        let links = in_netns(&web_netns, "ip", &["-o", "link"]);
        assert!(links.contains("tap0_kestrel"), "{links}");
        let filters = in_netns(
            &web_netns,
            "tc",
            &["filter", "show", "dev", "eth0", "ingress"],
        );
        assert!(filters.contains("mirred"), "{filters}");
    }
    for pod in [&web_id, &client_id] {
        c.stop_and_remove_pod(pod)
            .unwrap_or_else(|e| panic!("RemovePodSandbox {pod}: {e}"));
    }
    if web_netns.exists() {
        let links = in_netns(&web_netns, "ip", &["-o", "link"]);
        assert!(!links.contains("_kestrel"), "a tap left: {links}");
        let qdiscs = in_netns(&web_netns, "tc", &["qdisc", "show", "ingress"]);
        assert!(!qdiscs.contains("ingress"), "a tc ingress left: {qdiscs}");
    }
    let mut links_after = netns::links(&c.netns);
    // The bridge outlives its pods, as with any CNI runtime.
    links_after.retain(|l| l != "kcri0");
    let mut expected = links_before;
    expected.retain(|l| l != "kcri0");
    assert_eq!(
        links_after, expected,
        "{handler}: interfaces left in the test's namespace"
    );
    c.assert_nothing_left();
    c.finish();
}

#[test]
fn the_pod_network_reaches_containers_on_runc() {
    the_pod_network_reaches_containers("the_pod_network_reaches_containers_on_runc", RUNC);
}

#[test]
fn the_pod_network_reaches_containers_on_kestrel_process() {
    the_pod_network_reaches_containers(
        "the_pod_network_reaches_containers_on_kestrel_process",
        KESTREL_PROCESS,
    );
}

#[test]
fn the_pod_network_reaches_containers_on_kestrel_qemu() {
    the_pod_network_reaches_containers(
        "the_pod_network_reaches_containers_on_kestrel_qemu",
        KESTREL_QEMU,
    );
}

#[test]
fn the_pod_network_reaches_containers_on_kestrel_builtin() {
    the_pod_network_reaches_containers(
        "the_pod_network_reaches_containers_on_kestrel_builtin",
        KESTREL_BUILTIN,
    );
}

/// A network namespace of this test's own, removed on drop.
struct OwnNetns(String);

impl OwnNetns {
    fn new(tag: &str) -> OwnNetns {
        let name = format!("kbad-{tag}-{}", std::process::id());
        run(&["netns", "add", &name]);
        OwnNetns(name)
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {args:?}");
}

/// `ctr run` of a kestrel (QEMU) container in the network namespace `path`:
/// ctr's combined output, which must be a failure.
fn run_refused(c: &CriContainerd, id: &str, path: &Path) -> String {
    let config = c.path().join("kestrel-qemu.toml");
    let out = c.ctr(&[
        "run",
        "--runtime",
        "io.containerd.kestrel.v2",
        "--runtime-config-path",
        &config.display().to_string(),
        "--with-ns",
        &format!("network:{}", path.display()),
        BUSYBOX_IMAGE,
        id,
        "true",
    ]);
    assert!(!out.status.success(), "ctr run {id} succeeded");
    let _ = c.ctr(&["containers", "delete", id]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("ctr run {id} refused as it should be: {text}");
    text
}

/// A sandbox whose network namespace was removed before it started, and
/// one whose namespace holds an interface no virtio-net card can stand for
/// (a layer-3 tun), fail naming the problem and leave nothing: no VM, no
/// sandbox state, no tap or tc ingress in the namespace.
#[test]
fn bad_pod_networks_are_refused_naming_the_problem_and_leave_nothing() {
    let test = "bad_pod_networks_are_refused_naming_the_problem_and_leave_nothing";
    let Some(image) = ready(test, KESTREL_QEMU) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());

    let gone = OwnNetns::new("gone");
    let gone_path = netns::path(&gone.0);
    drop(gone);
    let err = run_refused(&c, "badnet-gone", &gone_path);
    assert!(
        err.contains(&gone_path.display().to_string()) && err.contains("network namespace"),
        "{err}"
    );
    c.assert_nothing_running();

    let tun = OwnNetns::new("tun");
    run(&[
        "-n", &tun.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    run(&["-n", &tun.0, "tuntap", "add", "dev", "tun9", "mode", "tun"]);
    let err = run_refused(&c, "badnet-tun", &netns::path(&tun.0));
    assert!(
        err.contains("tun9") && err.contains("cannot be mirrored"),
        "{err}"
    );
    let links = netns::links(&tun.0);
    assert!(!links.iter().any(|l| l.ends_with("_kestrel")), "{links:?}");
    let qdiscs = Command::new("tc")
        .args(["-n", &tun.0, "qdisc", "show", "ingress"])
        .output()
        .expect("tc");
    assert!(!String::from_utf8_lossy(&qdiscs.stdout).contains("ingress"));
    c.assert_nothing_running();
    c.finish();
}

/// A VM sandbox whose shim is killed: containerd's `delete` action kills
/// the VM and takes the tap and the mirror's qdiscs out of the network
/// namespace (the test's own, so it outlives the sandbox and can be looked
/// into afterwards).
#[test]
fn a_killed_shims_delete_action_removes_the_tap_and_the_mirror() {
    let test = "a_killed_shims_delete_action_removes_the_tap_and_the_mirror";
    let Some(image) = ready(test, KESTREL_QEMU) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let pod = OwnNetns::new("crash");
    let peer = OwnNetns::new("crashp");
    run(&[
        "-n", &pod.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    run(&["-n", &pod.0, "link", "set", "eth1", "netns", &peer.0]);
    run(&["-n", &pod.0, "addr", "add", "10.77.9.2/24", "dev", "eth0"]);
    run(&["-n", &pod.0, "link", "set", "eth0", "up"]);
    let config = c.path().join("kestrel-qemu.toml");
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.kestrel.v2",
        "--runtime-config-path",
        &config.display().to_string(),
        "--with-ns",
        &format!("network:{}", netns::path(&pod.0).display()),
        BUSYBOX_IMAGE,
        "crashnet",
        "sleep",
        "300",
    ]);
    assert!(
        out.status.success(),
        "ctr run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(netns::links(&pod.0).contains(&"tap0_kestrel".to_string()));

    c.kill_the_shim_and_await_cleanup();
    let links = netns::links(&pod.0);
    assert!(!links.iter().any(|l| l.ends_with("_kestrel")), "{links:?}");
    let qdiscs = Command::new("tc")
        .args(["-n", &pod.0, "qdisc", "show", "dev", "eth0", "ingress"])
        .output()
        .expect("tc");
    assert!(!String::from_utf8_lossy(&qdiscs.stdout).contains("ingress"));
    let _ = c.ctr(&["tasks", "delete", "crashnet"]);
    let _ = c.ctr(&["containers", "delete", "crashnet"]);
    c.assert_nothing_running();
    c.finish();
}
