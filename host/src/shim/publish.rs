//! Forwarding the runtime's events to containerd, one at a time and in
//! order. containerd-shim's own publisher requeues a failed event behind
//! later ones; a TaskExit overtaken by its TaskDelete would break
//! containerd's bookkeeping, so this one retries in place instead.

use std::os::fd::IntoRawFd;
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

use super::task::timestamp;
use crate::lifecycle::events::Event;

const ATTEMPTS: u32 = 5;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shim about to exit waits for its last events to go out.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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

async fn connect(address: &str) -> std::io::Result<EventsClient> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let stream = tokio::net::UnixStream::connect(path).await?;
    let fd = stream.into_std()?.into_raw_fd();
    // SAFETY: `fd` is a connected Unix socket we own and hand over whole.
    Ok(EventsClient::new(unsafe {
        Client::from_raw_unix_socket_fd(fd)
    }))
}

fn envelope(namespace: &str, event: &Event) -> Option<ForwardRequest> {
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

/// Forwards events from `rx` to containerd at `address` until `flush` is
/// notified, then sends what is still queued and returns.
pub async fn forward(
    address: String,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
    flush: Arc<Notify>,
) {
    let mut client: Option<EventsClient> = None;
    loop {
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = flush.notified() => {
                while let Ok(event) = rx.try_recv() {
                    send(&address, &namespace, &mut client, &event).await;
                }
                return;
            }
        };
        send(&address, &namespace, &mut client, &event).await;
    }
}

async fn send(address: &str, namespace: &str, client: &mut Option<EventsClient>, event: &Event) {
    if address.is_empty() {
        // Started without containerd (`kestrel run`): nobody to tell, and
        // the CLI follows containers through State instead.
        return;
    }
    let Some(req) = envelope(namespace, event) else {
        tracing::error!(topic = event.topic(), "encoding an event failed");
        return;
    };
    for attempt in 1..=ATTEMPTS {
        if client.is_none() {
            match connect(address).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    tracing::warn!(address, error = %e, "connecting to containerd's event service")
                }
            }
        }
        if let Some(c) = client.as_ref() {
            match c
                .forward(context::with_duration(REQUEST_TIMEOUT), &req)
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
