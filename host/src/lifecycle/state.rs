//! The state machine of one process (a container's init or an exec).
//!
//! ```text
//! Created ──start──► Running ◄──resume── Paused
//!    │                  │ └────pause──────►│
//!    │                 exit               exit
//!    └──────exit──────► Stopped ◄─────────┘
//!                        │   ▲ delete failed
//!                   begin delete
//!                        ▼   │
//!                      Deleting ──finished──► Deleted
//! ```
//!
//! The exit status and time are recorded once, on the way into Stopped,
//! and stay through Deleting and Deleted: a State asked during teardown
//! answers STOPPED with the real status, never a placeholder.

use std::time::SystemTime;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn now(status: u32) -> Self {
        Exit {
            status,
            at: SystemTime::now(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
    Deleting,
    Deleted,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Phase::Created => "created",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Stopped => "stopped",
            Phase::Deleting => "deleting",
            Phase::Deleted => "deleted",
        };
        f.write_str(name)
    }
}

/// What can happen to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Start { pid: u32 },
    Pause,
    Resume,
    Exit(Exit),
    BeginDelete,
    DeleteFailed,
    FinishDelete,
}

impl Transition {
    fn verb(&self) -> &'static str {
        match self {
            Transition::Start { .. } => "start",
            Transition::Pause => "pause",
            Transition::Resume => "resume",
            Transition::Exit(_) => "record the exit of",
            Transition::BeginDelete => "delete",
            Transition::DeleteFailed => "roll back the delete of",
            Transition::FinishDelete => "finish deleting",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} a {from} process")]
pub struct IllegalTransition {
    pub from: Phase,
    pub verb: &'static str,
}

/// One process's phase, pid and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessState {
    phase: Phase,
    pid: u32,
    exit: Option<Exit>,
}

impl Default for ProcessState {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessState {
    pub fn new() -> Self {
        ProcessState {
            phase: Phase::Created,
            pid: 0,
            exit: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Set from the moment the process is Stopped, kept through deletion.
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }

    /// True once the exit is recorded (Stopped, Deleting or Deleted).
    pub fn has_exited(&self) -> bool {
        self.exit.is_some()
    }

    /// Applies `transition`, or refuses it leaving the state unchanged.
    pub fn apply(&mut self, transition: Transition) -> Result<(), IllegalTransition> {
        use Phase::*;
        let next = match (self.phase, transition) {
            (Created, Transition::Start { pid }) => {
                self.pid = pid;
                Running
            }
            (Running, Transition::Pause) => Paused,
            (Paused, Transition::Resume) => Running,
            (Created | Running | Paused, Transition::Exit(exit)) => {
                self.exit = Some(exit);
                Stopped
            }
            (Stopped, Transition::BeginDelete) => Deleting,
            (Deleting, Transition::DeleteFailed) => Stopped,
            (Deleting, Transition::FinishDelete) => Deleted,
            (from, t) => {
                return Err(IllegalTransition {
                    from,
                    verb: t.verb(),
                })
            }
        };
        self.phase = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_after(transitions: &[Transition]) -> Result<ProcessState, IllegalTransition> {
        let mut state = ProcessState::new();
        for t in transitions {
            state.apply(*t)?;
        }
        Ok(state)
    }

    #[test]
    fn a_full_life_keeps_the_exit_through_deletion() {
        let exit = Exit::now(137);
        let mut state = ProcessState::new();
        for (t, phase) in [
            (Transition::Start { pid: 42 }, Phase::Running),
            (Transition::Pause, Phase::Paused),
            (Transition::Resume, Phase::Running),
            (Transition::Exit(exit), Phase::Stopped),
            (Transition::BeginDelete, Phase::Deleting),
            (Transition::FinishDelete, Phase::Deleted),
        ] {
            state.apply(t).unwrap();
            assert_eq!(state.phase(), phase);
        }
        assert_eq!(state.exit(), Some(exit));
        assert_eq!(state.pid(), 42);
    }

    #[test]
    fn a_second_exit_is_refused_and_the_first_kept() {
        let first = Exit::now(0);
        let mut state =
            state_after(&[Transition::Start { pid: 1 }, Transition::Exit(first)]).unwrap();
        let err = state.apply(Transition::Exit(Exit::now(137))).unwrap_err();
        assert_eq!(err.from, Phase::Stopped);
        assert_eq!(state.exit(), Some(first));
    }

    #[test]
    fn a_running_process_cannot_be_deleted() {
        let err =
            state_after(&[Transition::Start { pid: 1 }, Transition::BeginDelete]).unwrap_err();
        assert_eq!(err.to_string(), "cannot delete a running process");
    }

    #[test]
    fn a_failed_delete_returns_to_stopped_and_can_be_retried() {
        let mut state = state_after(&[
            Transition::Exit(Exit::now(1)),
            Transition::BeginDelete,
            Transition::DeleteFailed,
        ])
        .unwrap();
        assert_eq!(state.phase(), Phase::Stopped);
        state.apply(Transition::BeginDelete).unwrap();
        state.apply(Transition::FinishDelete).unwrap();
    }

    #[test]
    fn illegal_transitions_leave_the_state_unchanged() {
        for (before, t) in [
            (vec![], Transition::Pause),
            (vec![], Transition::Resume),
            (
                vec![Transition::Start { pid: 1 }],
                Transition::Start { pid: 2 },
            ),
            (vec![Transition::Start { pid: 1 }], Transition::Resume),
            (
                vec![Transition::Start { pid: 1 }, Transition::Pause],
                Transition::Pause,
            ),
            (
                vec![Transition::Exit(Exit::now(0))],
                Transition::Start { pid: 1 },
            ),
            (vec![Transition::Exit(Exit::now(0))], Transition::Pause),
            (
                vec![Transition::Exit(Exit::now(0))],
                Transition::FinishDelete,
            ),
        ] {
            let mut state = state_after(&before).unwrap();
            let copy = state;
            assert!(state.apply(t).is_err(), "{before:?} then {t:?}");
            assert_eq!(state, copy);
        }
    }
}
