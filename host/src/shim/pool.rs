//! The shim's sandboxes, by id: booted on first use, shared by the
//! containers of a pod, stopped when the last one is gone.
//!
//! The map's lock is never held across a VM boot or stop, which take
//! seconds: the first container to ask for a sandbox reserves its slot as
//! `Starting` and boots it unlocked, later ones wait on that slot; a stop
//! marks the slot `Stopping`, and a container that arrives meanwhile waits
//! for the stop to finish and then boots a fresh sandbox. So State, Kill or
//! a create in another pod never wait behind someone else's boot.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::error::ShimError;
use super::relist_view::AgentView;
use crate::lifecycle::relist::Relister;
use crate::sandbox::Sandbox;

/// What the pool keeps per sandbox: something that can die and be stopped.
#[async_trait::async_trait]
pub trait Pooled: Send + Sync {
    fn is_dead(&self) -> bool;
    async fn stop(&self, id: &str);
}

/// A running sandbox and the tasks that watch it; they end with it.
pub struct Running {
    pub sandbox: Arc<Sandbox>,
    pub relister: Arc<Relister<AgentView>>,
    watchers: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn new(
        sandbox: Arc<Sandbox>,
        relister: Arc<Relister<AgentView>>,
        watchers: Vec<JoinHandle<()>>,
    ) -> Running {
        Running {
            sandbox,
            relister,
            watchers,
        }
    }
}

#[async_trait::async_trait]
impl Pooled for Running {
    fn is_dead(&self) -> bool {
        self.sandbox.is_dead()
    }

