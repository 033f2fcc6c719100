//! A broken configuration is reported where the user looks, once.

use std::process::{Command, Stdio};

use kestrel_tests::binary;
use kestrel_tests::containerd::text;

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
