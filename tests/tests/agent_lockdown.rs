//! Containers locked down like runc's, enforced by the agent in host mode:
//! capabilities, seccomp profiles (containerd's default among them) and a
//! read-only rootfs.

use kestrel_protocols::agent::*;
use kestrel_protocols::agent_ttrpc::AgentServiceClient;
use kestrel_protocols::oci;
use kestrel_protocols::ttrpc::Code;
use kestrel_tests::*;

macro_rules! require {
    ($name:literal) => {
        if !require($name) {
            return;
        }
    };
}

/// What containerd 1.6 generates for `ctr run --seccomp` with its default
/// capabilities, captured from a real containerd.
const CONTAINERD_DEFAULT: &str =
    include_str!("../../host/src/cli/testdata/containerd-seccomp-default-caps.json");

async fn setup() -> (Agent, AgentServiceClient, std::path::PathBuf) {
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    (agent, client, rootfs)
}

fn capabilities(names: &[String]) -> oci::LinuxCapabilities {
    oci::LinuxCapabilities {
        Bounding: names.to_vec(),
        Effective: names.to_vec(),
        Permitted: names.to_vec(),
        ..Default::default()
    }
}

/// containerd's default capabilities and seccomp profile, through the
/// host's config.json conversion as the shim does it.
fn containerd_default() -> (oci::LinuxCapabilities, oci::LinuxSeccomp) {
    let capture: serde_json::Value = serde_json::from_str(CONTAINERD_DEFAULT).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {"cwd": "/", "args": ["true"], "user": {"uid": 0, "gid": 0},
                    "capabilities": {"bounding": capture["bounding"],
                                     "effective": capture["bounding"],
                                     "permitted": capture["bounding"]}},
        "root": {"path": "rootfs"},
        "linux": {"seccomp": capture["seccomp"]},
    });
    let spec = kestrel_host::oci::spec_from_json(config.to_string().as_bytes()).unwrap();
    (
        spec.Process.Capabilities.clone().unwrap(),
        spec.Linux.Seccomp.clone().unwrap(),
    )
}

fn default_capabilities() -> oci::LinuxCapabilities {
    containerd_default().0
}

fn with_caps(mut spec: oci::Spec, caps: oci::LinuxCapabilities) -> oci::Spec {
    spec.Process.mut_or_insert_default().Capabilities = Some(caps).into();
    spec
}

fn with_seccomp(mut spec: oci::Spec, seccomp: oci::LinuxSeccomp) -> oci::Spec {
    spec.Linux.mut_or_insert_default().Seccomp = Some(seccomp).into();
    spec
}

const CHOWN: &[&str] = &[
    "sh",
    "-c",
    "echo > /tmp/owned && busybox chown 1:1 /tmp/owned",
];

