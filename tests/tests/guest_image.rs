//! The guest image end to end: `kestrel image build` makes our kernel and an
//! initramfs with the static agent as /init; the image is reproducible and
//! cached; QEMU (TCG) boots it and the agent answers Health.Check over a
//! hybrid vsock socket served by our own vhost-user backend
//! (`kestrel-vmm vhost-user-vsock`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kestrel_guest_image::{initramfs, is_static_elf, sha256_file, Manifest};
use kestrel_host::agent_client::{dial, AgentClient, DialPolicy};
use kestrel_host::dial::Address;
use kestrel_tests::{binary, on_path, skip, static_agent};

/// Returns false, printing why, when the image cannot be built here.
fn can_build(test: &str) -> bool {
    let missing = kestrel_guest_image::preflight::Host::current().missing();
    let why = if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        Some(format!("the kernel build needs {}", names.join(", ")))
    } else if static_agent().is_none() {
        Some("needs the static agent (see README: cargo build --release --target x86_64-unknown-linux-gnu -p kestrel-agent)".into())
    } else {
        None
    };
    match why {
        Some(why) => {
            skip(test, &why);
            false
        }
        None => true,
    }
}

struct Build {
    stdout: String,
    outputs: serde_json::Value,
}

/// `kestrel image build --out DIR [--json]`, with the workspace's static agent.
fn image_build(out: &Path, json: bool) -> Build {
    let mut cmd = Command::new(binary("kestrel"));
    cmd.args(["image", "build", "--out"])
        .arg(out)
        .arg("--agent")
        .arg(static_agent().unwrap());
    if json {
        cmd.arg("--json");
    }
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .expect("running kestrel image build");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kestrel image build failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let outputs = if json {
        serde_json::from_str(&stdout).expect("one JSON object")
    } else {
        serde_json::Value::Null
    };
    Build { stdout, outputs }
}

/// One image for every test here (the kernel build takes minutes; later
/// builds reuse the cache in the user's cache directory).
fn image() -> &'static (tempfile::TempDir, serde_json::Value) {
    static IMAGE: OnceLock<(tempfile::TempDir, serde_json::Value)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let build = image_build(&dir.path().join("image"), true);
        (dir, build.outputs)
    })
}

fn output(key: &str) -> PathBuf {
    PathBuf::from(
        image().1[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}", image().1)),
    )
}

