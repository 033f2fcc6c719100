//! The registry of containers and their execs.
//!
//! A container stays here, answering for itself, until its teardown has
//! completed; only then does it become a tombstone that still answers State
//! with its exit, bounded in count and age. Unlike Kata's runtime-rs, which
//! drops a container from its map when delete begins (kata-containers
//! issue 12336), nothing here is ever "not found" while it is being torn
//! down.
//!
//! Locking: the map lock is held only to look up or move entries, never
//! across an await. Each container has its own async `op` lock that
//! serialises lifecycle operations on it (create/start/exec/delete), and
//! each process keeps its state behind a short synchronous lock, so State
//! never waits for a slow teardown, of this container or another.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kestrel_protocols::oci;
use tokio::sync::watch;

use super::state::{Exit, IllegalTransition, Phase, ProcessState, Transition};
use crate::hooks::HostHooks;
use crate::shared_fs::SharedContainer;
use crate::shim::mount::MountedRootfs;
use crate::shim::stdio::ProcessIo;

/// Where a process's standard streams go (containerd's FIFO paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A container's init process or one of its execs, with what it owns: the
/// copiers of its standard streams and, for an exec not yet started, its
/// process spec. They end with the process, never in a side table.
#[derive(Debug)]
pub struct Process {
    /// Empty for a container's init, else the exec id.
    pub exec_id: String,
    pub stdio: Stdio,
    state: Mutex<ProcessState>,
    exited: watch::Sender<Option<Exit>>,
    io: Mutex<Option<ProcessIo>>,
    spec: Mutex<Option<oci::Process>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Process {
    pub fn new(exec_id: impl Into<String>, stdio: Stdio) -> Self {
        Process {
            exec_id: exec_id.into(),
            stdio,
            state: Mutex::new(ProcessState::new()),
            exited: watch::channel(None).0,
            io: Mutex::new(None),
            spec: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcessState> {
        locked(&self.state)
    }

    /// Keeps the copiers of this process's streams until it ends.
    pub fn set_io(&self, io: ProcessIo) {
        *locked(&self.io) = Some(io);
    }

    /// Hands the copiers over (to drain them after the exit).
    pub fn take_io(&self) -> Option<ProcessIo> {
        locked(&self.io).take()
    }

    /// Forwards what stdin holds, then closes it (CloseIO).
    pub fn close_stdin(&self) {
        if let Some(io) = locked(&self.io).as_ref() {
            io.close_stdin();
        }
    }

    /// Keeps an exec's process spec until Start sends it to the agent.
    pub fn set_spec(&self, spec: oci::Process) {
        *locked(&self.spec) = Some(spec);
    }

    /// The exec's process spec, if Exec gave one.
    pub fn spec(&self) -> Option<oci::Process> {
        locked(&self.spec).clone()
    }

    /// A copy of the current state; never waits on an operation.
    pub fn state(&self) -> ProcessState {
        *self.lock()
    }

    /// Applies `transition`; on Exit, wakes every waiter.
    pub fn apply(&self, transition: Transition) -> Result<ProcessState, IllegalTransition> {
        let mut state = self.lock();
        state.apply(transition)?;
        if let Transition::Exit(exit) = transition {
            self.exited.send_replace(Some(exit));
        }
        Ok(*state)
    }

    /// Resolves with the exit once recorded (at once if it already is).
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exited.subscribe();
        let exit = rx.wait_for(Option::is_some).await.map(|exit| *exit);
        // The sender lives as long as `self`, so the wait cannot fail.
        exit.ok().flatten().unwrap_or_else(|| Exit::now(255))
    }
}

/// One container: its init, its execs, the rootfs it mounted on the host
/// and the lock for its operations.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub sandbox_id: String,
    pub init: Arc<Process>,
    /// The OCI hooks the host runs for it (poststart and poststop come
    /// after Create has returned).
    pub hooks: HostHooks,
    execs: Mutex<BTreeMap<String, Arc<Process>>>,
    rootfs: Mutex<Option<MountedRootfs>>,
    /// Its rootfs and volumes bound into a VM's shared directory.
    shared: Mutex<Option<SharedContainer>>,
    /// Serialises create/start/exec/kill/delete on this container only.
    pub op: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("exec {exec_id} already exists in container {container_id}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
}

impl Container {
    pub fn new(id: &str, bundle: PathBuf, sandbox_id: &str, stdio: Stdio) -> Self {
        Container {
            id: id.into(),
            bundle,
            sandbox_id: sandbox_id.into(),
            init: Arc::new(Process::new("", stdio)),
            hooks: HostHooks::default(),
            execs: Mutex::new(BTreeMap::new()),
            rootfs: Mutex::new(None),
            shared: Mutex::new(None),
            op: tokio::sync::Mutex::new(()),
        }
    }

    /// The container with the host-side hooks of its spec.
    pub fn with_hooks(mut self, hooks: HostHooks) -> Self {
        self.hooks = hooks;
        self
    }

    fn execs(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Process>>> {
        locked(&self.execs)
    }

    /// Keeps the mounted rootfs until the teardown lets go of it.
    pub fn set_rootfs(&self, rootfs: MountedRootfs) {
        *locked(&self.rootfs) = Some(rootfs);
    }

    /// Keeps what the container shares with its VM until the teardown
    /// lets go of it.
    pub fn set_shared(&self, shared: SharedContainer) {
        *locked(&self.shared) = Some(shared);
    }

    /// Unmounts what this container mounted on the host: its binds in the
    /// VM's shared directory first (they show the rootfs), then the rootfs.
    pub fn release_rootfs(&self) {
        drop(locked(&self.shared).take());
        drop(locked(&self.rootfs).take());
    }

    /// The init for an empty `exec_id`, else that exec.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(Arc::clone(&self.init));
        }
        self.execs().get(exec_id).cloned()
    }

    pub fn add_exec(&self, exec_id: &str, stdio: Stdio) -> Result<Arc<Process>, RegistryError> {
        let mut execs = self.execs();
        if execs.contains_key(exec_id) {
            return Err(RegistryError::ExecExists {
                container_id: self.id.clone(),
                exec_id: exec_id.into(),
            });
        }
        let process = Arc::new(Process::new(exec_id, stdio));
        execs.insert(exec_id.into(), Arc::clone(&process));
        Ok(process)
    }

    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        self.execs().remove(exec_id)
    }

