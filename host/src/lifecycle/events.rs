//! The ordered stream of task events.
//!
//! Every event goes through one unbounded channel, so subscribers see them
//! in the order the runtime emitted them. The order containerd relies on is
//! kept by when they are emitted: TaskCreate after the agent created the
//! container, TaskStart before the exit watcher is started, an exec's
//! TaskExit before its container's, TaskDelete after teardown.

use std::time::SystemTime;

use tokio::sync::mpsc;

use super::state::Exit;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Create {
        container_id: String,
        bundle: String,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    /// An init (empty `exec_id`) or an exec ended.
    Exit {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit: Exit,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit: Exit,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    Oom {
        container_id: String,
        at: SystemTime,
    },
}

impl Event {
    /// containerd's topic for the event.
    pub fn topic(&self) -> &'static str {
        match self {
            Event::Create { .. } => "/tasks/create",
            Event::Start { .. } => "/tasks/start",
            Event::Exit { .. } => "/tasks/exit",
            Event::Delete { .. } => "/tasks/delete",
            Event::ExecAdded { .. } => "/tasks/exec-added",
            Event::ExecStarted { .. } => "/tasks/exec-started",
            Event::Paused { .. } => "/tasks/paused",
            Event::Resumed { .. } => "/tasks/resumed",
            Event::Oom { .. } => "/tasks/oom",
        }
    }
}

/// The sending half; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventStream {
    tx: mpsc::UnboundedSender<Event>,
}

impl EventStream {
    pub fn new() -> (EventStream, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventStream { tx }, rx)
    }

    pub fn emit(&self, event: Event) {
        tracing::debug!(topic = event.topic(), ?event, "event");
        if self.tx.send(event).is_err() {
            tracing::warn!("event dropped: nobody is listening any more");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_arrive_in_emission_order() {
        let (stream, mut rx) = EventStream::new();
        let id = || "c".to_string();
        stream.emit(Event::Create {
            container_id: id(),
            bundle: "/b".into(),
            pid: 1,
        });
        stream.emit(Event::Start {
            container_id: id(),
            pid: 1,
        });
        stream.emit(Event::Exit {
            container_id: id(),
            exec_id: String::new(),
            pid: 1,
            exit: Exit::now(0),
        });
        let topics: Vec<_> = [rx.recv().await, rx.recv().await, rx.recv().await]
            .into_iter()
            .map(|e| e.unwrap().topic())
            .collect();
        assert_eq!(topics, ["/tasks/create", "/tasks/start", "/tasks/exit"]);
    }
}