    async fn stop(&self, id: &str) {
        if let Err(e) = self.sandbox.stop().await {
            tracing::warn!(
                sandbox_id = id,
                error = crate::error_chain(&e),
                "stopping a sandbox"
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

/// How a boot ended, for those who waited on it: the error as text, since
/// only the booting caller gets the typed one.
type Booted<T> = Option<Result<Arc<T>, String>>;

enum Slot<T> {
    Starting(watch::Receiver<Booted<T>>),
    Running(Arc<T>),
    Stopping(watch::Receiver<bool>),
}

pub struct SandboxPool<T = Running> {
    slots: Mutex<HashMap<String, Slot<T>>>,
}

impl<T> Default for SandboxPool<T> {
    fn default() -> Self {
        SandboxPool {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

/// What to do after looking at a slot with the lock held.
enum Next<T> {
    Boot(watch::Sender<Booted<T>>),
    WaitBoot(watch::Receiver<Booted<T>>),
    WaitStop(watch::Receiver<bool>),
}

impl<T: Pooled> SandboxPool<T> {
    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot<T>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running sandbox `id`; `None` while it boots, stops or is absent.
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        match self.slots().get(id) {
            Some(Slot::Running(running)) => Some(Arc::clone(running)),
            _ => None,
        }
    }

    /// The sandbox `id`, booted with `boot` if nobody has yet. A sandbox
    /// that died stays dead: its containers are stopped, and a new one is
    /// booted only once they are gone.
    pub async fn get_or_start<F, Fut>(&self, id: &str, boot: F) -> Result<Arc<T>, ShimError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ShimError>>,
    {
        let mut boot = Some(boot);
        loop {
            let next = {
                let mut slots = self.slots();
                match slots.get(id) {
                    Some(Slot::Running(running)) if running.is_dead() => {
                        return Err(ShimError::SandboxDead { id: id.into() })
                    }
                    Some(Slot::Running(running)) => return Ok(Arc::clone(running)),
                    Some(Slot::Starting(rx)) => Next::WaitBoot(rx.clone()),
                    Some(Slot::Stopping(rx)) => Next::WaitStop(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        slots.insert(id.into(), Slot::Starting(rx));
                        Next::Boot(tx)
                    }
                }
            };
            match next {
                Next::Boot(tx) => {
                    // This arm returns, so the boot runs at most once.
                    let boot = boot.take().expect("one boot per call");
                    let booted = boot().await.map(Arc::new);
                    let mut slots = self.slots();
                    match &booted {
                        Ok(running) => {
                            slots.insert(id.into(), Slot::Running(Arc::clone(running)));
                        }
                        Err(_) => {
                            slots.remove(id);
                        }
                    }
                    drop(slots);
                    tx.send_replace(Some(
                        booted.as_ref().map(Arc::clone).map_err(ShimError::chain),
                    ));
                    return booted;
                }
                Next::WaitBoot(mut rx) => {
                    let outcome = rx.wait_for(Option::is_some).await.map(|b| b.clone());
                    match outcome {
                        Ok(Some(Ok(running))) => return Ok(running),
                        Ok(Some(Err(message))) => {
                            return Err(ShimError::SandboxStartFailed {
                                id: id.into(),
                                message,
                            })
                        }
                        // The booting caller went away mid-boot: try again.
                        _ => continue,
                    }
                }
                Next::WaitStop(mut rx) => {
                    let _ = rx.wait_for(|stopped| *stopped).await;
                }
            }
        }
    }

    /// Stops the sandbox `id` if `unused()` still holds once its slot is
    /// claimed for the stop.
    pub async fn stop_if(&self, id: &str, unused: impl Fn() -> bool) {
        let (running, tx) = {
            let mut slots = self.slots();
            if !matches!(slots.get(id), Some(Slot::Running(_))) || !unused() {
                return;
            }
            let (tx, rx) = watch::channel(false);
            let Some(Slot::Running(running)) = slots.insert(id.into(), Slot::Stopping(rx)) else {
                unreachable!("the slot was Running under the same lock");
            };
            (running, tx)
        };
        running.stop(id).await;
        self.slots().remove(id);
        tx.send_replace(true);
    }

    /// Stops every running sandbox (the shim is exiting).
    pub async fn stop_all(&self) {
        let running: Vec<(String, Arc<T>)> = {
            let mut slots = self.slots();
            let ids: Vec<String> = slots
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Running(_)))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| match slots.remove(&id) {
                    Some(Slot::Running(running)) => Some((id, running)),
                    _ => None,
                })
                .collect()
        };
        for (id, running) in running {
            running.stop(&id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::Notify;

    #[derive(Default)]
    struct Fake {
        dead: AtomicBool,
        stops: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Pooled for Fake {
        fn is_dead(&self) -> bool {
            self.dead.load(Ordering::SeqCst)
        }
        async fn stop(&self, _: &str) {
            self.stops.fetch_add(1, Ordering::SeqCst);
        }
    }

    const PROMPT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_slow_boot_blocks_neither_other_sandboxes_nor_lookups() {
        let pool = Arc::new(SandboxPool::<Fake>::default());
        let release = Arc::new(Notify::new());
        let slow = {
            let (pool, release) = (Arc::clone(&pool), Arc::clone(&release));
            tokio::spawn(async move {
                pool.get_or_start("slow", || async move {
                    release.notified().await;
                    Ok(Fake::default())
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        // Another sandbox boots and is found while "slow" is still booting.
        let fast = tokio::time::timeout(
            PROMPT,
            pool.get_or_start("fast", || async { Ok(Fake::default()) }),
        )
        .await
        .expect("a boot of another sandbox waited behind a slow one")
        .unwrap();
        assert!(Arc::ptr_eq(&fast, &pool.get("fast").unwrap()));
        assert!(
            pool.get("slow").is_none(),
            "a booting sandbox is not running yet"
        );

        // A second container of the slow pod waits for the same boot.
        let second = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                pool.get_or_start("slow", || async { panic!("booted twice") })
                    .await
            })
        };
        tokio::task::yield_now().await;
        release.notify_one();
        let first = slow.await.unwrap().unwrap();
        let second = second.await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[tokio::test]
    async fn a_failed_boot_fails_its_waiters_and_frees_the_slot() {
        let pool = Arc::new(SandboxPool::<Fake>::default());
        let release = Arc::new(Notify::new());
        let first = {
            let (pool, release) = (Arc::clone(&pool), Arc::clone(&release));
            tokio::spawn(async move {
                pool.get_or_start("p", || async move {
                    release.notified().await;
                    Err(ShimError::Internal("no kernel".into()))
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                pool.get_or_start("p", || async { panic!("booted twice") })
                    .await
            })
        };
        tokio::task::yield_now().await;
        release.notify_one();
        assert!(matches!(first.await.unwrap(), Err(ShimError::Internal(_))));
        let err = waiter
            .await
            .unwrap()
            .err()
            .expect("the waiter must fail too");
        assert!(err.to_string().contains("no kernel"), "{err}");
        pool.get_or_start("p", || async { Ok(Fake::default()) })
            .await
            .expect("a later boot may try again");
    }

    #[tokio::test]
    async fn a_dead_sandbox_is_refused_and_an_unused_one_is_stopped_once() {
        let pool = SandboxPool::<Fake>::default();
        let fake = pool
            .get_or_start("p", || async { Ok(Fake::default()) })
            .await
            .unwrap();
        pool.stop_if("p", || false).await;
        assert_eq!(
            fake.stops.load(Ordering::SeqCst),
            0,
            "a used sandbox was stopped"
        );
        fake.dead.store(true, Ordering::SeqCst);
        assert!(matches!(
            pool.get_or_start("p", || async { Ok(Fake::default()) })
                .await,
            Err(ShimError::SandboxDead { .. })
        ));
        pool.stop_if("p", || true).await;
        pool.stop_if("p", || true).await;
        assert_eq!(fake.stops.load(Ordering::SeqCst), 1);
        assert!(pool.get("p").is_none());
    }
}
