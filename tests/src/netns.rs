//! Traffic inside a network namespace a test made itself (`ip netns add`):
//! an HTTP fetch and a one-page HTTP server, each on a thread of its own
//! that entered the namespace, every loop bounded. Nothing here ever
//! reaches beyond the namespace it is given.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The file of the named namespace `name` (`ip netns`).
pub fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `work` on a new thread inside the namespace at `netns`.
pub fn spawn_in<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let file = std::fs::File::open(netns)
        .unwrap_or_else(|e| panic!("network namespace {}: {e}", netns.display()));
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the test's network namespace");
        work()
    })
}

/// `GET /` from `ip:port`, inside `netns`; retried (the server may still be
/// starting) until `within` passes. The response body, or the last error.
pub fn http_get(netns: &Path, ip: IpAddr, port: u16, within: Duration) -> Result<String, String> {
    spawn_in(netns, move || {
        let deadline = Instant::now() + within;
        loop {
            match get_once(SocketAddr::new(ip, port)) {
                Ok(body) => return Ok(body),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("GET {ip}:{port}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    })
    .join()
    .expect("http_get thread")
}

fn get_once(address: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: kestrel-test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header in {response:?}")))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(std::io::Error::other(format!("answered {head:?}")));
    }
    Ok(body.to_string())
}

/// A server that answers every `GET` with `body`, bound inside a network
/// namespace; it stops after `max_requests` or when dropped's deadline
/// (`lifetime`) passes, whichever comes first.
#[derive(Debug)]
pub struct PageServer {
    pub address: SocketAddr,
    thread: Option<JoinHandle<usize>>,
}

impl PageServer {
    pub fn start(
        netns: &Path,
        address: SocketAddr,
        body: &str,
        max_requests: usize,
        lifetime: Duration,
    ) -> PageServer {
        let (tx, rx) = mpsc::channel();
        let body = body.to_string();
        let thread = spawn_in(netns, move || {
            let listener = TcpListener::bind(address).expect("binding the page server");
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            tx.send(listener.local_addr().expect("local address")).ok();
            let deadline = Instant::now() + lifetime;
            let mut served = 0;
            while served < max_requests && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).ok();
                        stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                        let mut request = [0u8; 1024];
                        let _ = stream.read(&mut request);
                        let answer = format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(answer.as_bytes());
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
            served
        });
        let address = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the page server did not start");
        PageServer {
            address,
            thread: Some(thread),
        }
    }

    /// Waits for the server to stop; how many requests it answered.
    pub fn served(mut self) -> usize {
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// The interface names in `netns` (`ip -o link`), loopback included.
pub fn links(netns_name: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns_name, "-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect()
}
