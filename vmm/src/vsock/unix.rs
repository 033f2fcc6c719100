//! The host side of hybrid vsock: Unix sockets.
//!
//! The listener at `uds_path` takes host-initiated connections; each must
//! first send one line, `CONNECT <port>\n` (any case). The line is read one
//! byte at a time so no byte meant for the guest is consumed with it.
//! Guest-initiated connections to port `P` are connected to `<uds_path>_P`.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

use super::Error;

/// The longest handshake line we accept (`CONNECT 4294967295\n` is 19 bytes).
const MAX_LINE: usize = 32;

/// Binds the hybrid socket. A path that already exists is refused rather
/// than replaced: it may belong to a running VM.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::SocketExists(path.to_path_buf()));
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

/// The hybrid socket's file, removed when this is dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn new(path: &Path) -> SocketFile {
        SocketFile(path.to_path_buf())
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where a guest connection to host port `port` goes.
pub fn guest_target(uds_path: &Path, port: u32) -> PathBuf {
    let mut name = uds_path.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Connects to `path` without ever blocking: a listener whose backlog is
/// full answers EAGAIN, which we treat like a refusal.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// A host connection that has not finished its `CONNECT` line yet.
#[derive(Debug)]
pub struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
}

/// What reading more of a handshake gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// The line is incomplete; wait for more bytes.
    Pending,
    /// The host asked for this guest port.
    Connect(u32),
    /// The peer closed, sent a bad line, or failed: drop the connection.
    Failed(String),
}

impl Handshake {
    pub fn new(stream: UnixStream) -> io::Result<Handshake> {
        stream.set_nonblocking(true)?;
        Ok(Handshake {
            stream,
            line: Vec::with_capacity(MAX_LINE),
        })
    }

    /// Reads what is available of the line, never past its newline.
    pub fn advance(&mut self) -> HandshakeStep {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Failed("closed before CONNECT".into()),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() >= MAX_LINE => {
                    return HandshakeStep::Failed("CONNECT line too long".into())
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return HandshakeStep::Failed(e.to_string()),
            }
        }
    }
}

/// Parses `CONNECT <port>` (any case; a trailing `\r` tolerated).
pub fn parse_connect(line: &[u8]) -> HandshakeStep {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(verb), Some(port), None) if verb.eq_ignore_ascii_case("connect") => {
            match port.parse::<u32>() {
                Ok(port) => HandshakeStep::Connect(port),
                Err(_) => HandshakeStep::Failed(format!("bad port in {text:?}")),
            }
        }
        _ => HandshakeStep::Failed(format!("expected `CONNECT <port>`, got {text:?}")),
    }
}

/// Wraps an accepted fd; kept here so the muxer never builds sockets itself.
pub fn accept(listener: &UnixListener) -> io::Result<Option<UnixStream>> {
    match listener.accept() {
        Ok((stream, _)) => Ok(Some(stream)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_line_is_parsed_in_any_case() {
        assert_eq!(parse_connect(b"CONNECT 1024"), HandshakeStep::Connect(1024));
        assert_eq!(parse_connect(b"connect 52\r"), HandshakeStep::Connect(52));
        assert!(matches!(
            parse_connect(b"CONNECT"),
            HandshakeStep::Failed(_)
        ));
        assert!(matches!(
            parse_connect(b"CONNECT x"),
            HandshakeStep::Failed(_)
        ));
        assert!(matches!(
            parse_connect(b"CONNECT 1 2"),
            HandshakeStep::Failed(_)
        ));
        assert!(matches!(
            parse_connect(b"HELLO 1"),
            HandshakeStep::Failed(_)
        ));
    }

    #[test]
    fn handshake_stops_at_the_newline() {
        let (mut host, ours) = UnixStream::pair().unwrap();
        let mut hs = Handshake::new(ours).unwrap();
        host.write_all(b"CONN").unwrap();
        assert_eq!(hs.advance(), HandshakeStep::Pending);
        host.write_all(b"ECT 7\npayload").unwrap();
        assert_eq!(hs.advance(), HandshakeStep::Connect(7));
        let mut rest = [0u8; 7];
        hs.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn overlong_or_closed_handshakes_fail() {
        let (mut host, ours) = UnixStream::pair().unwrap();
        let mut hs = Handshake::new(ours).unwrap();
        host.write_all(&[b'A'; 64]).unwrap();
        assert!(matches!(hs.advance(), HandshakeStep::Failed(_)));
        let (host, ours) = UnixStream::pair().unwrap();
        drop(host);
        let mut hs = Handshake::new(ours).unwrap();
        assert!(matches!(hs.advance(), HandshakeStep::Failed(_)));
    }

    #[test]
    fn binding_over_an_existing_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let _first = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(Error::SocketExists(_))));
        assert_eq!(
            guest_target(&path, 52),
            dir.path().join("v.sock_52"),
            "guest connections go to PATH_PORT"
        );
    }
}
