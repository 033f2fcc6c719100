//! Copying a process's standard streams between containerd's FIFOs (or a
//! log file, or a logging binary) and the agent's WriteStdin / ReadStdout /
//! ReadStderr calls.
//!
//! Setting up is split in two: [`OpenedStdio::open`] opens every
//! destination (and starts a `binary://` logger, waiting until it is
//! ready) before the process exists in the guest, so a destination that
//! fails leaves nothing to undo there; [`OpenedStdio::start`] then starts
//! the copying once the agent knows the process.
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

use super::log_binary::{Logger, LoggerError, LoggerFor};
use super::log_uri::{LogDestination, LogUriError};
use crate::agent_client::AgentClient;
use crate::lifecycle::registry::Stdio;

/// The size of one ReadStdout/ReadStderr request.
const CHUNK: u32 = 32 * 1024;
/// How long a logging binary may take to close its fd 5 (containerd's
/// client waits as long for its own loggers).
const LOGGER_READY: Duration = Duration::from_secs(10);
/// How long a logging binary may take to exit once its input ended.
const LOGGER_EXIT: Duration = Duration::from_secs(5);

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error(transparent)]
    Uri(#[from] LogUriError),
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("logging binary {uri}")]
    Logger {
        uri: String,
        #[source]
        source: LoggerError,
    },
    #[error("stderr {stderr:?} is a logging binary but stdout {stdout:?} is not; give both the same binary:// URI")]
    StderrOnlyBinary { stdout: String, stderr: String },
}

/// Who a process is, for the logger's environment and the logs.
#[derive(Debug, Clone, Copy)]
pub struct ProcessRef<'a> {
    pub container_id: &'a str,
    /// Empty for a container's init.
    pub exec_id: &'a str,
    /// containerd's namespace, for a logger's CONTAINER_NAMESPACE.
    pub namespace: &'a str,
}

/// A process's destinations, opened, not yet fed.
#[derive(Debug, Default)]
pub struct OpenedStdio {
    stdout: Option<OpenSink>,
    stderr: Option<OpenSink>,
    stdin: Option<pipe::Receiver>,
    logger: Option<Logger>,
}

/// A sink with a Debug of its own ([`AsyncWrite`] trait objects have none).
struct OpenSink(Sink);

impl std::fmt::Debug for OpenSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenSink")
    }
}

impl OpenedStdio {
    /// Opens what `stdio` names. Empty paths are skipped; with a terminal,
    /// stderr is part of stdout. A `binary://` stdout starts one logger for
    /// both streams, as containerd does (stderr's string is then not read).
    pub async fn open(process: ProcessRef<'_>, stdio: &Stdio) -> Result<OpenedStdio, StdioError> {
        let mut opened = OpenedStdio::default();
        if !stdio.stdin.is_empty() {
            let fifo = pipe::OpenOptions::new()
                .open_receiver(&stdio.stdin)
                .map_err(|source| StdioError::Open {
                    path: stdio.stdin.clone(),
                    source,
                })?;
            opened.stdin = Some(fifo);
        }
        let stdout = parse(&stdio.stdout)?;
        if let Some(LogDestination::Binary(command)) = &stdout {
            // containerd gives an exec's logger the exec id as CONTAINER_ID.
            let id = if process.exec_id.is_empty() {
                process.container_id
            } else {
                process.exec_id
            };
            let logs_for = LoggerFor {
                id,
                namespace: process.namespace,
            };
            let (logger, inputs) = Logger::start(command, logs_for, LOGGER_READY)
                .await
                .map_err(|source| StdioError::Logger {
                    uri: stdio.stdout.clone(),
                    source,
                })?;
            tracing::info!(
                container_id = process.container_id,
                exec_id = process.exec_id,
                uri = stdio.stdout,
                "logging binary ready"
            );
            opened.stdout = Some(OpenSink(Box::new(inputs.stdout)));
            // With a terminal the logger's fd 4 just ends at once.
            if !stdio.terminal {
                opened.stderr = Some(OpenSink(Box::new(inputs.stderr)));
            }
            opened.logger = Some(logger);
            return Ok(opened);
        }
        let stderr = if stdio.terminal {
            None
        } else {
            parse(&stdio.stderr)?
        };
        opened.stdout = stdout.map(|d| open_output(d, stdio)).transpose()?;
        opened.stderr = stderr.map(|d| open_output(d, stdio)).transpose()?;
        Ok(opened)
    }

