//! Our terminal while a container's terminal is attached: in raw mode, so
//! keys reach the container's line discipline unprocessed, and watched for
//! size changes, which go on to the container's pty (SIGWINCH -> the shim's
//! ResizePty -> the agent's TtyWinResize).

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Restores the terminal's settings when dropped.
pub struct RawMode(Termios);

impl RawMode {
    /// Puts our stdin's terminal in raw mode; `None` when stdin is no terminal.
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

/// Which of our streams is the terminal whose size the container follows.
#[derive(Clone, Copy)]
enum Stream {
    Stdin,
    Stdout,
}

/// Our terminal's size and its changes.
pub struct WindowSize {
    stream: Stream,
    changes: Signal,
}

impl WindowSize {
    /// Starts watching for size changes of our stdin's terminal, or else of
    /// our stdout's; `None` when neither is a terminal. Call it before
    /// reading the size that the container starts with: a change after
    /// that is then seen by [`WindowSize::changed`].
    pub fn watch() -> Option<WindowSize> {
        let stream = if std::io::stdin().is_terminal() {
            Stream::Stdin
        } else if std::io::stdout().is_terminal() {
            Stream::Stdout
        } else {
            return None;
        };
        let changes = signal(SignalKind::window_change()).ok()?;
        Some(WindowSize { stream, changes })
    }

    /// Rows and columns now; `None` if the terminal does not say.
    pub fn current(&self) -> Option<(u16, u16)> {
        match self.stream {
            Stream::Stdin => size_of(std::io::stdin().as_fd()),
            Stream::Stdout => size_of(std::io::stdout().as_fd()),
        }
    }

    /// Waits for the next size change and returns the new size.
    pub async fn changed(&mut self) -> Option<(u16, u16)> {
        loop {
            self.changes.recv().await?;
            if let Some(size) = self.current() {
                return Some(size);
            }
        }
    }
}

/// A terminal's rows and columns; `None` for an unknown (zero) size.
fn size_of(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}
