//! A process's standard streams as the agent holds them.
//!
//! Output is pumped from the pipe (or pty) into a buffer as soon as it is
//! written, so a late or slow ReadStdout loses nothing; when a buffer holds
//! [`BUFFER_LIMIT`] bytes the pump stops reading and the writer blocks on
//! the full pipe instead of the agent growing or dropping data.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use nix::pty::Winsize;
use nix::unistd::pipe2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::error::{Error, Result};

/// Bytes buffered per stream before the agent stops reading it.
pub const BUFFER_LIMIT: usize = 1 << 20;
/// The terminal's end-of-file character, sent when a tty's stdin closes.
const VEOF: u8 = 0x04;

#[derive(Default)]
struct Buffered {
    data: VecDeque<u8>,
    eof: bool,
}

/// Output of one stream, filled by a pump task, drained by Read RPCs.
#[derive(Default)]
pub struct OutputBuffer {
    state: Mutex<Buffered>,
    readable: Notify,
    writable: Notify,
}

impl OutputBuffer {
    fn state(&self) -> std::sync::MutexGuard<'_, Buffered> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for output and returns up to `max` bytes of it; at the end of
    /// the stream returns [`Error::EndOfStream`].
    pub async fn read(&self, max: usize) -> Result<Vec<u8>> {
        let max = max.max(1);
        loop {
            let notified = self.readable.notified();
            {
                let mut s = self.state();
                if !s.data.is_empty() {
                    let n = max.min(s.data.len());
                    let out: Vec<u8> = s.data.drain(..n).collect();
                    self.writable.notify_one();
                    return Ok(out);
                }
                if s.eof {
                    return Err(Error::EndOfStream("EOF".into()));
                }
            }
            notified.await;
        }
    }

    fn push(&self, bytes: &[u8]) {
        self.state().data.extend(bytes);
        self.readable.notify_waiters();
    }

    fn close(&self) {
        self.state().eof = true;
        self.readable.notify_waiters();
    }

    async fn wait_for_room(&self) {
        loop {
            let notified = self.writable.notified();
            if self.state().data.len() < BUFFER_LIMIT {
                return;
            }
            notified.await;
        }
    }

    /// Copies `source` into the buffer until it ends.
    fn pump(self: &Arc<Self>, mut source: pipe::Receiver) {
        let buffer = Arc::clone(self);
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                buffer.wait_for_room().await;
                match source.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => buffer.push(&chunk[..n]),
                    // A pty master reads EIO once the last slave fd closes.
                    Err(_) => break,
                }
            }
            buffer.close();
        });
    }
}

/// The child's ends of its standard streams.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl ChildStdio {
    /// /dev/null on all three: for a terminal process until it has opened
    /// its pty in the container.
    pub fn null() -> Result<ChildStdio> {
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| Error::internal("opening /dev/null", e))
        };
        Ok(ChildStdio {
            stdin: open()?,
            stdout: open()?,
            stderr: open()?,
        })
    }
}

/// The agent's ends of a process's standard streams.
pub struct ProcessIo {
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    stdout: Arc<OutputBuffer>,
    stderr: Option<Arc<OutputBuffer>>,
    pty: Option<OwnedFd>,
}