    pub fn execs_snapshot(&self) -> Vec<Arc<Process>> {
        self.execs().values().cloned().collect()
    }
}

/// What is left of a torn-down container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub id: String,
    pub bundle: PathBuf,
    pub pid: u32,
    pub exit: Exit,
    removed_at: Instant,
}

/// What the registry knows of an id.
#[derive(Debug, Clone)]
pub enum Lookup {
    Live(Arc<Container>),
    Tombstone(Tombstone),
    Unknown,
}

#[derive(Debug, Clone, Copy)]
pub struct TombstoneLimits {
    pub max_entries: usize,
    pub max_age: Duration,
}

impl Default for TombstoneLimits {
    fn default() -> Self {
        TombstoneLimits {
            max_entries: 1024,
            max_age: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<String, Arc<Container>>,
    tombstones: HashMap<String, Tombstone>,
    /// Tombstone ids, oldest first, to expire them in order.
    graveyard: VecDeque<String>,
}

#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    limits: TombstoneLimits,
}

impl Registry {
    pub fn new(limits: TombstoneLimits) -> Self {
        Registry {
            inner: Mutex::default(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a container. A tombstone of the same id is replaced: containerd
    /// may create a new container under a deleted one's id.
    pub fn insert(&self, container: Container) -> Result<Arc<Container>, RegistryError> {
        let mut inner = self.lock();
        if inner.live.contains_key(&container.id) {
            return Err(RegistryError::ContainerExists(container.id));
        }
        if inner.tombstones.remove(&container.id).is_some() {
            inner.graveyard.retain(|id| id != &container.id);
        }
        let container = Arc::new(container);
        inner
            .live
            .insert(container.id.clone(), Arc::clone(&container));
        Ok(container)
    }

    /// Drops a container whose creation failed; it leaves no tombstone.
    pub fn discard(&self, id: &str) {
        self.lock().live.remove(id);
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        let mut inner = self.lock();
        if let Some(container) = inner.live.get(id) {
            return Lookup::Live(Arc::clone(container));
        }
        self.expire(&mut inner, Instant::now());
        match inner.tombstones.get(id) {
            Some(tombstone) => Lookup::Tombstone(tombstone.clone()),
            None => Lookup::Unknown,
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Container>> {
        self.lock().live.get(id).cloned()
    }

    /// Every container not yet torn down.
    pub fn live(&self) -> Vec<Arc<Container>> {
        self.lock().live.values().cloned().collect()
    }

    /// Turns a container whose teardown completed into a tombstone. Its
    /// init must have reached Deleted.
    pub fn bury(&self, id: &str) {
        let mut inner = self.lock();
        let Some(container) = inner.live.remove(id) else {
            return;
        };
        let state = container.init.state();
        debug_assert_eq!(state.phase(), Phase::Deleted);
        let tombstone = Tombstone {
            id: id.into(),
            bundle: container.bundle.clone(),
            pid: state.pid(),
            exit: state.exit().unwrap_or_else(|| Exit::now(255)),
            removed_at: Instant::now(),
        };
        inner.tombstones.insert(id.into(), tombstone);
        inner.graveyard.push_back(id.into());
        self.expire(&mut inner, Instant::now());
    }

    /// Tombstones currently kept.
    pub fn tombstone_count(&self) -> usize {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        inner.tombstones.len()
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some(oldest) = inner.graveyard.front() {
            let too_many = inner.graveyard.len() > self.limits.max_entries;
            let too_old = inner
                .tombstones
                .get(oldest)
                .is_none_or(|t| now.duration_since(t.removed_at) >= self.limits.max_age);
            if !(too_many || too_old) {
                break;
            }
            if let Some(id) = inner.graveyard.pop_front() {
                inner.tombstones.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str) -> Container {
        Container::new(id, PathBuf::from("/b"), id, Stdio::default())
    }

    fn tear_down(registry: &Registry, id: &str, status: u32) {
        let c = registry.get(id).unwrap();
        c.init.apply(Transition::Start { pid: 7 }).unwrap();
        c.init.apply(Transition::Exit(Exit::now(status))).unwrap();
        c.init.apply(Transition::BeginDelete).unwrap();
        c.init.apply(Transition::FinishDelete).unwrap();
        registry.bury(id);
    }

    #[test]
    fn a_container_stays_live_until_buried_then_answers_from_its_tombstone() {
        let registry = Registry::default();
        registry.insert(container("a")).unwrap();
        let c = registry.get("a").unwrap();
        c.init.apply(Transition::Start { pid: 7 }).unwrap();
        c.init.apply(Transition::Exit(Exit::now(137))).unwrap();
        c.init.apply(Transition::BeginDelete).unwrap();
        // Mid-teardown: still live, exit visible.
        match registry.lookup("a") {
            Lookup::Live(c) => assert_eq!(c.init.state().exit().unwrap().status, 137),
            other => panic!("{other:?}"),
        }
        c.init.apply(Transition::FinishDelete).unwrap();
        registry.bury("a");
        match registry.lookup("a") {
            Lookup::Tombstone(t) => assert_eq!((t.exit.status, t.pid), (137, 7)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(registry.lookup("never"), Lookup::Unknown));
    }

    #[test]
    fn a_duplicate_container_is_refused() {
        let registry = Registry::default();
        registry.insert(container("a")).unwrap();
        assert_eq!(
            registry.insert(container("a")).unwrap_err(),
            RegistryError::ContainerExists("a".into())
        );
    }

    #[test]
    fn a_new_container_may_reuse_a_buried_id() {
        let registry = Registry::default();
        registry.insert(container("a")).unwrap();
        tear_down(&registry, "a", 0);
        registry.insert(container("a")).unwrap();
        assert!(matches!(registry.lookup("a"), Lookup::Live(_)));
        assert_eq!(registry.tombstone_count(), 0);
    }

    #[test]
    fn tombstones_are_bounded_in_count_oldest_first() {
        let registry = Registry::new(TombstoneLimits {
            max_entries: 3,
            max_age: Duration::from_secs(60),
        });
        for i in 0..5 {
            let id = format!("c{i}");
            registry.insert(container(&id)).unwrap();
            tear_down(&registry, &id, i);
        }
        assert_eq!(registry.tombstone_count(), 3);
        assert!(matches!(registry.lookup("c0"), Lookup::Unknown));
        assert!(matches!(registry.lookup("c1"), Lookup::Unknown));
        assert!(matches!(registry.lookup("c4"), Lookup::Tombstone(_)));
    }

    #[test]
    fn tombstones_expire_with_age() {
        let registry = Registry::new(TombstoneLimits {
            max_entries: 10,
            max_age: Duration::from_millis(50),
        });
        registry.insert(container("a")).unwrap();
        tear_down(&registry, "a", 0);
        assert!(matches!(registry.lookup("a"), Lookup::Tombstone(_)));
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(registry.lookup("a"), Lookup::Unknown));
    }

    #[test]
    fn discard_leaves_no_tombstone() {
        let registry = Registry::default();
        registry.insert(container("a")).unwrap();
        registry.discard("a");
        assert!(matches!(registry.lookup("a"), Lookup::Unknown));
    }

    #[test]
    fn a_duplicate_exec_is_refused_and_a_removed_one_is_gone() {
        let c = container("a");
        c.add_exec("e1", Stdio::default()).unwrap();
        assert!(matches!(
            c.add_exec("e1", Stdio::default()),
            Err(RegistryError::ExecExists { .. })
        ));
        assert!(c.process("e1").is_some());
        assert!(c.process("").is_some());
        c.remove_exec("e1");
        assert!(c.process("e1").is_none());
    }

    #[tokio::test]
    async fn wait_returns_at_once_for_an_exited_process_and_wakes_on_exit() {
        let p = Arc::new(Process::new("", Stdio::default()));
        let waiter = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.wait().await.status }
        });
        p.apply(Transition::Start { pid: 1 }).unwrap();
        p.apply(Transition::Exit(Exit::now(3))).unwrap();
        assert_eq!(waiter.await.unwrap(), 3);
        assert_eq!(p.wait().await.status, 3);
    }
}
