//! The shim binary's long-running server, started the way containerd's
//! `start` starts it: what it leaves behind on the host when it ends.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_tests::{binary, skip};

const NAMESPACE: &str = "kestrel-test";

/// A shim server; killed, and its socket removed, if the test leaves early.
struct Server {
    child: Child,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Server {
    /// Spawns the server for container `id` with containerd's flags and
    /// waits until it says it is up (it closes its stdout).
    fn spawn(dir: &Path, id: &str) -> Server {
        let address = dir.join("containerd.sock").display().to_string();
        // Where containerd-shim's `start` puts it: /run/containerd/s/<hash>.
        let socket = containerd_shim::socket_address(&address, NAMESPACE, id);
        let config = dir.join("kestrel.toml");
        std::fs::write(
            &config,
            format!(
                "[sandbox]\nhypervisor = \"process\"\nstate_dir = \"{}\"\n",
                dir.join("sandboxes").display()
            ),
        )
        .expect("kestrel config");
        let stderr = dir.join("shim.stderr");
        let mut child = Command::new(binary("containerd-shim-kestrel-v2"))
            .args(["-namespace", NAMESPACE, "-id", id, "-address", &address])
            .args(["-socket", &socket])
            .current_dir(dir)
            .env("KESTREL_CONFIG", &config)
            .env_remove("TTRPC_ADDRESS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("starting the shim server");
        let mut up = Vec::new();
        let _ = child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_end(&mut up);
        Server {
            child,
            socket: PathBuf::from(socket.trim_start_matches("unix://")),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `limit` for the server to exit.
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn an_idle_shim_server_removes_its_socket_on_sigterm() {
    let test = "an_idle_shim_server_removes_its_socket_on_sigterm";
    if !nix::unistd::geteuid().is_root() {
        skip(
            test,
            "needs root (the shim's socket lives in /run/containerd/s)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::spawn(dir.path(), "idle");
    assert!(
        std::os::unix::net::UnixStream::connect(&server.socket).is_ok(),
        "the shim serves on {}: {}",
        server.socket.display(),
        server.stderr()
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = server.wait(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the shim exits cleanly on SIGTERM: {status:?}\n{}",
        server.stderr()
    );
    assert!(
        !server.socket.exists(),
        "{} is left behind\n{}",
        server.socket.display(),
        server.stderr()
    );
}