impl ProcessIo {
    /// The agent's side of a terminal process: the master of the pty the
    /// process got in its container (see `container/console.rs`). Stdout
    /// carries both output streams, as on any terminal.
    pub fn terminal(master: OwnedFd) -> Result<ProcessIo> {
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Error::internal("dup pty", e));
        let reader = pipe::Receiver::from_owned_fd_unchecked(dup(&master)?)
            .map_err(|e| Error::internal("pty reader", e))?;
        let writer = pipe::Sender::from_owned_fd_unchecked(dup(&master)?)
            .map_err(|e| Error::internal("pty writer", e))?;
        let stdout = Arc::new(OutputBuffer::default());
        stdout.pump(reader);
        Ok(ProcessIo {
            stdin: tokio::sync::Mutex::new(Some(writer)),
            stdout,
            stderr: None,
            pty: Some(master),
        })
    }

    /// Pipes for stdin, stdout and stderr.
    pub fn pipes() -> Result<(ProcessIo, ChildStdio)> {
        let sys = |what: &str, e: nix::Error| Error::internal(what, e);
        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| sys("pipe", e));
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdin =
            pipe::Sender::from_owned_fd(in_w).map_err(|e| Error::internal("stdin pipe", e))?;
        let stdout = Arc::new(OutputBuffer::default());
        stdout.pump(
            pipe::Receiver::from_owned_fd(out_r).map_err(|e| Error::internal("stdout pipe", e))?,
        );
        let stderr = Arc::new(OutputBuffer::default());
        stderr.pump(
            pipe::Receiver::from_owned_fd(err_r).map_err(|e| Error::internal("stderr pipe", e))?,
        );
        let io = ProcessIo {
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            stdout,
            stderr: Some(stderr),
            pty: None,
        };
        Ok((
            io,
            ChildStdio {
                stdin: in_r,
                stdout: out_w,
                stderr: err_w,
            },
        ))
    }

    pub async fn read_stdout(&self, max: usize) -> Result<Vec<u8>> {
        self.stdout.read(max).await
    }

    pub async fn read_stderr(&self, max: usize) -> Result<Vec<u8>> {
        match &self.stderr {
            Some(b) => b.read(max).await,
            None => Err(Error::EndOfStream(
                "a terminal process has no separate stderr".into(),
            )),
        }
    }

    /// Writes all of `data` to stdin; empty data closes stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            self.close_stdin().await?;
            return Ok(0);
        }
        let mut stdin = self.stdin.lock().await;
        let w = stdin
            .as_mut()
            .ok_or_else(|| Error::FailedPrecondition("stdin is closed".into()))?;
        w.write_all(data).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => {
                Error::FailedPrecondition("stdin is closed: nothing reads it any more".into())
            }
            _ => Error::internal("writing stdin", e),
        })?;
        Ok(data.len())
    }

    /// Closes stdin. A terminal cannot be half-closed: it gets ^D instead.
    pub async fn close_stdin(&self) -> Result<()> {
        let mut stdin = self.stdin.lock().await;
        if self.pty.is_some() {
            if let Some(w) = stdin.as_mut() {
                w.write_all(&[VEOF])
                    .await
                    .map_err(|e| Error::internal("writing EOF to the terminal", e))?;
            }
            return Ok(());
        }
        stdin.take();
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let pty = self
            .pty
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("the process has no terminal".into()))?;
        set_window_size(pty.as_fd(), rows, cols)
            .map_err(|e| Error::internal("resizing the terminal", e))
    }
}

/// Sets a pty's window size; on a change the kernel sends SIGWINCH to the
/// terminal's foreground process group.
pub fn set_window_size(pty: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one Winsize from the pointer we pass.
    let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffered_output_survives_a_late_reader_and_then_reports_eof() {
        let (io, child) = ProcessIo::pipes().unwrap();
        nix::unistd::write(&child.stdout, b"hello ").unwrap();
        nix::unistd::write(&child.stdout, b"world").unwrap();
        drop(child);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut got = Vec::new();
        loop {
            match io.read_stdout(4).await {
                Ok(bytes) => got.extend(bytes),
                Err(Error::EndOfStream(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"hello world");
    }

    #[tokio::test]
    async fn empty_write_closes_stdin() {
        let (io, child) = ProcessIo::pipes().unwrap();
        assert_eq!(io.write_stdin(b"abc").await.unwrap(), 3);
        io.write_stdin(b"").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            nix::unistd::read(child.stdin.as_raw_fd(), &mut buf).unwrap(),
            3
        );
        assert_eq!(
            nix::unistd::read(child.stdin.as_raw_fd(), &mut buf).unwrap(),
            0
        );
        assert!(matches!(
            io.write_stdin(b"x").await,
            Err(Error::FailedPrecondition(_))
        ));
    }
}
