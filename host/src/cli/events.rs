//! `kestrel events`: the lifecycle events of the CLI's containers as their
//! shims publish them, each shim's in the order it emitted them.
//!
//! Each `kestrel events` serves containerd's Events API on a socket of its
//! own in [`listeners_dir`], and every shim the CLI starts forwards each of
//! its events to every socket there (`kestrel_host::shim::publish`). So any
//! number can run at once and each prints every event published while it
//! listens; one published while none listens is dropped by the shim, since
//! nobody would ever ask for it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use async_trait::async_trait;
use clap::Args;
use containerd_shim_protos::events::task::*;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{create_events, Events};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::containers;
use kestrel_host::shim::publish::LISTENER_EXTENSION;

/// How long a listener socket may take to accept before we leave it be.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Where the listeners' sockets are: a directory under the CLI root whose
/// name is no valid container id, so that no container can take it and
/// `ps` never lists it. Absolute, since shims run in their container's
/// directory and a relative `$KESTREL_CLI_ROOT` would lead them astray.
pub fn listeners_dir() -> PathBuf {
    let dir = containers::root().join(".events");
    std::path::absolute(&dir).unwrap_or(dir)
}

pub async fn run(args: EventsArgs) -> Result<ExitCode> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listening = Listening::start(&listeners_dir(), tx).await?;
    loop {
        tokio::select! {
            Some(envelope) = rx.recv() => print(&envelope, args.json),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    listening.stop().await;
    // A shim whose Forward was answered counts on the event being printed.
    while let Ok(envelope) = rx.try_recv() {
        print(&envelope, args.json);
    }
    Ok(ExitCode::SUCCESS)
}

/// Hands every event a shim forwards to the printer. It answers at once
/// rather than after printing: a shim waits for the answer before its next
/// event, and a reader who paused our output must not stall the shims.
struct Inbox(mpsc::UnboundedSender<Envelope>);

#[async_trait]
impl Events for Inbox {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        if let Some(envelope) = req.envelope.into_option() {
            // Fails only once we stopped printing: nothing to do about it.
            let _ = self.0.send(envelope);
        }
        Ok(Empty::new())
    }
}

/// Our socket in the listeners' directory and the server behind it.
struct Listening {
    path: PathBuf,
    server: Server,
}

impl Listening {
    async fn start(dir: &Path, inbox: mpsc::UnboundedSender<Envelope>) -> Result<Listening> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_dead_listeners(dir).await;
        let path = dir.join(format!("{}.{LISTENER_EXTENSION}", std::process::id()));
        // Only a dead process with our pid can have left it.
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        let mut server = Server::new()
            .add_listener(Listener::try_from(socket)?)
            .register_service(create_events(Arc::new(Inbox(inbox))));
        server.start().await?;
        Ok(Listening { path, server })
    }

    async fn stop(mut self) {
        // The socket first, so that shims stop sending to us.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.server.shutdown().await;
    }
}