#[tokio::test]
async fn cap_drop_all_makes_chown_fail_with_eperm() {
    require!("cap_drop_all_makes_chown_fail_with_eperm");
    let (_agent, client, rootfs) = setup().await;
    let spec = with_caps(spec(&rootfs, CHOWN), capabilities(&[]));
    let (_, err, status) = run(&client, "nocaps", spec).await;
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[tokio::test]
async fn default_capabilities_let_chown_work() {
    require!("default_capabilities_let_chown_work");
    let (_agent, client, rootfs) = setup().await;
    let spec = with_caps(spec(&rootfs, CHOWN), default_capabilities());
    let (_, err, status) = run(&client, "defcaps", spec).await;
    assert_eq!(status, 0, "{err}");
}

#[tokio::test]
async fn an_exec_gets_the_capabilities_of_its_own_process_spec() {
    require!("an_exec_gets_the_capabilities_of_its_own_process_spec");
    let (_agent, client, rootfs) = setup().await;
    let id = "execcaps";
    let spec = with_caps(spec(&rootfs, &["sleep", "1000"]), default_capabilities());
    client
        .create_container(prompt(), &create_request(id, spec))
        .await
        .expect("CreateContainer");
    start(&client, id).await;
    for (exec_id, caps, want) in [
        ("dropped", capabilities(&[]), 1),
        ("kept", default_capabilities(), 0),
    ] {
        let mut req = ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        let p = req.process.mut_or_insert_default();
        p.Args = CHOWN.iter().map(|a| a.to_string()).collect();
        p.Env = vec!["PATH=/bin".into()];
        p.Cwd = "/".into();
        p.Capabilities = Some(caps).into();
        client
            .exec_process(prompt(), &req)
            .await
            .expect("ExecProcess");
        let err = read_all(&client, id, exec_id, true).await;
        let status = wait(&client, id, exec_id).await.unwrap();
        assert_eq!(status, want, "{exec_id}: {}", String::from_utf8_lossy(&err));
    }
    remove(&client, id).await.unwrap();
}

/// A non-root user keeps exactly what the spec grants across the change of
/// user: CAP_CHOWN when it is ambient, nothing when it is only permitted.
#[tokio::test]
async fn a_non_root_user_gets_ambient_capabilities_and_no_others() {
    require!("a_non_root_user_gets_ambient_capabilities_and_no_others");
    let (_agent, client, rootfs) = setup().await;
    let chown: &[String] = &["CAP_CHOWN".into()];
    let script = "echo > /dev/shm/mine && busybox chown 0:0 /dev/shm/mine";
    for (id, ambient, want) in [("ambient", chown, 0), ("notambient", &[][..], 1)] {
        let mut caps = capabilities(chown);
        caps.Inheritable = chown.to_vec();
        caps.Ambient = ambient.to_vec();
        let mut spec = with_caps(spec(&rootfs, &["sh", "-c", script]), caps);
        let user = spec
            .Process
            .mut_or_insert_default()
            .User
            .mut_or_insert_default();
        user.UID = 1000;
        user.GID = 1000;
        let (_, err, status) = run(&client, id, spec).await;
        assert_eq!(status, want, "{id}: {err}");
    }
}

#[tokio::test]
async fn a_profile_answering_mkdir_with_eperm_leaves_everything_else_working() {
    require!("a_profile_answering_mkdir_with_eperm_leaves_everything_else_working");
    let (_agent, client, rootfs) = setup().await;
    let seccomp = oci::LinuxSeccomp {
        DefaultAction: "SCMP_ACT_ALLOW".into(),
        Architectures: vec!["SCMP_ARCH_X86_64".into()],
        Syscalls: vec![oci::LinuxSyscall {
            Names: vec!["mkdir".into(), "mkdirat".into()],
            Action: "SCMP_ACT_ERRNO".into(),
            ErrnoRet: Some(oci::linux_syscall::ErrnoRet::Errnoret(libc::EPERM as u32)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let script = "busybox mkdir /tmp/d; echo mkdir=$?; echo > /tmp/f && cat /tmp/f && ls /bin/sh";
    let spec = with_seccomp(spec(&rootfs, &["sh", "-c", script]), seccomp);
    let (out, err, status) = run(&client, "nomkdir", spec).await;
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(out, "mkdir=1\n\n/bin/sh\n");
    assert_eq!(status, 0);
    assert!(!rootfs.join("tmp/d").exists());
}

#[tokio::test]
async fn containerds_default_profile_runs_sh_and_refuses_unshare_user() {
    require!("containerds_default_profile_runs_sh_and_refuses_unshare_user");
    let (_agent, client, rootfs) = setup().await;
    let (caps, seccomp) = containerd_default();
    let script = "echo hello; busybox unshare -U true; echo unshare=$?";
    let mut spec = with_seccomp(
        with_caps(spec(&rootfs, &["sh", "-c", script]), caps),
        seccomp,
    );
    // As `ctr run` sets it: the filter is then loaded last, just before exec.
    spec.Process.mut_or_insert_default().NoNewPrivileges = true;
    let (out, err, status) = run(&client, "ctrdefault", spec).await;
    assert_eq!(out, "hello\nunshare=1\n", "{err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(status, 0);
}

#[tokio::test]
async fn read_only_rootfs_refuses_writes_with_erofs() {
    require!("read_only_rootfs_refuses_writes_with_erofs");
    let (_agent, client, rootfs) = setup().await;
    let mut spec = spec(
        &rootfs,
        &["sh", "-c", "echo x > /written; echo > /dev/shm/ok"],
    );
    spec.Root.mut_or_insert_default().Readonly = true;
    let (_, err, status) = run(&client, "readonly", spec).await;
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(status, 0, "the tmpfs on /dev/shm stays writable: {err}");
    assert!(!rootfs.join("written").exists());
}

#[tokio::test]
async fn bad_profiles_and_capabilities_are_invalid_arguments_naming_the_field() {
    require!("bad_profiles_and_capabilities_are_invalid_arguments_naming_the_field");
    let (_agent, client, rootfs) = setup().await;
    let bad_action = with_seccomp(
        spec(&rootfs, &["true"]),
        oci::LinuxSeccomp {
            DefaultAction: "SCMP_ACT_ALLOW".into(),
            Syscalls: vec![oci::LinuxSyscall {
                Names: vec!["mkdir".into()],
                Action: "SCMP_ACT_SOMETIMES".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let bad_cap = with_caps(
        spec(&rootfs, &["true"]),
        capabilities(&["CAP_TELEPORT".into()]),
    );
    for (id, spec, field) in [
        ("badaction", bad_action, "linux.seccomp.syscalls[0].action"),
        ("badcap", bad_cap, "process.capabilities.bounding"),
    ] {
        let err = client
            .create_container(prompt(), &create_request(id, spec))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{id}: {err:?}");
        assert!(format!("{err:?}").contains(field), "{id}: {err:?}");
        let err = wait(&client, id, "").await.unwrap_err();
        assert_eq!(code(&err), Code::NOT_FOUND, "{id} left behind");
    }
}

#[tokio::test]
async fn guest_details_report_seccomp_support() {
    require!("guest_details_report_seccomp_support");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let details = client
        .get_guest_details(prompt(), &GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(details.agent_details.supports_seccomp);
}
