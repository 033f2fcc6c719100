//! The client ends of a process's stdio FIFOs: made in the container's
//! directory, the outputs copied to ours and our stdin copied in.
//!
//! The output FIFOs are opened read-only and non-blocking before the shim
//! opens them; such a FIFO reports hang-up only once a writer came and
//! went, so reading ends when the shim closes its end after the process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::stat::Mode;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use super::shim::StdioPaths;

/// How long output may still arrive after the process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The FIFOs of one process, named `<prefix>-stdin` etc.
pub struct Fifos {
    pub paths: StdioPaths,
    made: Vec<PathBuf>,
}

impl Fifos {
    /// Makes the FIFOs in `dir`: stdin only with `stdin`, stderr only
    /// without a terminal (a terminal merges it into stdout).
    pub fn make(dir: &Path, prefix: &str, stdin: bool, terminal: bool) -> std::io::Result<Fifos> {
        let mut fifos = Fifos {
            paths: StdioPaths {
                terminal,
                ..Default::default()
            },
            made: Vec::new(),
        };
        let wanted = [("stdin", stdin), ("stdout", true), ("stderr", !terminal)];
        for (name, wanted) in wanted {
            if !wanted {
                continue;
            }
            let path = dir.join(format!("{prefix}-{name}"));
            nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600))
                .map_err(|e| std::io::Error::other(format!("mkfifo {}: {e}", path.display())))?;
            let uri = path.display().to_string();
            match name {
                "stdin" => fifos.paths.stdin = uri,
                "stdout" => fifos.paths.stdout = uri,
                _ => fifos.paths.stderr = uri,
            }
            fifos.made.push(path);
        }
        Ok(fifos)
    }

    /// Starts copying stdout and stderr to ours.
    pub fn copy_outputs(&self) -> std::io::Result<Outputs> {
        let mut tasks = Vec::new();
        for (path, to_stderr) in [(&self.paths.stdout, false), (&self.paths.stderr, true)] {
            if path.is_empty() {
                continue;
            }
            let fifo = pipe::OpenOptions::new().open_receiver(path)?;
            tasks.push(tokio::spawn(copy_out(fifo, to_stderr)));
        }
        Ok(Outputs { tasks })
    }

    /// Copies our stdin into the stdin FIFO on a thread of its own, closing
    /// the FIFO at our EOF so the process sees its end. Opening blocks until
    /// the shim opened its end.
    pub fn copy_stdin(&self) {
        if self.paths.stdin.is_empty() {
            return;
        }
        let path = PathBuf::from(&self.paths.stdin);
        std::thread::spawn(move || {
            let Ok(mut fifo) = std::fs::OpenOptions::new().write(true).open(&path) else {
                return;
            };
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut fifo);
        });
    }

    /// Removes the FIFOs.
    pub fn remove(&self) {
        for path in &self.made {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The copies of a process's outputs.
pub struct Outputs {
    tasks: Vec<JoinHandle<()>>,
}

impl Outputs {
    /// Waits for the copies to reach the end of their FIFOs, for a bounded time.
    pub async fn drain(self) {
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

async fn copy_out(mut fifo: pipe::Receiver, to_stderr: bool) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match fifo.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Our stdout may be a pipe or a terminal: write it whole, unbuffered.
        let written = if to_stderr {
            std::io::stderr().write_all(&buf[..n])
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf[..n]).and_then(|()| out.flush())
        };
        if written.is_err() {
            return;
        }
    }
}