#[test]
fn image_build_outputs_a_kernel_and_an_initramfs_with_the_agent_as_init() {
    if !can_build("image_build_outputs_a_kernel_and_an_initramfs_with_the_agent_as_init") {
        return;
    }
    let keys: Vec<&str> = image()
        .1
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["bzimage", "initrd", "manifest", "vmlinux"]);
    let vmlinux = std::fs::read(output("vmlinux")).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF", "vmlinux is an ELF");
    let bzimage = std::fs::read(output("bzimage")).unwrap();
    assert_eq!(
        &bzimage[0x202..0x206],
        b"HdrS",
        "bzImage has the boot protocol header"
    );

    let entries = initramfs::read(&std::fs::read(output("initrd")).unwrap()).unwrap();
    let agent = std::fs::read(static_agent().unwrap()).unwrap();
    match &entries["init"] {
        initramfs::Node::File { mode, data } => {
            assert_eq!(mode & 0o111, 0o111, "/init is executable");
            assert!(is_static_elf(data), "/init is static");
            assert_eq!(data, &agent, "/init is the agent");
        }
        other => panic!("/init is {other:?}"),
    }
    assert_eq!(
        entries["sbin/init"],
        initramfs::Node::Symlink {
            target: "../init".into()
        }
    );
    assert!(entries.contains_key("etc/hostname"));

    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(output("manifest")).unwrap()).unwrap();
    for (key, info) in [
        ("vmlinux", &manifest.vmlinux),
        ("bzimage", &manifest.bzimage),
        ("initrd", &manifest.initrd),
    ] {
        let path = output(key);
        assert_eq!(sha256_file(&path).unwrap(), info.sha256, "{key} hash");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            info.size,
            "{key} size"
        );
    }
    assert!(
        manifest.kernel_version.starts_with("6.1."),
        "{}",
        manifest.kernel_version
    );
    assert_eq!(manifest.agent_version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_rebuild_reuses_the_cache_and_builds_are_byte_identical() {
    if !can_build("a_rebuild_reuses_the_cache_and_builds_are_byte_identical") {
        return;
    }
    let first = image();
    let out = first.0.path().join("image");
    let again = image_build(&out, false);
    assert!(
        again.stdout.contains("reused the cache"),
        "{}",
        again.stdout
    );

    // A second output directory: the kernel comes from the kernel cache,
    // the initramfs is written anew, and both are the same bytes.
    let other = tempfile::tempdir().unwrap();
    let second = image_build(other.path(), true);
    for key in ["vmlinux", "bzimage", "initrd", "manifest"] {
        let a = std::fs::read(output(key)).unwrap();
        let b = std::fs::read(second.outputs[key].as_str().unwrap()).unwrap();
        assert!(a == b, "{key} differs between two builds");
    }
}

/// A child process killed on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_tcg_boots_the_image_to_a_serving_agent() {
    if !can_build("qemu_tcg_boots_the_image_to_a_serving_agent") {
        return;
    }
    if !on_path("qemu-system-x86_64") {
        skip(
            "qemu_tcg_boots_the_image_to_a_serving_agent",
            "needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
        );
        return;
    }
    let (bzimage, initrd) = (output("bzimage"), output("initrd"));
    let dir = tempfile::tempdir().unwrap();
    let (vhost_socket, hybrid, console) = (
        dir.path().join("vhost.sock"),
        dir.path().join("vm.vsock"),
        dir.path().join("console.log"),
    );
    let _backend = Reaped(
        Command::new(binary("kestrel-vmm"))
            .args(["vhost-user-vsock", "--socket"])
            .arg(&vhost_socket)
            .arg("--uds")
            .arg(&hybrid)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kestrel-vmm vhost-user-vsock"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost_socket.exists() {
        assert!(
            Instant::now() < deadline,
            "kestrel-vmm vhost-user-vsock did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let qemu = Reaped(
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off,memory-backend=mem0",
                "-accel",
                "tcg",
                "-m",
                "256M",
            ])
            .args(["-object", "memory-backend-memfd,id=mem0,size=256M,share=on"])
            .arg("-kernel")
            .arg(&bzimage)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1"])
            .arg("-chardev")
            .arg(format!("socket,id=vsock0,path={}", vhost_socket.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock0"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting qemu"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let health = rt.block_on(async {
        let policy = DialPolicy {
            deadline: Duration::from_secs(60),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(2),
        };
        let address = Address::Hvsock {
            path: hybrid.clone(),
            port: kestrel_protocols::AGENT_VSOCK_PORT,
        };
        let client = dial(&address, policy).await.unwrap_or_else(|e| {
            panic!(
                "the guest's agent never answered: {e}\nconsole:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            )
        });
        AgentClient::from_client(client, Duration::from_secs(10))
            .health()
            .await
    });
    let elapsed = started.elapsed();
    let health = health.expect("Health.Check");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(health.serving, "{health:?}\n{log}");
    // Our kernel, with the fixed build stamps.
    assert!(log.contains("Linux version 6.1."), "{log}");
    assert!(log.contains("(kestrel@kestrel)"), "{log}");
    eprintln!("QEMU TCG: boot to SERVING in {elapsed:.2?}");
    drop(qemu);
}

#[test]
fn an_option_the_kernel_does_not_know_fails_the_build_naming_it() {
    if !can_build("an_option_the_kernel_does_not_know_fails_the_build_naming_it") {
        return;
    }
    let cache = kestrel_guest_image::default_cache();
    let tarball = Path::new(kestrel_guest_image::kernel::SOURCE_TARBALL);
    let source =
        kestrel_guest_image::kernel::source(tarball, &cache, &mut |_| {}).expect("kernel source");
    let build_dir = tempfile::tempdir().unwrap();
    let mut fragments = kestrel_guest_image::fragments::FRAGMENTS.to_vec();
    fragments.push(("99-typo.config", "CONFIG_VIRTIO_VSOCKETZ=y\n"));
    let err =
        kestrel_guest_image::kernel::build(&source, build_dir.path(), &fragments, 1, &mut |_| {})
            .expect_err("a build with an unknown option");
    let text = err.to_string();
    assert!(
        text.contains("CONFIG_VIRTIO_VSOCKETZ=y (99-typo.config): unknown to this kernel"),
        "{text}"
    );
    assert!(
        !build_dir.path().join("vmlinux").exists(),
        "nothing was compiled"
    );
}