    /// Starts copying between the agent and the destinations.
    pub fn start(self, agent: &AgentClient, container_id: &str, exec_id: &str) -> ProcessIo {
        let mut io = ProcessIo {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            close_stdin: None,
            outputs: Vec::new(),
            logger: self.logger,
        };
        let streams = [(Stream::Stdout, self.stdout), (Stream::Stderr, self.stderr)];
        for (stream, sink) in streams {
            let Some(OpenSink(sink)) = sink else {
                continue;
            };
            let task = copy_out(
                agent.clone(),
                container_id.into(),
                exec_id.into(),
                stream,
                sink,
            );
            io.outputs.push(tokio::spawn(task));
        }
        if let Some(fifo) = self.stdin {
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
        io
    }

    /// Closes everything it opened; a logger is killed and reaped before
    /// this returns (the process never came to be).
    pub async fn discard(self, container_id: &str, exec_id: &str) {
        drop((self.stdout, self.stderr, self.stdin));
        if let Some(logger) = self.logger {
            logger.abort(container_id, exec_id).await;
        }
    }
}

fn parse(path: &str) -> Result<Option<LogDestination>, StdioError> {
    if path.is_empty() {
        return Ok(None);
    }
    Ok(Some(LogDestination::parse(path)?))
}

/// The copy tasks of one process, and its logger if it has one.
#[derive(Debug)]
pub struct ProcessIo {
    container_id: String,
    exec_id: String,
    close_stdin: Option<Arc<Notify>>,
    outputs: Vec<JoinHandle<()>>,
    logger: Option<Logger>,
}

impl ProcessIo {
    /// Forwards what stdin holds, then closes the process's stdin.
    pub fn close_stdin(&self) {
        if let Some(close) = &self.close_stdin {
            close.notify_one();
        }
    }

    /// Waits until the outputs reached their end, at most `bound`: a
    /// process that left a child holding its stdout must not hold up its
    /// exit forever. Then a logger gets its end-of-file and a bounded time
    /// to finish.
    pub async fn drain(&mut self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        let mut outputs = std::mem::take(&mut self.outputs).into_iter();
        for mut task in outputs.by_ref() {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(
                    container_id = self.container_id,
                    exec_id = self.exec_id,
                    ?bound,
                    "output still open after the process exited; not waiting longer"
                );
                stop_copier(task).await;
                break;
            }
        }
        // Copiers still running hold the logger's input open: end them
        // before waiting for the logger.
        for task in outputs {
            stop_copier(task).await;
        }
        if let Some(logger) = self.logger.take() {
            logger
                .stop(LOGGER_EXIT, &self.container_id, &self.exec_id)
                .await;
        }
    }
}

/// Aborts a copier that has not finished and waits until it is gone (and
/// its sink closed). A finished task's handle must not be polled again.
async fn stop_copier(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.close_stdin();
        for task in &self.outputs {
            task.abort();
        }
        // A logger left here is killed and reaped by tokio (kill_on_drop).
    }
}

/// A FIFO (containerd's default) or a file (`file://`), opened for the
/// process's output. A logging binary reaches here only as stderr's when
/// stdout has none, which containerd has no way to express either.
fn open_output(destination: LogDestination, stdio: &Stdio) -> Result<OpenSink, StdioError> {
    let (path, opened) = match destination {
        LogDestination::File(path) => {
            let opened = open_file(&path);
            (path, opened)
        }
        LogDestination::Fifo(path) => {
            // Read-write, so opening never waits for a reader.
            let opened = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&path)
                .map(|fifo| Box::new(fifo) as Sink);
            (path, opened)
        }
        LogDestination::Binary(_) => {
            return Err(StdioError::StderrOnlyBinary {
                stdout: stdio.stdout.clone(),
                stderr: stdio.stderr.clone(),
            })
        }
    };
    opened.map(OpenSink).map_err(|source| StdioError::Open {
        path: path.display().to_string(),
        source,
    })
}

fn open_file(path: &std::path::Path) -> std::io::Result<Sink> {
    // As containerd: the file's directory is made if missing.
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(Box::new(tokio::fs::File::from_std(file)))
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