/// Removes the sockets that `kestrel events` killed outright left behind:
/// shims would keep trying each one, if only for nothing.
async fn remove_dead_listeners(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(Result::ok).map(|entry| entry.path()) {
        if path.extension().is_none_or(|ext| ext != LISTENER_EXTENSION) {
            continue;
        }
        let probe = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(&path));
        if let Ok(Err(e)) = probe.await {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// One event as we print it.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    time: SystemTime,
    /// The container's id.
    id: String,
    /// The topic's last part: create, start, exit, delete, exec-added, ...
    event: String,
    /// The exec the event is about, if it is not about the init process.
    exec_id: Option<String>,
    exit_status: Option<u32>,
}

/// The record of an envelope a shim forwarded; `None` for a topic we do
/// not know or a payload that does not parse.
fn decode(envelope: &Envelope) -> Option<Record> {
    let event = envelope.topic.strip_prefix("/tasks/")?;
    let value = &envelope.event.as_ref()?.value;
    // An event about a container's init process, with no exit status.
    let plain = |id: String| (id, None, None);
    let (id, exec_id, exit_status) = match event {
        "create" => plain(TaskCreate::parse_from_bytes(value).ok()?.container_id),
        "start" => plain(TaskStart::parse_from_bytes(value).ok()?.container_id),
        "exit" => {
            let exit = TaskExit::parse_from_bytes(value).ok()?;
            // containerd names an init's exit after its container.
            let exec_id = (exit.id != exit.container_id).then_some(exit.id);
            (exit.container_id, exec_id, Some(exit.exit_status))
        }
        "delete" => plain(TaskDelete::parse_from_bytes(value).ok()?.container_id),
        "exec-added" => {
            let added = TaskExecAdded::parse_from_bytes(value).ok()?;
            (added.container_id, Some(added.exec_id), None)
        }
        "exec-started" => {
            let started = TaskExecStarted::parse_from_bytes(value).ok()?;
            (started.container_id, Some(started.exec_id), None)
        }
        "oom" => plain(TaskOOM::parse_from_bytes(value).ok()?.container_id),
        "paused" => plain(TaskPaused::parse_from_bytes(value).ok()?.container_id),
        "resumed" => plain(TaskResumed::parse_from_bytes(value).ok()?.container_id),
        _ => return None,
    };
    let time = envelope
        .timestamp
        .as_ref()
        .and_then(system_time)
        .unwrap_or_else(SystemTime::now);
    Some(Record {
        time,
        id,
        event: event.to_string(),
        exec_id,
        exit_status,
    })
}

fn system_time(at: &Timestamp) -> Option<SystemTime> {
    let since = Duration::new(
        u64::try_from(at.seconds).ok()?,
        u32::try_from(at.nanos).ok()?,
    );
    UNIX_EPOCH.checked_add(since)
}

fn print(envelope: &Envelope, json: bool) {
    match decode(envelope) {
        Some(record) => println!("{}", line(&record, json)),
        None => eprintln!(
            "kestrel events: skipping an event on topic {:?}",
            envelope.topic
        ),
    }
}

fn line(record: &Record, json: bool) -> String {
    let time = rfc3339(record.time);
    let Record { id, event, .. } = record;
    if json {
        let mut object = serde_json::json!({"time": time, "id": id, "event": event});
        if let Some(exec_id) = &record.exec_id {
            object["exec_id"] = exec_id.as_str().into();
        }
        if let Some(status) = record.exit_status {
            object["exit_status"] = status.into();
            // The name the output had before it carried the shims' events.
            object["exit"] = status.into();
        }
        return object.to_string();
    }
    let mut line = format!("{time} {id} {event}");
    if let Some(exec_id) = &record.exec_id {
        line.push_str(&format!(" exec {exec_id}"));
    }
    if let Some(status) = record.exit_status {
        line.push_str(&format!(" (exit {status})"));
    }
    line
}

/// `at` as RFC 3339 UTC with milliseconds.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_host::lifecycle::events::Event;
    use kestrel_host::lifecycle::state::Exit;
    use kestrel_host::shim::publish::envelope;

    fn record_of(event: Event) -> Record {
        let req = envelope("kestrel", &event).expect("encodes");
        decode(req.envelope.as_ref().expect("an envelope")).expect("decodes")
    }

    #[test]
    fn an_init_exit_reads_back_with_its_container_and_status() {
        let record = record_of(Event::Exit {
            container_id: "c1".into(),
            exec_id: String::new(),
            pid: 42,
            exit: Exit::now(3),
        });
        assert_eq!((record.id.as_str(), record.event.as_str()), ("c1", "exit"));
        assert_eq!((record.exec_id, record.exit_status), (None, Some(3)));
    }

    #[test]
    fn an_exec_exit_names_the_exec() {
        let record = record_of(Event::Exit {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            pid: 43,
            exit: Exit::now(5),
        });
        assert_eq!(record.exec_id.as_deref(), Some("e1"));
        let text = line(&record, false);
        assert!(text.ends_with(" c1 exit exec e1 (exit 5)"), "{text}");
    }

    #[test]
    fn json_lines_keep_the_old_fields_and_add_the_exit_status() {
        let record = Record {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            id: "c1".into(),
            event: "exit".into(),
            exec_id: None,
            exit_status: Some(3),
        };
        let object: serde_json::Value = serde_json::from_str(&line(&record, true)).unwrap();
        assert_eq!(
            object,
            serde_json::json!({
                "time": "2023-11-14T22:13:20.123Z",
                "id": "c1",
                "event": "exit",
                "exit": 3,
                "exit_status": 3,
            })
        );
    }

    #[test]
    fn a_topic_we_do_not_know_is_skipped() {
        let mut req = envelope(
            "kestrel",
            &Event::Paused {
                container_id: "c1".into(),
            },
        )
        .unwrap();
        assert_eq!(
            record_of(Event::Paused {
                container_id: "c1".into()
            })
            .event,
            "paused"
        );
        req.envelope.mut_or_insert_default().topic = "/snapshot/prepare".into();
        assert_eq!(decode(req.envelope.as_ref().unwrap()), None);
    }
}
