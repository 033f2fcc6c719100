//! No id steers a host path: ids that are paths, given to the shim's
//! `start` and `delete` actions, through the sandbox-id annotation, to the
//! CLI and to the agent, are refused, and a directory of that name outside
//! the state directory survives every step.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kestrel_tests::shim::bundle_with;
use kestrel_tests::{binary, busybox_rootfs};

/// A scratch directory holding the shim's state directory (`state/`), the
/// CLI's root (`cli/`) and a victim directory beside them that `../victim`
/// and its absolute path both name.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "[sandbox]\nhypervisor = \"process\"\nagent_path = \"{}\"\nstate_dir = \"{}\"\n",
            binary("kestrel-agent").display(),
            dir.path().join("state").display(),
        );
        std::fs::write(dir.path().join("kestrel.toml"), config).expect("config");
        for d in ["state", "cli", "victim"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("dir");
        }
        std::fs::write(dir.path().join("victim/precious"), b"keep me").expect("victim file");
        Scene { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A bundle running `true` in a busybox rootfs, with `annotations`
    /// (rewritten on each call; the rootfs is made once).
    fn bundle(&self, annotations: serde_json::Value) -> PathBuf {
        let mut rootfs = self.path().join("rootfs");
        if !rootfs.exists() {
            rootfs = busybox_rootfs(self.path());
        }
        bundle_with(self.path(), "bundle", &rootfs, &["true"], annotations)
    }

    /// The ids that name the victim or something beside it.
    fn bad_ids(&self) -> Vec<String> {
        vec![
            self.path().join("victim").display().to_string(),
            "../victim".into(),
            "a/b".into(),
            String::new(),
            ".".into(),
            "x".repeat(300),
        ]
    }

    fn assert_victim_intact(&self, step: &str) {
        let precious = self.path().join("victim/precious");
        assert_eq!(
            std::fs::read(&precious).ok().as_deref(),
            Some(&b"keep me"[..]),
            "{step} removed or changed {}",
            precious.display()
        );
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(binary(program));
        command
            .env("KESTREL_CONFIG", self.path().join("kestrel.toml"))
            .env("KESTREL_CLI_ROOT", self.path().join("cli"))
            .stdin(Stdio::null());
        command
    }

    /// `containerd-shim-kestrel-v2 -namespace NS -id ID -address A ACTION`
    /// run in `bundle`.
    fn shim(&self, namespace: &str, id: &str, bundle: &Path, action: &str) -> Output {
        self.command("containerd-shim-kestrel-v2")
            .args(["-namespace", namespace, "-id", id, "-address"])
            .arg(self.path().join("containerd.sock"))
            .args(["-publish-binary", "/bin/true", action])
            .current_dir(bundle)
            .output()
            .expect("running the shim")
    }
}

fn refused(output: &Output, step: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{step} succeeded: {stderr}");
    assert!(
        stderr.contains(needle),
        "{step}: stderr does not name {needle:?}: {stderr}"
    );
}

#[test]
fn shim_start_and_delete_refuse_ids_that_are_paths() {
    let scene = Scene::new();
    let bundle = scene.bundle(serde_json::json!({}));
    for id in scene.bad_ids() {
        for action in ["delete", "start"] {
            let out = scene.shim("default", &id, &bundle, action);
            refused(
                &out,
                &format!("shim {action} -id {id:?}"),
                "container id (-id)",
            );
            scene.assert_victim_intact(&format!("shim {action} -id {id:?}"));
        }
    }
    for namespace in ["../victim", "", "a/b"] {
        let out = scene.shim(namespace, "c1", &bundle, "delete");
        refused(
            &out,
            &format!("shim delete -namespace {namespace:?}"),
            "namespace",
        );
    }
}

#[test]
fn shim_start_and_delete_refuse_a_sandbox_id_annotation_that_is_a_path() {
    let scene = Scene::new();
    for sandbox in scene.bad_ids().into_iter().filter(|id| !id.is_empty()) {
        let bundle = scene.bundle(serde_json::json!({ "io.kubernetes.cri.sandbox-id": sandbox }));
        for action in ["delete", "start"] {
            let out = scene.shim("default", "c1", &bundle, action);
            refused(
                &out,
                &format!("shim {action} with annotation {sandbox:?}"),
                "io.kubernetes.cri.sandbox-id",
            );
            scene.assert_victim_intact(&format!("shim {action} with annotation {sandbox:?}"));
        }
    }
}

#[test]
fn shim_delete_leaves_a_state_directory_it_did_not_make() {
    let scene = Scene::new();
    let bundle = scene.bundle(serde_json::json!({}));
    // A valid id whose directory under the state dir was not made by us.
    let foreign = scene.path().join("state/c1");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious"), b"x").unwrap();
    let out = scene.shim("default", "c1", &bundle, "delete");
    refused(
        &out,
        "shim delete of a foreign state dir",
        "not a sandbox directory Kestrel created",
    );
    assert!(foreign.join("precious").exists());
}

#[test]
fn cli_refuses_ids_that_are_paths() {
    let scene = Scene::new();
    let rootfs = busybox_rootfs(scene.path());
    for id in scene.bad_ids() {
        for args in [
            vec![
                "run",
                "--hypervisor",
                "process",
                "--rootfs",
                rootfs.to_str().unwrap(),
                &id,
                "--",
                "true",
            ],
            vec!["rm", "-f", &id],
            vec!["kill", &id],
            vec!["exec", &id, "--", "true"],
        ] {
            let out = scene
                .command("kestrel")
                .args(&args)
                .output()
                .expect("kestrel");
            refused(&out, &format!("kestrel {args:?}"), "invalid container id");
            scene.assert_victim_intact(&format!("kestrel {args:?}"));
        }
    }
}
