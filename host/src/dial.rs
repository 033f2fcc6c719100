//! Agent addresses and connecting to them.
//!
//! - `unix:///path` — the agent in host mode, or any Unix socket;
//! - `vsock://CID:PORT` — AF_VSOCK, where the host kernel has vhost-vsock;
//! - `hvsock://PATH:PORT` — a hybrid vsock Unix socket as Firecracker,
//!   Cloud Hypervisor and kestrel-vmm expose it: connect to PATH, send
//!   `CONNECT PORT\n`, and the VMM answers `OK <host port>\n` once the
//!   guest accepted.

use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::time::Duration;

use kestrel_protocols::ttrpc::r#async::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
    Hvsock { path: PathBuf, port: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("address {0:?} is not unix:///PATH, vsock://CID:PORT or hvsock://PATH:PORT")]
    BadAddress(String),
    #[error("connecting to {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {address}: {message}")]
    Transport { address: String, message: String },
    #[error("hybrid vsock handshake with {path} for port {port}: {message}")]
    Handshake {
        path: String,
        port: u32,
        message: String,
    },
    #[error("connecting to {address}: no answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// Longest `OK ...` line a VMM may send.
const MAX_HANDSHAKE_LINE: usize = 64;

impl std::str::FromStr for Address {
    type Err = DialError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DialError::BadAddress(s.to_string());
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Address::Unix(path.into()));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(Address::Vsock {
                cid: cid.parse().map_err(|_| bad())?,
                port: port.parse().map_err(|_| bad())?,
            });
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Address::Hvsock {
                path: path.into(),
                port: port.parse().map_err(|_| bad())?,
            });
        }
        Err(bad())
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Address::Hvsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
        }
    }
}

/// Connects a ttrpc client to `address`, giving up after `timeout`.
pub async fn connect(address: &Address, timeout: Duration) -> Result<Client, DialError> {
    tokio::time::timeout(timeout, connect_inner(address))
        .await
        .map_err(|_| DialError::Timeout {
            address: address.to_string(),
            timeout,
        })?
}

async fn connect_inner(address: &Address) -> Result<Client, DialError> {
    match address {
        Address::Unix(path) => {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| DialError::Connect {
                    address: address.to_string(),
                    source,
                })?;
            Ok(client_from(stream))
        }
        Address::Vsock { .. } => {
            Client::connect(&address.to_string())
                .await
                .map_err(|e| DialError::Transport {
                    address: address.to_string(),
                    message: e.to_string(),
                })
        }
        Address::Hvsock { path, port } => {
            let mut stream =
                UnixStream::connect(path)
                    .await
                    .map_err(|source| DialError::Connect {
                        address: address.to_string(),
                        source,
                    })?;
            handshake(&mut stream, path, *port).await?;
            Ok(client_from(stream))
        }
    }
}

fn client_from(stream: UnixStream) -> Client {
    let fd = stream
        .into_std()
        .expect("a tokio UnixStream converts to std")
        .into_raw_fd();
    // SAFETY: `fd` is a connected Unix socket we own and hand over whole.
    unsafe { Client::from_raw_unix_socket_fd(fd) }
}

/// The hybrid vsock handshake. Reads the answer a byte at a time so that
/// nothing after the newline (the agent's first bytes) is consumed.
async fn handshake(
    stream: &mut UnixStream,
    path: &std::path::Path,
    port: u32,
) -> Result<(), DialError> {
    let fail = |message: String| DialError::Handshake {
        path: path.display().to_string(),
        port,
        message,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| fail(format!("sending CONNECT: {e}")))?;
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        if n == 0 {
            return Err(fail(
                "the VMM closed the connection: nothing listens on that port in the guest".into(),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(fail("the answer is too long to be OK <port>".into()));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let mut words = text.split_whitespace();
    match (
        words.next(),
        words.next().map(str::parse::<u32>),
        words.next(),
    ) {
        (Some("OK"), Some(Ok(_)), None) => Ok(()),
        _ => Err(fail(format!("expected \"OK <port>\", got {text:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:///run/a.sock".parse::<Address>().unwrap(),
            Address::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "vsock://3:1024".parse::<Address>().unwrap(),
            Address::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            "hvsock:///run/vm/v.sock:1024".parse::<Address>().unwrap(),
            Address::Hvsock {
                path: "/run/vm/v.sock".into(),
                port: 1024
            }
        );
    }

    #[test]
    fn malformed_addresses_are_rejected() {
        for bad in [
            "",
            "tcp://1.2.3.4:1",
            "unix://",
            "vsock://3",
            "vsock://x:1",
            "hvsock://:1024",
            "hvsock:///p:port",
        ] {
            assert!(
                matches!(bad.parse::<Address>(), Err(DialError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn handshake_accepts_ok_and_leaves_the_stream_after_it() {
        let (mut ours, mut vmm) = UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            vmm.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            vmm.write_all(b"OK 1073741824\nfirst").await.unwrap();
        });
        handshake(&mut ours, std::path::Path::new("v.sock"), 1024)
            .await
            .unwrap();
        let mut rest = [0u8; 5];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"first");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn handshake_reports_a_closed_port_and_garbage() {
        let (mut ours, mut vmm) = UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            vmm.read_exact(&mut buf).await.unwrap();
        });
        let err = handshake(&mut ours, std::path::Path::new("v.sock"), 1024)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nothing listens"), "{err}");
        peer.await.unwrap();

        let (mut ours, mut vmm) = UnixStream::pair().unwrap();
        vmm.write_all(b"NOPE\n").await.unwrap();
        let err = handshake(&mut ours, std::path::Path::new("v.sock"), 1024)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("NOPE"), "{err}");
    }
}
