//! `kestrel run --network` and `-p` end to end, on the process backend (the
//! sandbox's agent on the host, in the container's network namespace) and
//! in a QEMU VM (a tap in that namespace, mirrored to the CNI's veth).
//!
//! Every test runs `kestrel` inside a network namespace it made (entered
//! with `nsenter --net`, as the CRI harness runs containerd), with a CNI
//! network of its own: the bridge, its addresses, the iptables rules of
//! portmap and firewall all live in that namespace and go with it. Traffic
//! only ever goes to addresses the test gave itself, and every wait is
//! bounded.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kestrel_host::network::netns;
use kestrel_tests::{binary, busybox_rootfs, on_path, qemu_ready, require, skip, GuestImage};

const CNI_BIN_DIR: &str = "/usr/lib/cni";
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "firewall"];
const PAGE: &str = "hello from net-cni\n";

/// Whether this machine can run the tests: root, busybox, iproute2,
/// nsenter, iptables and the CNI plugins. Records the skip when not.
fn available(test: &str) -> bool {
    if !require(test) {
        return false;
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("iptables", "iptables"),
    ] {
        if !on_path(tool) {
            skip(test, &format!("needs {tool} (apt-get install {package})"));
            return false;
        }
    }
    for plugin in CNI_PLUGINS {
        if !Path::new(CNI_BIN_DIR).join(plugin).exists() {
            skip(
                test,
                &format!("needs the CNI plugin {CNI_BIN_DIR}/{plugin} (apt-get install containernetworking-plugins)"),
            );
            return false;
        }
    }
    true
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A private CLI root and configuration, a network namespace to run
/// `kestrel` in, and CNI networks that live there: `bridge` (bridge,
/// host-local, portmap, firewall) and `broken` (bridge, then a plugin that
/// does not exist).
struct NetTest {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    /// The test's namespace, as `ip netns` names it.
    netns: String,
    /// The third octet of the test's subnets, 10.91.N.0/24 and 10.92.N.0/24.
    n: u32,
    /// The backend `run` uses.
    hypervisor: &'static str,
}

impl NetTest {
    fn new() -> NetTest {
        NetTest::with_backend("process", None)
    }

    /// A test whose containers run on `hypervisor`, booting `image` for a
    /// VM backend.
    fn with_backend(hypervisor: &'static str, image: Option<&GuestImage>) -> NetTest {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed)) % 250;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        let rootfs = busybox_rootfs(&d);
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/httpd")).expect("httpd applet");
        std::fs::create_dir_all(rootfs.join("www")).expect("www");
        std::fs::write(rootfs.join("www/index.html"), PAGE).expect("page");

        let netns = format!("knet-{}-{n}", std::process::id());
        let test = NetTest {
            dir,
            rootfs,
            netns,
            n,
            hypervisor,
        };
        ok(Command::new("ip").args(["netns", "add", &test.netns]));
        ok(Command::new("ip").args(["-n", &test.netns, "link", "set", "lo", "up"]));

        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).expect("cni dir");
        let bridge = |bridge: &str, subnet: &str, ipam: &str, more: serde_json::Value| {
            let mut plugins = vec![serde_json::json!({
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": d.join(ipam),
                },
            })];
            plugins.extend(more.as_array().cloned().unwrap_or_default());
            plugins
        };
        let write = |file: &str, name: &str, plugins: Vec<serde_json::Value>| {
            let list = serde_json::json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins});
            std::fs::write(cni.join(file), serde_json::to_vec_pretty(&list).unwrap())
                .expect("conflist");
        };
        write(
            "10-bridge.conflist",
            "bridge",
            bridge(
                &format!("knet{n}"),
                &format!("10.91.{n}.0/24"),
                "ipam",
                serde_json::json!([
                    { "type": "portmap", "capabilities": { "portMappings": true } },
                    { "type": "firewall" },
                ]),
            ),
        );
        write(
            "20-broken.conflist",
            "broken",
            bridge(
                &format!("kbrk{n}"),
                &format!("10.92.{n}.0/24"),
                "ipam-broken",
                serde_json::json!([{ "type": "kestrel-test-no-such-plugin" }]),
            ),
        );
        let mut config = format!(
            "[sandbox]\nagent_path = \"{}\"\nstate_dir = \"{}\"\nstop_grace_ms = 2000\n[network]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"{CNI_BIN_DIR}\"]\n",
            binary("kestrel-agent").display(),
            d.join("sandboxes").display(),
            cni.display(),
        );
        if let Some(image) = image {
            config.push_str(&format!(
                "[vm]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
                image.vmlinux.display(),
                image.initrd.display()
            ));
        }
        std::fs::write(d.join("kestrel.toml"), config).expect("config");
        test
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("cli")
    }

    fn netns_file(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// `program args` in the test's network namespace.
    fn in_netns(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns_file()))
            .arg(program)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn kestrel(&self, args: &[&str]) -> Output {
        self.in_netns(&binary("kestrel"), args)
            .env("KESTREL_CONFIG", self.dir.path().join("kestrel.toml"))
            .env("KESTREL_CLI_ROOT", self.root())
            .env_remove("KESTREL_HYPERVISOR")
            .output()
            .expect("running kestrel")
    }

    /// `kestrel run --hypervisor <backend> --rootfs <busybox> <flags> <id> -- <cmd>`.
    fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let rootfs = self.rootfs.to_str().unwrap();
        let mut args = vec!["run", "--hypervisor", self.hypervisor, "--rootfs", rootfs];
        args.extend_from_slice(flags);
        args.push(id);
        args.push("--");
        args.extend_from_slice(cmd);
        self.kestrel(&args)
    }

    /// The body of `GET /` at `address` (`IP:PORT`), asked from the test's
    /// namespace (by a thread that enters it and ends after); `None` when
    /// nothing answers within two seconds.
    fn fetch(&self, address: &str) -> Option<String> {
        let address: std::net::SocketAddr = address.parse().expect("IP:PORT");
        let ns = std::fs::File::open(self.netns_file()).expect("the test's namespace");
        std::thread::spawn(move || -> Option<String> {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let timeout = Duration::from_secs(2);
            let mut stream = std::net::TcpStream::connect_timeout(&address, timeout).ok()?;
            stream.set_read_timeout(Some(timeout)).ok()?;
            stream
                .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
                .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let (head, body) = response.split_once("\r\n\r\n")?;
            let status = head.lines().next()?;
            status.contains(" 200 ").then(|| body.to_string())
        })
        .join()
        .expect("the fetching thread")
    }

    /// [`Self::fetch`] until it answers, for at most ten seconds.
    fn fetch_soon(&self, address: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(page) = self.fetch(address) {
                return Some(page);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where kestrel puts the network namespace of container `id`.
    fn container_netns(&self, id: &str) -> PathBuf {
        let dir = self.root().join(id);
        Path::new(netns::DEFAULT_DIR).join(netns::name_for(&dir.display().to_string()))
    }

    /// The interfaces of the test's namespace.
    fn links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.netns, "-o", "link", "show"])
            .output()
            .expect("ip link");
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or("").to_string())
            .collect()
    }

    /// The addresses host-local has handed out on network `ipam` (its
    /// lease files are named by address).
    fn leases(&self, ipam: &str, network: &str) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join(ipam).join(network))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// The test namespace's iptables rules.
    fn iptables(&self) -> String {
        let out = self
            .in_netns(Path::new("/usr/sbin/iptables-save"), &[])
            .output()
            .expect("iptables-save");
        text(&out.stdout)
    }

    fn root_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nothing of container `id` is left: no directory, no namespace, no
    /// veth, no lease, no rule naming its address.
    fn assert_nothing_left(&self, id: &str, ipam: &str, network: &str, ip: Option<&str>) {
        assert!(self.root_entries().is_empty(), "{:?}", self.root_entries());
        let ns = self.container_netns(id);
        assert!(!ns.exists(), "{} is left", ns.display());
        let veths: Vec<String> = self
            .links()
            .into_iter()
            .filter(|l| l.starts_with("veth"))
            .collect();
        assert!(veths.is_empty(), "veths left: {veths:?}");
        let leases = self.leases(ipam, network);
        assert!(leases.is_empty(), "leases left: {leases:?}");
        if let Some(ip) = ip {
            let rules = self.iptables();
            let needle = format!("{ip}/");
            let left: Vec<&str> = rules.lines().filter(|l| l.contains(&needle)).collect();
            assert!(left.is_empty(), "rules naming {ip} left: {left:?}");
        }
    }
}

