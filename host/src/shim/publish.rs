//! Forwarding the runtime's events, one at a time and in order, to
//! containerd or to the `kestrel events` listening now.
//!
//! containerd-shim's own publisher requeues a failed event behind later
//! ones; a TaskExit overtaken by its TaskDelete would break containerd's
//! bookkeeping, so this one retries in place instead.
//!
//! A shim the CLI started has no containerd. It is given a directory in
//! which every running `kestrel events` serves containerd's Events API on a
//! socket of its own, and sends each event to every socket there, the next
//! event only once all have answered, so that each listener sees the events
//! in the order they were emitted. Listeners come and go while the shim
//! lives on: an event goes to those present when it is sent, and is dropped
//! when there are none. Nobody would collect a kept event later, and a shim
//! that waited for a listener would stall its teardown, so an absent or
//! dead listener costs no retry and a wedged one at most
//! [`LISTENER_TIMEOUT`] per event.

use std::collections::HashMap;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::events::task::*;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc::context;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::task::timestamp;
use crate::lifecycle::events::Event;

const ATTEMPTS: u32 = 5;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shim about to exit waits for its last events to go out.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one listener may take to accept one event. A listener queues
/// what it receives and answers at once; one slower than this is stopped or
/// wedged, and must not hold back the others or the shim's teardown.
pub const LISTENER_TIMEOUT: Duration = Duration::from_secs(1);
/// The environment variable that names a shim's listener directory.
pub const LISTENERS_ENV: &str = "KESTREL_EVENT_LISTENERS";
/// The extension of a listener's socket in that directory; other files
/// there are not listeners.
pub const LISTENER_EXTENSION: &str = "sock";

/// Where a shim's events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// containerd's event service at this address: it must see every event,
    /// so a failed one is retried in place.
    Containerd(String),
    /// Every listener socket in this directory, best effort (module doc).
    Listeners(PathBuf),
    /// Nobody to tell.
    Nowhere,
}

impl Destination {
    /// The destination the shim's environment names. containerd's
    /// `TTRPC_ADDRESS` comes first: a shim containerd started behaves the
    /// same whatever else its environment holds.
    pub fn from_env() -> Destination {
        let var = |name| std::env::var(name).ok();
        Destination::choose(var("TTRPC_ADDRESS"), var(LISTENERS_ENV))
    }

    fn choose(ttrpc_address: Option<String>, listeners: Option<String>) -> Destination {
        match (ttrpc_address, listeners) {
            (Some(address), _) if !address.is_empty() => Destination::Containerd(address),
            (_, Some(dir)) if !dir.is_empty() => Destination::Listeners(dir.into()),
            _ => Destination::Nowhere,
        }
    }
}

/// containerd's message for one of our events.
pub fn to_containerd(event: &Event) -> Box<dyn MessageDyn> {
    match event.clone() {
        Event::Create {
            container_id,
            bundle,
            pid,
        } => Box::new(TaskCreate {
            container_id,
            bundle,
            pid,
            ..Default::default()
        }),
        Event::Start { container_id, pid } => Box::new(TaskStart {
            container_id,
            pid,
            ..Default::default()
        }),
        Event::Exit {
            container_id,
            exec_id,
            pid,
            exit,
        } => Box::new(TaskExit {
            // containerd names the init process after its container.
            id: if exec_id.is_empty() {
                container_id.clone()
            } else {
                exec_id
            },
            container_id,
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }),
        Event::Delete {
            container_id,
            pid,
            exit,
        } => Box::new(TaskDelete {
            id: container_id.clone(),
            container_id,
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }),
        Event::ExecAdded {
            container_id,
            exec_id,
        } => Box::new(TaskExecAdded {
            container_id,
            exec_id,
            ..Default::default()
        }),
        Event::ExecStarted {
            container_id,
            exec_id,
            pid,
        } => Box::new(TaskExecStarted {
            container_id,
            exec_id,
            pid,
            ..Default::default()
        }),
        Event::Paused { container_id } => Box::new(TaskPaused {
            container_id,
            ..Default::default()
        }),
        Event::Resumed { container_id } => Box::new(TaskResumed {
            container_id,
            ..Default::default()
        }),
        Event::Oom { container_id, .. } => Box::new(TaskOOM {
            container_id,
            ..Default::default()
        }),
    }
}

