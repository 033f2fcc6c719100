//! Kata's storages through the real agent in host mode: what a runtime
//! sees (codes, mounts appearing and going) when CreateSandbox and
//! CreateContainer carry storages. The virtio-fs path itself needs a
//! guest with a virtio-fs device; here it must be refused cleanly.

use std::path::Path;

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

fn storage(driver: &str, source: &str, mount_point: &Path, opts: &[&str]) -> Storage {
    Storage {
        driver: driver.into(),
        source: source.into(),
        fstype: if driver == "ephemeral" { "tmpfs" } else { "" }.into(),
        mount_point: mount_point.display().to_string(),
        options: opts.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    }
}

fn sandbox_request(storages: Vec<Storage>) -> CreateSandboxRequest {
    CreateSandboxRequest {
        hostname: "fsag".into(),
        sandbox_id: "fsag-sandbox".into(),
        storages,
        ..Default::default()
    }
}

async fn create_sandbox(
    client: &AgentServiceClient,
    storages: Vec<Storage>,
) -> kestrel_protocols::ttrpc::Result<()> {
    client
        .create_sandbox(prompt(), &sandbox_request(storages))
        .await
        .map(drop)
}

/// A spec whose container binds `volume` at /data.
fn spec_with_volume(rootfs: &Path, volume: &Path, args: &[&str]) -> oci::Spec {
    let mut s = spec(rootfs, args);
    let mut m = oci::Mount::new();
    m.destination = "/data".into();
    m.type_ = "bind".into();
    m.source = volume.display().to_string();
    m.options = vec!["rbind".into(), "rw".into()];
    s.Mounts.push(m);
    s
}

#[tokio::test]
async fn virtio_fs_storage_in_host_mode_is_a_failed_precondition() {
    require!("virtio_fs_storage_in_host_mode_is_a_failed_precondition");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let mut shared = storage(
        "virtio-fs",
        "kataShared",
        &agent.shared_dir.join("containers"),
        &[],
    );
    shared.fstype = "virtiofs".into();
    let err = create_sandbox(&client, vec![shared]).await.unwrap_err();
    assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err:?}");
    assert_eq!(mounts_under(agent.dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn bad_storages_are_invalid_arguments_and_leave_nothing_mounted() {
    require!("bad_storages_are_invalid_arguments_and_leave_nothing_mounted");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let shared = &agent.shared_dir;
    let outside = agent.dir.path().join("outside");
    std::fs::create_dir_all(shared).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, shared.join("escape")).unwrap();
    let good = storage("ephemeral", "", &shared.join("shm"), &[]);
    let bad: Vec<(&str, Storage)> = vec![
        (
            "mount_point",
            storage("ephemeral", "", Path::new("/etc"), &[]),
        ),
        ("mount_point", storage("ephemeral", "", Path::new("/"), &[])),
        (
            "mount_point",
            storage("ephemeral", "", &shared.join("../outside/x"), &[]),
        ),
        (
            "mount_point",
            storage("ephemeral", "", &shared.join("escape/x"), &[]),
        ),
        (
            "mount_point",
            storage("ephemeral", "", Path::new("relative/x"), &[]),
        ),
        (
            "options",
            storage("ephemeral", "", &shared.join("e"), &["size=1\0m"]),
        ),
        (
            "options",
            storage("ephemeral", "", &shared.join("e"), &["bind"]),
        ),
        ("source", storage("bind", "/etc", &shared.join("b"), &[])),
        (
            "source",
            storage(
                "bind",
                &outside.display().to_string(),
                &shared.join("b"),
                &[],
            ),
        ),
        (
            "mount_point",
            storage(
                "ephemeral",
                "",
                Path::new("/run/kata-containers/sandbox/shm"),
                &[],
            ),
        ),
    ];
    for (field, s) in bad {
        // The good storage comes first: it must not stay mounted.
        let err = create_sandbox(&client, vec![good.clone(), s.clone()])
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{s:?}: {err:?}");
        let shown = format!("{err:?}");
        assert!(
            shown.contains(&format!("storages[1].{field}")),
            "{s:?}: {shown}"
        );
        assert_eq!(
            mounts_under(agent.dir.path()),
            Vec::<String>::new(),
            "{s:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // None of the refusals counted as the sandbox's creation.
    create_sandbox(&client, vec![good])
        .await
        .expect("CreateSandbox");
    assert_eq!(mounts_under(&shared.join("shm")).len(), 1);
}

#[tokio::test]
async fn block_storages_are_unimplemented_naming_the_driver() {
    require!("block_storages_are_unimplemented_naming_the_driver");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let s = storage("blk", "0000:00:02.0", &agent.shared_dir.join("vol"), &[]);
    let err = create_sandbox(&client, vec![s]).await.unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED, "{err:?}");
    assert!(format!("{err:?}").contains("\\\"blk\\\""), "{err:?}");
}

#[tokio::test]
async fn a_storage_shared_by_sandbox_and_container_goes_with_its_last_user() {
    require!("a_storage_shared_by_sandbox_and_container_goes_with_its_last_user");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let volume = agent.shared_dir.join("sandbox/ephemeral/cache");
    let s = storage("ephemeral", "tmpfs", &volume, &["nosuid", "size=4m"]);
    create_sandbox(&client, vec![s.clone()])
        .await
        .expect("CreateSandbox");
    assert_eq!(mounts_under(&volume).len(), 1);

    let id = "fsag-vol";
    let mut req = create_request(
        id,
        spec_with_volume(
            &rootfs,
            &volume,
            &["sh", "-c", "echo hi > /data/f; cat /data/f"],
        ),
    );
    req.storages = vec![s];
    client
        .create_container(prompt(), &req)
        .await
        .expect("CreateContainer");
    start(&client, id).await;
    let out = read_all(&client, id, "", false).await;
    assert_eq!(String::from_utf8_lossy(&out), "hi\n");
    assert_eq!(wait(&client, id, "").await.unwrap(), 0);
    assert_eq!(std::fs::read_to_string(volume.join("f")).unwrap(), "hi\n");
    remove(&client, id).await.expect("RemoveContainer");
    assert_eq!(mounts_under(&volume).len(), 1, "the sandbox still uses it");

    client
        .destroy_sandbox(prompt(), &DestroySandboxRequest::new())
        .await
        .expect("DestroySandbox");
    assert_eq!(mounts_under(agent.dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_create_container_unmounts_its_storages() {
    require!("a_failed_create_container_unmounts_its_storages");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let volume = agent.shared_dir.join("fsag-bad/volume");
    let missing = agent.dir.path().join("no-rootfs");
    let mut req = create_request("fsag-bad", spec(&missing, &["true"]));
    req.storages = vec![storage("ephemeral", "", &volume, &[])];
    let err = client.create_container(prompt(), &req).await.unwrap_err();
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err:?}");
    assert_eq!(mounts_under(agent.dir.path()), Vec::<String>::new());
    // The id is free again.
    let err = client.create_container(prompt(), &req).await.unwrap_err();
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err:?}");
}