impl Drop for NetTest {
    fn drop(&mut self) {
        for id in self.root_entries() {
            let out = self.kestrel(&["rm", "-f", &id]);
            if !out.status.success() {
                eprintln!("cleanup: rm -f {id}: {}", text(&out.stderr));
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn ok(command: &mut Command) {
    let out = command.output().expect("running a setup command");
    assert!(out.status.success(), "{command:?}: {}", text(&out.stderr));
}

fn ps_ips(test: &NetTest, id: &str) -> Vec<String> {
    let out = test.kestrel(&["ps", "--json"]);
    assert!(out.status.success(), "ps: {}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let row = rows
        .into_iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in ps: {}", text(&out.stdout)));
    row["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bridge_network_serves_at_the_container_ip_and_published_port_and_rm_leaves_nothing() {
    let test = "bridge_network_serves_at_the_container_ip_and_published_port_and_rm_leaves_nothing";
    if !available(test) {
        return;
    }
    bridge_network_serves(NetTest::new(), "net-cni-web");
}

/// The same in a QEMU VM: the container's network reaches it through a tap
/// mirrored to the CNI's veth.
#[test]
fn bridge_network_serves_at_the_container_ip_and_published_port_in_a_qemu_vm() {
    let test = "bridge_network_serves_at_the_container_ip_and_published_port_in_a_qemu_vm";
    if !available(test) {
        return;
    }
    let Some(image) = qemu_ready(test) else {
        return;
    };
    bridge_network_serves(
        NetTest::with_backend("qemu", Some(&image)),
        "net-cni-web-vm",
    );
}

/// `kestrel run --network bridge -p 18080:80` of busybox httpd: its page at
/// its IP, at the gateway's and localhost's published port; its hosts and
/// resolv.conf; only `lo` and `eth0`; after `rm -f`, nothing left.
fn bridge_network_serves(t: NetTest, id: &str) {
    let out = t.run(
        &["-d", "--network", "bridge", "-p", "18080:80"],
        id,
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    assert!(t.container_netns(id).exists());

    let ips = ps_ips(&t, id);
    assert_eq!(ips.len(), 1, "{ips:?}");
    let ip = ips[0].clone();
    let subnet = format!("10.91.{}.", t.n);
    assert!(ip.starts_with(&subnet), "{ip} is not in {subnet}0/24");
    assert_eq!(t.leases("ipam", "bridge"), std::slice::from_ref(&ip));

    let page = t.fetch_soon(&format!("{ip}:80"));
    assert_eq!(
        page.as_deref(),
        Some(PAGE),
        "the page at the container's IP"
    );
    // portmap's DNAT, from the host side at the bridge's gateway address.
    let gateway = format!("{subnet}1");
    let page = t.fetch_soon(&format!("{gateway}:18080"));
    assert_eq!(
        page.as_deref(),
        Some(PAGE),
        "the published port at {gateway}"
    );
    let page = t.fetch_soon("127.0.0.1:18080");
    assert_eq!(
        page.as_deref(),
        Some(PAGE),
        "the published port on localhost"
    );

    // Its name and resolver, bind-mounted from its directory.
    let out = t.kestrel(&["exec", id, "--", "cat", "/etc/hosts", "/etc/resolv.conf"]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    let files = text(&out.stdout);
    assert!(files.contains(&format!("{ip}\t{id}\n")), "{files}");
    assert!(files.contains("127.0.0.1\tlocalhost\n"), "{files}");
    assert!(files.contains("nameserver "), "{files}");
    assert!(!files.contains("nameserver 127."), "{files}");
    // Its own interfaces: lo and eth0 only.
    let out = t.kestrel(&["exec", id, "--", "cat", "/proc/net/dev"]);
    assert_eq!(interfaces(&text(&out.stdout)), ["eth0", "lo"]);

    let out = t.kestrel(&["rm", "-f", id]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    t.assert_nothing_left(id, "ipam", "bridge", Some(&ip));
    assert_eq!(t.fetch(&format!("{gateway}:18080")), None);
}

/// The interface names in a `/proc/net/dev`, sorted.
fn interfaces(proc_net_dev: &str) -> Vec<String> {
    let mut names: Vec<String> = proc_net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn network_none_and_the_default_give_only_lo() {
    let test = "network_none_and_the_default_give_only_lo";
    if !available(test) {
        return;
    }
    let t = NetTest::new();
    for (flags, id) in [
        (&["--rm", "--network", "none"][..], "net-cni-none"),
        (&["--rm"][..], "net-cni-default"),
    ] {
        let out = t.run(flags, id, &["cat", "/proc/net/dev"]);
        assert!(out.status.success(), "{flags:?}: {}", text(&out.stderr));
        assert_eq!(interfaces(&text(&out.stdout)), ["lo"], "{flags:?}");
        assert!(!t.container_netns(id).exists());
    }
    assert!(t.root_entries().is_empty(), "{:?}", t.root_entries());
}

#[test]
fn bad_publish_values_are_refused_before_anything_is_made() {
    let test = "bad_publish_values_are_refused_before_anything_is_made";
    if !available(test) {
        return;
    }
    let t = NetTest::new();
    let id = "net-cni-badp";
    for (flags, says) in [
        (
            &["--network", "bridge", "-p", "abc"][..],
            "host port and a container port",
        ),
        (
            &["--network", "bridge", "-p", "0:80"][..],
            "host port 0 is not between 1 and 65535",
        ),
        (
            &["--network", "bridge", "-p", "70000:80"][..],
            "host port 70000 is not between 1 and 65535",
        ),
        (
            &["--network", "bridge", "-p", "80:80/sctp"][..],
            "\"sctp\" is not tcp or udp",
        ),
        (&["-p", "8080:80"][..], "-p/--publish needs a network"),
        (
            &["--network", "none", "-p", "8080:80"][..],
            "-p/--publish needs a network",
        ),
        (
            &["--network", "nosuchnet"][..],
            "no CNI network named \"nosuchnet\"",
        ),
    ] {
        let out = t.run(flags, id, &["true"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(
            t.root_entries().is_empty(),
            "{flags:?}: {:?}",
            t.root_entries()
        );
        assert!(!t.container_netns(id).exists(), "{flags:?}");
    }
}

#[test]
fn a_failing_plugin_is_named_and_everything_made_before_it_is_taken_down() {
    let test = "a_failing_plugin_is_named_and_everything_made_before_it_is_taken_down";
    if !available(test) {
        return;
    }
    let t = NetTest::new();
    let id = "net-cni-broken";
    let out = t.run(&["--rm", "--network", "broken"], id, &["true"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("attaching to network \"broken\"")
            && stderr
                .contains("CNI plugin \"kestrel-test-no-such-plugin\" not found in /usr/lib/cni"),
        "{stderr}"
    );
    // The bridge plugin ran (its bridge is there) and its DEL took back
    // the veth and the address.
    assert!(
        t.links().contains(&format!("kbrk{}", t.n)),
        "{:?}",
        t.links()
    );
    t.assert_nothing_left(id, "ipam-broken", "broken", None);
}
