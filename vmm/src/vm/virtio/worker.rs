//! The device's end of a device thread: what the vsock and net devices
//! share. Each device serves its queues on a thread of its own, started
//! with the device (so a vCPU's activating MMIO write never starts a
//! thread); activation hands the thread what it serves (`S`) and waits for
//! its answer, a reset kills the serving and waits for the queues to come
//! back, and dropping the worker ends the thread.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::ActivateError;
use crate::seccomp::{self, Filter};

pub(crate) struct Worker<S> {
    /// `vsock`, `virtio-net`: for errors.
    device: &'static str,
    /// Activations; dropping it ends the thread.
    activations: Option<Sender<S>>,
    /// One answer per activation (whether it serves) and per kill (it
    /// stopped serving).
    answers: Receiver<io::Result<()>>,
    /// Makes the serving thread give the queues back.
    kill: EventFd,
    thread: Option<JoinHandle<Option<()>>>,
    /// Whether the thread is serving (activated, not reset since).
    active: bool,
}

impl<S> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("device", &self.device)
            .field("active", &self.active)
            .finish()
    }
}

impl<S: Send + 'static> Worker<S> {
    /// Starts the device's thread `thread_name`, confined by `seccomp`,
    /// running `serve` with the activations it is handed and where it
    /// answers each activation and each `kill`.
    pub fn spawn(
        device: &'static str,
        thread_name: &str,
        seccomp: Option<Filter>,
        kill: EventFd,
        serve: impl FnOnce(&Receiver<S>, &Sender<io::Result<()>>) + Send + 'static,
    ) -> Result<Self, seccomp::Error> {
        let (activations, activated) = mpsc::channel();
        let (answer, answers) = mpsc::channel();
        let thread = seccomp::spawn_confined(thread_name, seccomp, move || {
            serve(&activated, &answer);
        })?;
        Ok(Worker {
            device,
            activations: Some(activations),
            answers,
            kill,
            thread: Some(thread),
            active: false,
        })
    }
}

impl<S> Worker<S> {
    /// The thread is gone: it met an error it logged.
    fn gone(&self) -> ActivateError {
        ActivateError::Device(format!("the {} device thread has stopped", self.device))
    }

    /// Checks that the transport handed over `expected` queues, each with
    /// its notification event.
    pub fn check_queues(
        &self,
        expected: usize,
        queues: usize,
        events: usize,
    ) -> Result<(), ActivateError> {
        if queues != expected || events != expected {
            return Err(ActivateError::Device(format!(
                "{} needs {expected} queues, got {queues}",
                self.device
            )));
        }
        Ok(())
    }

    /// Hands `serving` to the thread and waits until it serves.
    pub fn activate(&mut self, serving: S) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::Device(format!(
                "{} device is already active",
                self.device
            )));
        }
        let sent = self.activations.as_ref().map(|a| a.send(serving));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.gone());
        }
        self.answers.recv().map_err(|_| self.gone())??;
        self.active = true;
        Ok(())
    }

    /// Takes the queues back from the thread; false if it is gone.
    pub fn reset(&mut self) -> bool {
        if !self.active {
            return true;
        }
        let _ = self.kill.write(1);
        match self.answers.recv() {
            Ok(Ok(())) => {
                self.active = false;
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "resetting the {} device", self.device);
                false
            }
            Err(_) => false,
        }
    }
}

impl<S> Drop for Worker<S> {
    fn drop(&mut self) {
        self.reset();
        drop(self.activations.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for `epoll`'s next events into `events`, through signals that
/// interrupt the wait: what every device thread's loop blocks on.
pub(crate) fn wait(
    epoll: &vmm_sys_util::epoll::Epoll,
    events: &mut [vmm_sys_util::epoll::EpollEvent],
) -> io::Result<usize> {
    loop {
        match epoll.wait(-1, events) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            waited => return waited,
        }
    }
}