async fn connect(path: &Path) -> std::io::Result<EventsClient> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    let fd = stream.into_std()?.into_raw_fd();
    // SAFETY: `fd` is a connected Unix socket we own and hand over whole.
    Ok(EventsClient::new(unsafe {
        Client::from_raw_unix_socket_fd(fd)
    }))
}

/// The request that carries `event` to containerd's Events API; `None`
/// when the event cannot be encoded.
pub fn envelope(namespace: &str, event: &Event) -> Option<ForwardRequest> {
    let message = to_containerd(event);
    let value = message.write_to_bytes_dyn().ok()?;
    let any = Any {
        type_url: message.descriptor_dyn().full_name().to_string(),
        value,
        ..Default::default()
    };
    Some(ForwardRequest {
        envelope: MessageField::some(Envelope {
            timestamp: MessageField::some(timestamp(std::time::SystemTime::now())),
            namespace: namespace.into(),
            topic: event.topic().into(),
            event: MessageField::some(any),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Forwards events from `rx` to `destination` until `flush` is notified,
/// then sends what is still queued and returns.
pub async fn forward(
    destination: Destination,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
    flush: Arc<Notify>,
) {
    let mut sink = Sink::new(destination);
    loop {
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = flush.notified() => {
                while let Ok(event) = rx.try_recv() {
                    sink.send(&namespace, &event).await;
                }
                return;
            }
        };
        sink.send(&namespace, &event).await;
    }
}

/// A destination with the connections kept to it between events.
enum Sink {
    Containerd {
        address: String,
        client: Option<EventsClient>,
    },
    Listeners {
        dir: PathBuf,
        clients: HashMap<PathBuf, EventsClient>,
    },
    Nowhere,
}

impl Sink {
    fn new(destination: Destination) -> Sink {
        match destination {
            Destination::Containerd(address) => Sink::Containerd {
                address,
                client: None,
            },
            Destination::Listeners(dir) => Sink::Listeners {
                dir,
                clients: HashMap::new(),
            },
            Destination::Nowhere => Sink::Nowhere,
        }
    }

    async fn send(&mut self, namespace: &str, event: &Event) {
        if matches!(self, Sink::Nowhere) {
            return;
        }
        let Some(req) = envelope(namespace, event) else {
            tracing::error!(topic = event.topic(), "encoding an event failed");
            return;
        };
        match self {
            Sink::Containerd { address, client } => {
                send_to_containerd(address, client, event, &req).await
            }
            Sink::Listeners { dir, clients } => send_to_listeners(dir, clients, event, req).await,
            Sink::Nowhere => {}
        }
    }
}

async fn send_to_containerd(
    address: &str,
    client: &mut Option<EventsClient>,
    event: &Event,
    req: &ForwardRequest,
) {
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    for attempt in 1..=ATTEMPTS {
        if client.is_none() {
            match connect(path).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    tracing::warn!(address, error = %e, "connecting to containerd's event service")
                }
            }
        }
        if let Some(c) = client.as_ref() {
            match c
                .forward(context::with_duration(REQUEST_TIMEOUT), req)
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(topic = event.topic(), attempt, error = %e, "publishing an event");
                    *client = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100) * attempt).await;
    }
    tracing::error!(
        topic = event.topic(),
        ?event,
        "event dropped after {ATTEMPTS} attempts"
    );
}

#[derive(Debug, thiserror::Error)]
enum ListenerError {
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("forwarding: {0}")]
    Forward(#[source] containerd_shim_protos::ttrpc::Error),
    #[error("no answer within {LISTENER_TIMEOUT:?}")]
    TimedOut,
}

/// Sends `req` to every listener in `dir` at once, so that a wedged one
/// delays the others by [`LISTENER_TIMEOUT`] at most, and returns when each
/// has answered or failed: the next event starts only after this one.
async fn send_to_listeners(
    dir: &Path,
    clients: &mut HashMap<PathBuf, EventsClient>,
    event: &Event,
    req: ForwardRequest,
) {
    let sockets = listener_sockets(dir);
    // A listener that went away leaves a connection nobody will read.
    clients.retain(|path, _| sockets.contains(path));
    let mut sends = JoinSet::new();
    for path in sockets {
        let cached = clients.remove(&path);
        let req = req.clone();
        sends.spawn(async move {
            let sent = tokio::time::timeout(LISTENER_TIMEOUT, async {
                let client = match cached {
                    Some(client) => client,
                    None => connect(&path).await.map_err(ListenerError::Connect)?,
                };
                client
                    .forward(context::with_duration(LISTENER_TIMEOUT), &req)
                    .await
                    .map_err(ListenerError::Forward)?;
                Ok(client)
            })
            .await
            .unwrap_or(Err(ListenerError::TimedOut));
            (path, sent)
        });
    }
    while let Some(joined) = sends.join_next().await {
        match joined {
            Ok((path, Ok(client))) => {
                clients.insert(path, client);
            }
            // A listener killed without removing its socket refuses at once;
            // the next `kestrel events` removes the socket.
            Ok((path, Err(error))) => tracing::debug!(
                topic = event.topic(),
                listener = %path.display(),
                %error,
                "event not delivered to a listener"
            ),
            Err(error) => tracing::error!(%error, "sending to a listener panicked"),
        }
    }
}

/// The listener sockets in `dir`; none when it does not exist.
fn listener_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == LISTENER_EXTENSION)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use async_trait::async_trait;
    use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use containerd_shim_protos::ttrpc::r#async::transport::Listener;
    use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};

    use super::*;
    use crate::lifecycle::state::Exit;

    type Topics = Arc<Mutex<Vec<String>>>;

    /// A listener that writes down the topic of each event it receives.
    struct Recorder(Topics);

    #[async_trait]
    impl Events for Recorder {
        async fn forward(
            &self,
            _ctx: &TtrpcContext,
            req: ForwardRequest,
        ) -> containerd_shim_protos::ttrpc::Result<Empty> {
            self.0.lock().unwrap().push(req.envelope.topic.clone());
            Ok(Empty::new())
        }
    }

    async fn listen(path: &Path) -> (Server, Topics) {
        let topics = Topics::default();
        let socket = std::os::unix::net::UnixListener::bind(path).unwrap();
        let mut server = Server::new()
            .add_listener(Listener::try_from(socket).unwrap())
            .register_service(create_events(Arc::new(Recorder(Arc::clone(&topics)))));
        server.start().await.unwrap();
        (server, topics)
    }

    fn lifecycle() -> Vec<Event> {
        let container_id = || "c".to_string();
        vec![
            Event::Create {
                container_id: container_id(),
                bundle: "/b".into(),
                pid: 7,
            },
            Event::Start {
                container_id: container_id(),
                pid: 7,
            },
            Event::Exit {
                container_id: container_id(),
                exec_id: String::new(),
                pid: 7,
                exit: Exit::now(3),
            },
            Event::Delete {
                container_id: container_id(),
                pid: 7,
                exit: Exit::now(3),
            },
        ]
    }

    const TOPICS: [&str; 4] = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ];

    /// Forwards `events` to `destination`; returns how long that took.
    async fn forward_all(destination: Destination, events: Vec<Event>) -> Duration {
        let (tx, rx) = mpsc::unbounded_channel();
        for event in events {
            tx.send(event).unwrap();
        }
        drop(tx);
        let started = Instant::now();
        forward(destination, "kestrel".into(), rx, Arc::new(Notify::new())).await;
        started.elapsed()
    }

    #[tokio::test]
    async fn every_listener_gets_every_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_one, first) = listen(&dir.path().join("1.sock")).await;
        let (_two, second) = listen(&dir.path().join("2.sock")).await;
        std::fs::write(dir.path().join("notes.txt"), "not a listener").unwrap();

        forward_all(Destination::Listeners(dir.path().into()), lifecycle()).await;

        assert_eq!(*first.lock().unwrap(), TOPICS);
        assert_eq!(*second.lock().unwrap(), TOPICS);
    }

    #[tokio::test]
    async fn events_nobody_listens_for_are_dropped_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // A listener killed outright leaves its socket behind.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join("9.sock")).unwrap());

        let dead = forward_all(Destination::Listeners(dir.path().into()), lifecycle()).await;
        let absent = Destination::Listeners(dir.path().join("never-made"));
        let none = forward_all(absent, lifecycle()).await;

        assert!(dead < LISTENER_TIMEOUT / 2, "a dead listener took {dead:?}");
        assert!(none < LISTENER_TIMEOUT / 2, "no directory took {none:?}");
    }

    #[test]
    fn containerds_address_wins_over_a_listener_directory() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            Destination::choose(some("/run/c.sock"), some("/run/kestrel/cli/.events")),
            Destination::Containerd("/run/c.sock".into())
        );
        assert_eq!(
            Destination::choose(some(""), some("/d")),
            Destination::Listeners("/d".into())
        );
        assert_eq!(Destination::choose(None, None), Destination::Nowhere);
    }
}
