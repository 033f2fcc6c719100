//! `kestrel agent check` against a real agent in host mode, over unix://
//! and over hvsock:// through a stand-in for a VMM's hybrid vsock socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output};

use kestrel_tests::*;

fn kestrel(args: &[&str]) -> Output {
    Command::new(binary("kestrel"))
        .args(args)
        .output()
        .expect("running kestrel")
}

/// Accepts one connection at `path` and behaves like a VMM's hybrid vsock
/// socket whose guest listens only on port 1024, served by `agent`.
fn hybrid_vsock(path: &Path, agent: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    let agent = agent.to_path_buf();
    std::thread::spawn(move || {
        let (host, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(host.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line != "CONNECT 1024\n" {
            return;
        }
        let guest = UnixStream::connect(&agent).unwrap();
        (&host).write_all(b"OK 1073741824\n").unwrap();
        let (mut g_in, mut h_out) = (guest.try_clone().unwrap(), host.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut g_in);
            let _ = g_in.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut &guest, &mut h_out);
        let _ = host.shutdown(std::net::Shutdown::Both);
        let _ = up.join();
    })
}

#[test]
fn check_waits_for_an_agent_that_starts_listening_within_its_timeout() {
    if !require("check_waits_for_an_agent_that_starts_listening_within_its_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("late.sock");
    let check = Command::new(binary("kestrel"))
        .args(["agent", "check", "--timeout", "20", "--address"])
        .arg(format!("unix://{}", socket.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running kestrel agent check");
    // The guest is still booting: nothing listens for a while.
    std::thread::sleep(std::time::Duration::from_millis(700));
    let mut agent = Command::new(binary("kestrel-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--shared-dir")
        .arg(dir.path().join("shared"))
        .spawn()
        .expect("starting kestrel-agent");
    let out = check.wait_with_output().unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("SERVING")
    );
}

#[test]
fn check_over_unix_prints_serving_and_version() {
    if !require("check_over_unix_prints_serving_and_version") {
        return;
    }
    let agent = Agent::start();
    let out = kestrel(&[
        "agent",
        "check",
        "--address",
        &format!("unix://{}", agent.socket.display()),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout.lines().next(), Some("SERVING"));
    assert!(
        stdout.contains(&format!("agent version {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}

#[test]
fn check_over_hybrid_vsock_does_the_connect_handshake() {
    if !require("check_over_hybrid_vsock_does_the_connect_handshake") {
        return;
    }
    let agent = Agent::start();
    let hv = agent.dir.path().join("hv.sock");
    let vmm = hybrid_vsock(&hv, &agent.socket);
    let out = kestrel(&[
        "agent",
        "check",
        "--json",
        "--address",
        &format!("hvsock://{}:1024", hv.display()),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"serving\":true"), "{stdout}");
    vmm.join().unwrap();
}

#[test]
fn check_fails_clearly_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let out = kestrel(&[
        "agent",
        "check",
        "--timeout",
        "1",
        "--address",
        &format!("unix://{}", missing.display()),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("none.sock"), "{stderr}");

    // A VMM whose guest never listens on port 2000: every try is refused
    // the same way until the timeout.
    let hv = dir.path().join("hv.sock");
    let listener = UnixListener::bind(&hv).unwrap();
    std::thread::spawn(move || {
        for host in listener.incoming().flatten() {
            let mut line = String::new();
            let _ = BufReader::new(&host).read_line(&mut line);
        }
    });
    let out = kestrel(&[
        "agent",
        "check",
        "--timeout",
        "1",
        "--address",
        &format!("hvsock://{}:2000", hv.display()),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing listens on that port"), "{stderr}");

    let out = kestrel(&["agent", "check", "--address", "tcp://127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not unix:///PATH"));
}
