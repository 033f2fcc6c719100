//! Copying a process's standard streams between containerd's FIFOs and the
//! agent's WriteStdin / ReadStdout / ReadStderr calls.
//!
//! The output FIFOs are opened read-write, so opening never blocks waiting
//! for a reader. The stdin FIFO is opened read-only and non-blocking: the
//! reader waits for readiness, and a FIFO no writer has opened yet is not
//! readable (the kernel reports hang-up only after a writer came and went),
//! so stdin ends when the client closes its end, as `ctr` does, or on
//! CloseIO, as the CRI does. Either way whatever is in the FIFO is forwarded
//! first, then the agent closes the process's stdin.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::agent_client::AgentClient;
use crate::lifecycle::registry::Stdio;

/// The size of one ReadStdout/ReadStderr request.
const CHUNK: u32 = 32 * 1024;

/// The copy tasks of one process.
#[derive(Debug, Default)]
pub struct ProcessIo {
    close_stdin: Option<Arc<Notify>>,
    outputs: Vec<JoinHandle<()>>,
}

impl ProcessIo {
    /// Opens the FIFOs `stdio` names and starts copying. Empty paths are
    /// skipped; with a terminal, stderr is part of stdout.
    pub fn start(
        agent: &AgentClient,
        container_id: &str,
        exec_id: &str,
        stdio: &Stdio,
    ) -> std::io::Result<ProcessIo> {
        let mut io = ProcessIo::default();
        let streams = [
            (Stream::Stdout, &stdio.stdout),
            (Stream::Stderr, &stdio.stderr),
        ];
        for (stream, path) in streams {
            if path.is_empty() || (stream == Stream::Stderr && stdio.terminal) {
                continue;
            }
            let sink = open_output(path)?;
            let task = copy_out(
                agent.clone(),
                container_id.into(),
                exec_id.into(),
                stream,
                sink,
            );
            io.outputs.push(tokio::spawn(task));
        }
        if !stdio.stdin.is_empty() {
            let fifo = pipe::OpenOptions::new().open_receiver(&stdio.stdin)?;
            let close = Arc::new(Notify::new());
            let task = copy_in(
                agent.clone(),
                container_id.into(),
                exec_id.into(),
                fifo,
                Arc::clone(&close),
            );
            tokio::spawn(task);
            io.close_stdin = Some(close);
        }
        Ok(io)
    }

    /// Forwards what stdin holds, then closes the process's stdin.
    pub fn close_stdin(&self) {
        if let Some(close) = &self.close_stdin {
            close.notify_one();
        }
    }

    /// Waits until the outputs reached their end, at most `bound`: a
    /// process that left a child holding its stdout must not hold up its
    /// exit forever.
    pub async fn drain(&mut self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        for task in &mut self.outputs {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!(
                    ?bound,
                    "output still open after the process exited; not waiting longer"
                );
                break;
            }
        }
        // Whatever did not finish is aborted when `self` drops.
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.close_stdin();
        for task in &self.outputs {
            task.abort();
        }
    }
}

/// Where an output goes: a FIFO path (containerd's default), or a
/// `file://` URI as nerdctl passes for detached containers. Logging
/// binaries (`binary://`) are refused.
fn open_output(uri: &str) -> std::io::Result<Box<dyn AsyncWrite + Send + Unpin>> {
    if let Some(path) = uri.strip_prefix("file://") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        return Ok(Box::new(tokio::fs::File::from_std(file)));
    }
    if uri.contains("://") {
        return Err(std::io::Error::new(
            ErrorKind::Unsupported,
            format!("output {uri:?}: only FIFO paths and file:// URIs are supported"),
        ));
    }
    // Read-write, so opening never waits for a reader.
    let fifo = pipe::OpenOptions::new().read_write(true).open_sender(uri)?;
    Ok(Box::new(fifo))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

async fn copy_out(
    agent: AgentClient,
    container_id: String,
    exec_id: String,
    stream: Stream,
    mut sink: Box<dyn AsyncWrite + Send + Unpin>,
) {
    loop {
        let chunk = match stream {
            Stream::Stdout => agent.read_stdout(&container_id, &exec_id, CHUNK).await,
            Stream::Stderr => agent.read_stderr(&container_id, &exec_id, CHUNK).await,
        };
        let data = match chunk {
            Ok(Some(data)) => data,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(container_id, exec_id, ?stream, error = %e, "output copy ended");
                return;
            }
        };
        // A FIFO nobody reads blocks here once full, and the process then
        // blocks on its own output, as under runc.
        let written = sink.write_all(&data).await;
        if let Err(e) = written.and(sink.flush().await) {
            tracing::warn!(container_id, exec_id, ?stream, error = %e, "writing output failed");
            return;
        }
    }
}

async fn copy_in(
    agent: AgentClient,
    container_id: String,
    exec_id: String,
    mut fifo: pipe::Receiver,
    close: Arc<Notify>,
) {
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        tokio::select! {
            read = fifo.read(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => {
                    if forward(&agent, &container_id, &exec_id, &buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(container_id, exec_id, error = %e, "stdin FIFO read failed");
                    break;
                }
            },
            _ = close.notified() => {
                // Forward what the client wrote before it asked to close.
                loop {
                    match fifo.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if forward(&agent, &container_id, &exec_id, &buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                break;
            }
        }
    }
    if let Err(e) = agent.close_stdin(&container_id, &exec_id).await {
        tracing::debug!(container_id, exec_id, error = %e, "closing stdin");
    }
}

async fn forward(
    agent: &AgentClient,
    container_id: &str,
    exec_id: &str,
    mut data: &[u8],
) -> Result<(), ()> {
    while !data.is_empty() {
        match agent
            .write_stdin(container_id, exec_id, data.to_vec())
            .await
        {
            Ok(0) => return Err(()),
            Ok(n) => data = &data[(n as usize).min(data.len())..],
            Err(e) => {
                tracing::debug!(container_id, exec_id, error = %e, "stdin copy ended");
                return Err(());
            }
        }
    }
    Ok(())
}
