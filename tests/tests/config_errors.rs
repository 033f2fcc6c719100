//! A broken configuration is reported where the user looks, once: by the
//! CLI, by the shim's `start` (whose stderr containerd passes on rather
//! than the server's, which only reaches containerd's log), and so by `ctr`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use kestrel_tests::containerd::{available, run_argv, text, Containerd};
use kestrel_tests::shim::bundle_with;
use kestrel_tests::{binary, busybox_rootfs, require};

/// A TOML syntax error: the table header is never closed.
const BROKEN: &str = "[sandbox\nhypervisor = \"process\"\n";
/// What the toml crate's report of any syntax error starts with.
const TOML_ERROR: &str = "TOML parse error";

/// `containerd-shim-kestrel-v2 … start` in `bundle`, as containerd runs it.
fn shim_start(config: &Path, bundle: &Path) -> Output {
    Command::new(binary("containerd-shim-kestrel-v2"))
        .args(["-namespace", "default", "-id", "c1", "-address"])
        .arg(bundle.join("containerd.sock"))
        .args(["-publish-binary", "/bin/true", "start"])
        .env("KESTREL_CONFIG", config)
        .env_remove("KESTREL_HYPERVISOR")
        .current_dir(bundle)
        .stdin(Stdio::null())
        .output()
        .expect("running the shim")
}

#[test]
fn a_missing_config_file_is_named_once_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("absent.toml");
    let out = Command::new(binary("kestrel"))
        .args(["run", "--hypervisor", "process", "--rootfs"])
        .arg(dir.path())
        .args(["c1", "--", "true"])
        .env("KESTREL_CONFIG", &config)
        .env("KESTREL_CLI_ROOT", dir.path().join("cli"))
        .stdin(Stdio::null())
        .output()
        .expect("running kestrel");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("absent.toml").count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn shim_start_with_a_broken_config_fails_with_the_toml_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broken.toml");
    std::fs::write(&config, BROKEN).unwrap();
    let rootfs = busybox_rootfs(dir.path());
    let bundle = bundle_with(
        dir.path(),
        "bundle",
        &rootfs,
        &["true"],
        serde_json::json!({}),
    );
    let out = shim_start(&config, &bundle);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "start succeeded: {stderr}");
    assert!(
        stderr.contains("broken.toml") && stderr.contains(TOML_ERROR),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "", "start printed an address");
    assert!(!bundle.join("address").exists(), "start wrote an address");
}

#[test]
fn ctr_run_with_a_broken_config_shows_the_toml_error() {
    let test = "ctr_run_with_a_broken_config_shows_the_toml_error";
    if !(require(test) && available(test)) {
        return;
    }
    // The section after `[sandbox]` never closes its header.
    let c = Containerd::start_configured("hypervisor = \"process\"", "[vm\n");
    let rootfs = busybox_rootfs(c.path());
    let out = c.ctr(&run_argv(
        false,
        rootfs.to_str().unwrap(),
        "broken",
        &["true"],
    ));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "ctr run succeeded: {stderr}");
    assert!(
        stderr.contains("kestrel.toml") && stderr.contains(TOML_ERROR),
        "ctr does not show the TOML error: {stderr}\n{}",
        c.log_text()
    );
    let _ = c.ctr(&["container", "delete", "broken"]);
    c.assert_nothing_left();
}
