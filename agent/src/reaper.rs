//! Collects the exit status of every child of the agent.
//!
//! The agent reaps with `waitpid(-1)`: as the guest's PID 1 it must reap
//! orphans too, and container processes are its direct children (the exec
//! helper clones them with `CLONE_PARENT`). A spawner registers a pid while
//! holding the reaper's lock across `clone`, so an exit can never be reaped
//! before someone listens for it; pids learned later (an exec process's pid
//! arrives over a socket) claim an exit that was already reaped from the
//! bounded `unclaimed` list.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How many exits of unregistered children are remembered.
const UNCLAIMED_LIMIT: usize = 1024;

/// A process's exit status as a shell reports it: the exit code, or 128 plus
/// the number of the signal that killed it.
pub type ExitStatus = i32;

/// Receives the exit status of one process once it is known.
pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

#[derive(Default)]
pub struct Children {
    waiting: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    unclaimed: VecDeque<(i32, ExitStatus)>,
}

impl Children {
    /// Starts listening for the exit of `pid`.
    pub fn register(&mut self, pid: Pid) -> ExitWatch {
        let raw = pid.as_raw();
        let claimed = self
            .unclaimed
            .iter()
            .position(|(p, _)| *p == raw)
            .and_then(|at| self.unclaimed.remove(at));
        if let Some((_, status)) = claimed {
            return watch::channel(Some(status)).1;
        }
        let (tx, rx) = watch::channel(None);
        self.waiting.insert(raw, tx);
        rx
    }

    fn exited(&mut self, pid: i32, status: ExitStatus) {
        match self.waiting.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(Some(status));
            }
            None => {
                if self.unclaimed.len() == UNCLAIMED_LIMIT {
                    self.unclaimed.pop_front();
                }
                self.unclaimed.push_back((pid, status));
            }
        }
    }
}

/// The agent's child reaper; cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    children: Arc<Mutex<Children>>,
}

impl Reaper {
    /// Locks the child table. Hold the guard across `clone` and `register`.
    pub fn lock(&self) -> MutexGuard<'_, Children> {
        self.children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reaps children whenever SIGCHLD arrives, for the life of the runtime.
    pub fn start(&self) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = self.clone();
        reaper.reap_all();
        tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                reaper.reap_all();
            }
        });
        Ok(())
    }

    fn reap_all(&self) {
        let mut children = self.lock();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => children.exited(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    children.exited(pid.as_raw(), 128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_before_registration_is_claimed_later() {
        let mut c = Children::default();
        c.exited(42, 7);
        let rx = c.register(Pid::from_raw(42));
        assert_eq!(*rx.borrow(), Some(7));
    }

    #[test]
    fn registered_exit_is_delivered() {
        let mut c = Children::default();
        let rx = c.register(Pid::from_raw(43));
        assert_eq!(*rx.borrow(), None);
        c.exited(43, 137);
        assert_eq!(*rx.borrow(), Some(137));
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let mut c = Children::default();
        for pid in 0..(UNCLAIMED_LIMIT as i32 + 10) {
            c.exited(pid, 0);
        }
        assert_eq!(c.unclaimed.len(), UNCLAIMED_LIMIT);
    }
}
