//! The relister: a pod-lifecycle-event generator after Kubernetes' generic
//! PLEG (`pkg/kubelet/pleg/generic.go`).
//!
//! On every period it lists the sandbox's containers, compares each one's
//! state with the state seen on the previous successful relist, and reports
//! each death it sees as a [`LifecycleEvent`]: the one event the runtime
//! acts on, to record an exit its WaitProcess watcher missed. A container is
//! inspected whenever its state changes, so [`Relister::record`] keeps its
//! last known pid, exit status and IPs, also after it died. When an
//! inspection fails the death is held back and the container's old state is
//! kept, so the same transition is seen, and reported, on a later relist
//! instead of being lost.
//!
//! WaitProcess alone is not enough: an answer can be lost when the vsock
//! connection breaks, while a relist always converges on what the sandbox
//! really holds. The relister also doubles as a liveness probe for the agent
//! ([`Relister::healthy`]), since a wedged agent makes relists fail or hang.
//!
//! Unlike Kubernetes' PLEG, it can only list the containers the runtime
//! placed in the sandbox: the Kata agent API has no call that lists a
//! guest's containers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// What the sandbox reports for one container when listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObservedState {
    Created,
    Running,
    Exited,
}

/// One container as listed by the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub state: ObservedState,
}

/// What a detailed inspection of one container returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    pub pid: Option<u32>,
    pub exit_status: Option<u32>,
    pub ips: Vec<String>,
}

/// Why the sandbox could not answer a list or an inspection.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ViewError(pub String);

/// The sandbox as the relister sees it (the real one asks the agent; tests
/// use a fake).
#[async_trait::async_trait]
pub trait SandboxView: Send + Sync {
    /// Every container the sandbox holds, with its current state.
    async fn list(&self) -> Result<Vec<Listed>, ViewError>;
    /// The details of one listed container.
    async fn inspect(&self, id: &str) -> Result<Inspection, ViewError>;
}

/// Events in the order they were observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// The container exited (with the agent's exit status), or vanished
    /// from the sandbox while it ran (no status).
    ContainerDied {
        id: String,
        exit_status: Option<u32>,
    },
}

/// The last known properties of a container, kept after it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub state: ObservedState,
    pub pid: Option<u32>,
    pub exit_status: Option<u32>,
    pub ips: Vec<String>,
}

impl Record {
    /// A container seen in the listing but not (successfully) inspected yet.
    fn without_properties(state: ObservedState) -> Self {
        Self {
            state,
            pid: None,
            exit_status: None,
            ips: Vec::new(),
        }
    }
}

/// How often to relist, and how old the last successful relist may grow
/// before the relister reports itself unhealthy.
#[derive(Debug, Clone, Copy)]
pub struct RelistConfig {
    pub period: Duration,
    pub unhealthy_after: Duration,
}

impl Default for RelistConfig {
    /// Kubernetes' values: the threshold must exceed a period plus the time a
    /// slow relist takes, or health would flap under load.
    fn default() -> Self {
        Self {
            period: Duration::from_secs(1),
            unhealthy_after: Duration::from_secs(3 * 60),
        }
    }
}

/// Why [`Relister::healthy`] reports the relister unhealthy.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Unhealthy {
    #[error("relister never completed a relist")]
    NeverRelisted,
    #[error("relister was last active {age:?} ago; threshold is {threshold:?}")]
    Stale { age: Duration, threshold: Duration },
}

/// The one rule for the relister's health: the first relist may still be
/// under way (agent start-up) and gets the same grace as any other; after
/// that the last successful relist must be younger than `threshold`.
fn verdict(
    since_start: Duration,
    since_relist: Option<Duration>,
    threshold: Duration,
) -> Result<(), Unhealthy> {
    match since_relist {
        None if since_start > threshold => Err(Unhealthy::NeverRelisted),
        None => Ok(()),
        Some(age) if age > threshold => Err(Unhealthy::Stale { age, threshold }),
        Some(_) => Ok(()),
    }
}

/// The file in a sandbox's state directory where the shim keeps its
/// relister's [`HealthReport`] for `kestrel ps` and `kestrel doctor`.
pub const HEALTH_FILE: &str = "relist-health.json";

/// A relister's health as another process can judge it: written by the shim
/// every period, so a shim that hangs or dies leaves a report that turns
/// stale by itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthReport {
    pub started_unix_ms: u64,
    pub last_relist_unix_ms: Option<u64>,
    pub unhealthy_after_ms: u64,
}

impl HealthReport {
    /// The relister's health at `now`.
    pub fn verdict(&self, now: SystemTime) -> Result<(), Unhealthy> {
        let now = unix_ms(now);
        let since = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        verdict(
            since(self.started_unix_ms),
            self.last_relist_unix_ms.map(since),
            Duration::from_millis(self.unhealthy_after_ms),
        )
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What a container going from `old` to `new` calls for, where `None`
/// means the container is not in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Only the baseline moves.
    Nothing,
    /// Inspect it, to keep its properties (a container that started).
    Inspect,
    /// Inspect it if it is still there, then report its death.
    Died,
}

fn transition(old: Option<ObservedState>, new: Option<ObservedState>) -> Step {
    if old == new {
        return Step::Nothing;
    }
    match new {
        Some(ObservedState::Exited) => Step::Died,
        Some(ObservedState::Running) => Step::Inspect,
        // Nothing has happened to a created container that anyone waits on.
        Some(ObservedState::Created) => Step::Nothing,
        // A container can exit and be removed between two relists; its death
        // must still be reported.
        None if old == Some(ObservedState::Running) => Step::Died,
        None => Step::Nothing,
    }
}

/// The record after a successful inspection of a container now in `state`.
///
/// A container that is not running has usually lost its pid and network
/// namespace, so the sandbox reports neither any more; like Kubernetes for a
/// dead pod's IPs, keep the last known values rather than forget them.
fn merge(previous: Option<&Record>, state: ObservedState, inspection: Inspection) -> Record {
    match previous {
        Some(previous) if state != ObservedState::Running => Record {
            state,
            pid: inspection.pid.or(previous.pid),
            exit_status: inspection.exit_status.or(previous.exit_status),
            ips: if inspection.ips.is_empty() {
                previous.ips.clone()
            } else {
                inspection.ips
            },
        },
        _ => Record {
            state,
            pid: inspection.pid,
            exit_status: inspection.exit_status,
            ips: inspection.ips,
        },
    }
}

/// The listing in its order, each container once: the agent's answer is
/// outside input, and a container listed twice must not be compared twice.
fn dedup_listing(listed: Vec<Listed>) -> Vec<(String, ObservedState)> {
    let mut seen = HashSet::new();
    let mut current = Vec::with_capacity(listed.len());
    for Listed { id, state } in listed {
        if seen.insert(id.clone()) {
            current.push((id, state));
        } else {
            warn!(container_id = %id, "sandbox listed a container twice; keeping the first entry");
        }
    }
    current
}

/// A container whose state changed in this relist, to inspect and perhaps
/// report.
struct Change {
    id: String,
    new: Option<ObservedState>,
    died: bool,
}

#[derive(Default)]
struct State {
    /// Each container's state as of the last relist that delivered its
    /// events; the baseline the next listing is compared with.
    observed: HashMap<String, ObservedState>,
    records: HashMap<String, Record>,
    /// Containers whose last inspection failed.
    reinspect: HashSet<String>,
    last_relist: Option<Instant>,
}

impl State {
    fn set_record_state(&mut self, id: &str, state: ObservedState) {
        self.records
            .entry(id.to_owned())
            .and_modify(|record| record.state = state)
            .or_insert_with(|| Record::without_properties(state));
    }

    /// A container left the listing: it cannot be inspected any more, and
    /// its record keeps everything the sandbox last told about it.
    fn unlist(&mut self, id: &str) -> Record {
        self.observed.remove(id);
        self.reinspect.remove(id);
        let record = self
            .records
            .entry(id.to_owned())
            .or_insert_with(|| Record::without_properties(ObservedState::Exited));
        if record.state == ObservedState::Running {
            record.state = ObservedState::Exited;
        }
        record.clone()
    }
}

type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// Generates [`LifecycleEvent`]s by periodically relisting a sandbox.
pub struct Relister<V: SandboxView> {
    view: V,
    config: RelistConfig,
    events: UnboundedSender<LifecycleEvent>,
    clock: Clock,
    started: Instant,
    /// Serialises passes: two interleaved passes would compare against the
    /// same baseline and report the same transition twice.
    pass: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

impl<V: SandboxView + 'static> Relister<V> {
    /// A relister over `view` that sends its events to `events`.
    pub fn new(view: V, config: RelistConfig, events: UnboundedSender<LifecycleEvent>) -> Self {
        Self::with_clock(view, config, events, Box::new(Instant::now))
    }

    fn with_clock(
        view: V,
        config: RelistConfig,
        events: UnboundedSender<LifecycleEvent>,
        clock: Clock,
    ) -> Self {
        let started = clock();
        Self {
            view,
            config,
            events,
            clock,
            started,
            pass: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
        }
    }

    /// One relist pass. Err when list() failed (then the relist time is not
    /// advanced).
    pub async fn relist(&self) -> Result<(), ViewError> {
        let _pass = self.pass.lock().await;
        // Taken before listing, as Kubernetes does, so a list that hangs
        // counts against health for as long as it hangs.
        let timestamp = (self.clock)();
        let listed = self.view.list().await?;
        let current = dedup_listing(listed);
        let (changes, reinspect) = self.plan(timestamp, &current);
        for change in changes {
            self.deliver(change).await;
        }
        for (id, state) in reinspect {
            self.reinspect(&id, state).await;
        }
        Ok(())
    }

    /// Records the relist time, advances the containers whose transition
    /// emits nothing and returns the changes that need delivering plus the
    /// containers to reinspect at the end of the pass.
    fn plan(
        &self,
        timestamp: Instant,
        current: &[(String, ObservedState)],
    ) -> (Vec<Change>, Vec<(String, ObservedState)>) {
        let mut state = self.lock_state();
        state.last_relist = Some(timestamp);

        let mut changes = Vec::new();
        for (id, new) in current {
            let old = state.observed.get(id).copied();
            match transition(old, Some(*new)) {
                Step::Nothing if old != Some(*new) => {
                    state.observed.insert(id.clone(), *new);
                    state.set_record_state(id, *new);
                }
                Step::Nothing => {}
                step => changes.push(Change {
                    id: id.clone(),
                    new: Some(*new),
                    died: step == Step::Died,
                }),
            }
        }

        let listed: HashSet<&str> = current.iter().map(|(id, _)| id.as_str()).collect();
        let mut gone: Vec<(&String, ObservedState)> = state
            .observed
            .iter()
            .filter(|(id, _)| !listed.contains(id.as_str()))
            .map(|(id, old)| (id, *old))
            .collect();
        // Sorted so that the order of events does not depend on hashing.
        gone.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let (died, unlisted): (Vec<_>, Vec<_>) = gone
            .into_iter()
            .map(|(id, old)| (id.clone(), transition(Some(old), None)))
            .partition(|(_, step)| *step == Step::Died);
        for (id, _) in unlisted {
            state.unlist(&id);
        }
        changes.extend(died.into_iter().map(|(id, _)| Change {
            id,
            new: None,
            died: true,
        }));

        let changed: HashSet<&str> = changes.iter().map(|change| change.id.as_str()).collect();
        let reinspect = current
            .iter()
            .filter(|(id, _)| state.reinspect.contains(id) && !changed.contains(id.as_str()))
            .cloned()
            .collect();
        // A container that vanished before its events were ever delivered has
        // nothing left to inspect.
        state
            .reinspect
            .retain(|id| changed.contains(id.as_str()) || listed.contains(id.as_str()));
        (changes, reinspect)
    }

    /// Inspects a changed container and reports its death, or holds both
    /// back for the next relist when the inspection fails.
    async fn deliver(&self, change: Change) {
        let Change { id, new, died } = change;
        let record = match new {
            None => self.lock_state().unlist(&id),
            Some(new) => match self.view.inspect(&id).await {
                Ok(inspection) => {
                    let mut state = self.lock_state();
                    let record = merge(state.records.get(&id), new, inspection);
                    state.records.insert(id.clone(), record.clone());
                    state.observed.insert(id.clone(), new);
                    state.reinspect.remove(&id);
                    record
                }
                Err(error) => {
                    warn!(
                        container_id = %id,
                        %error,
                        "inspection failed; holding back the container's events until a later relist"
                    );
                    self.lock_state().reinspect.insert(id);
                    return;
                }
            },
        };
        // The record is stored before the event goes out so that a consumer
        // reacting to it reads the properties it announces.
        if died {
            let event = LifecycleEvent::ContainerDied {
                id: id.clone(),
                exit_status: record.exit_status,
            };
            debug!(container_id = %id, ?event, "lifecycle event");
            // A dropped receiver only means nobody listens any more; the pass
            // still keeps the records current and spawn() notices and stops.
            let _ = self.events.send(event);
        }
    }

    /// Refreshes the record of a container whose previous inspection failed
    /// although its state did not change since.
    async fn reinspect(&self, id: &str, listed_state: ObservedState) {
        match self.view.inspect(id).await {
            Ok(inspection) => {
                let mut state = self.lock_state();
                let record = merge(state.records.get(id), listed_state, inspection);
                state.records.insert(id.to_owned(), record);
                state.reinspect.remove(id);
            }
            Err(error) => {
                warn!(container_id = %id, %error, "reinspection failed; trying again next relist");
            }
        }
    }

    /// Ok when the last successful relist is younger than `unhealthy_after`.
    pub fn healthy(&self) -> Result<(), Unhealthy> {
        let now = (self.clock)();
        let last = self.lock_state().last_relist;
        verdict(
            now.saturating_duration_since(self.started),
            last.map(|at| now.saturating_duration_since(at)),
            self.config.unhealthy_after,
        )
    }

    /// What the relister's health rests on, in wall-clock time, for
    /// another process to judge with [`HealthReport::verdict`].
    pub fn health_report(&self) -> HealthReport {
        let now = (self.clock)();
        let wall = SystemTime::now();
        let ago = |at: Instant| unix_ms(wall - now.saturating_duration_since(at));
        HealthReport {
            started_unix_ms: ago(self.started),
            last_relist_unix_ms: self.lock_state().last_relist.map(ago),
            unhealthy_after_ms: self.config.unhealthy_after.as_millis() as u64,
        }
    }

    /// Last known properties of a container (also after it died or was
    /// removed, until forget()).
    pub fn record(&self, id: &str) -> Option<Record> {
        self.lock_state().records.get(id).cloned()
    }

    /// Drops what is kept about a container (the registry calls it when the
    /// tombstone expires).
    ///
    /// The baseline state stays: were a still-listed container forgotten,
    /// dropping it would make the next relist report its start again.
    pub fn forget(&self, id: &str) {
        let mut state = self.lock_state();
        state.records.remove(id);
        state.reinspect.remove(id);
    }

    /// Runs relist() every `period` until the returned handle is aborted or
    /// the event receiver is dropped; a failed relist is logged and retried
    /// next period.
    pub fn spawn(self: Arc<Self>) -> JoinHandle<()> {
        tokio::spawn(async move {
            while !self.events.is_closed() {
                if let Err(error) = self.relist().await {
                    warn!(%error, "relist failed; retrying next period");
                }
                // Sleeping after the pass rather than ticking on a fixed
                // schedule keeps a slow relist from being followed at once by
                // the next one.
                tokio::select! {
                    () = self.events.closed() => break,
                    () = tokio::time::sleep(self.config.period) => {}
                }
            }
            debug!("event receiver dropped; relister stops");
        })
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, and the state stays
        // consistent between statements, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{self, UnboundedReceiver};

    /// What the fake sandbox answers; tests change it between relists.
    #[derive(Default)]
    struct Script {
        listed: Vec<Listed>,
        inspections: HashMap<String, Inspection>,
        fail_list: bool,
        fail_inspect: HashSet<String>,
        lists: usize,
        inspected: Vec<String>,
    }

    #[derive(Clone, Default)]
    struct FakeSandbox(Arc<Mutex<Script>>);

    impl FakeSandbox {
        fn script(&self) -> MutexGuard<'_, Script> {
            self.0.lock().unwrap()
        }

        fn list_as(&self, containers: &[(&str, ObservedState)]) {
            self.script().listed = containers
                .iter()
                .map(|(id, state)| Listed {
                    id: (*id).to_owned(),
                    state: *state,
                })
                .collect();
        }

        fn inspect_as(&self, id: &str, inspection: Inspection) {
            self.script().inspections.insert(id.to_owned(), inspection);
        }

        fn fail_list(&self, fail: bool) {
            self.script().fail_list = fail;
        }

        fn fail_inspect(&self, id: &str, fail: bool) {
            let mut script = self.script();
            if fail {
                script.fail_inspect.insert(id.to_owned());
            } else {
                script.fail_inspect.remove(id);
            }
        }

        fn inspected(&self) -> Vec<String> {
            std::mem::take(&mut self.script().inspected)
        }

        fn lists(&self) -> usize {
            self.script().lists
        }
    }

    #[async_trait::async_trait]
    impl SandboxView for FakeSandbox {
        async fn list(&self) -> Result<Vec<Listed>, ViewError> {
            let mut script = self.script();
            script.lists += 1;
            if script.fail_list {
                return Err(ViewError("agent unreachable".to_owned()));
            }
            Ok(script.listed.clone())
        }

        async fn inspect(&self, id: &str) -> Result<Inspection, ViewError> {
            let mut script = self.script();
            script.inspected.push(id.to_owned());
            if script.fail_inspect.contains(id) {
                return Err(ViewError(format!("cannot inspect {id}")));
            }
            Ok(script.inspections.get(id).cloned().unwrap_or_default())
        }
    }

    /// A clock that only moves when told to.
    #[derive(Clone)]
    struct FakeClock(Arc<Mutex<Instant>>);

    impl FakeClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(Instant::now())))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    use ObservedState::{Created, Exited, Running};

    const THRESHOLD: Duration = Duration::from_secs(180);

    fn relister(fake: &FakeSandbox) -> (Relister<FakeSandbox>, UnboundedReceiver<LifecycleEvent>) {
        relister_with_clock(fake, &FakeClock::new())
    }

    fn relister_with_clock(
        fake: &FakeSandbox,
        clock: &FakeClock,
    ) -> (Relister<FakeSandbox>, UnboundedReceiver<LifecycleEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let config = RelistConfig {
            period: Duration::from_millis(10),
            unhealthy_after: THRESHOLD,
        };
        let clock = clock.clone();
        let now = Box::new(move || *clock.0.lock().unwrap());
        (Relister::with_clock(fake.clone(), config, tx, now), rx)
    }

    fn drain(rx: &mut UnboundedReceiver<LifecycleEvent>) -> Vec<LifecycleEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn died(id: &str, exit_status: Option<u32>) -> LifecycleEvent {
        LifecycleEvent::ContainerDied {
            id: id.to_owned(),
            exit_status,
        }
    }

    #[tokio::test]
    async fn relisting_reports_each_death_once_and_inspects_each_start() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);

        fake.list_as(&[("c1", Exited), ("c2", Running), ("c4", Created)]);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), [died("c1", None)]);
        assert_eq!(fake.inspected(), ["c1", "c2"]);

        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);
        assert_eq!(fake.inspected(), Vec::<String>::new());

        fake.list_as(&[
            ("c2", Exited),
            ("c3", Running),
            ("c4", Running),
            ("c5", Running),
        ]);
        relister.relist().await.unwrap();
        // c1 left the listing dead: nothing more to report about it.
        assert_eq!(drain(&mut rx), [died("c2", None)]);
        assert_eq!(fake.inspected(), ["c2", "c3", "c4", "c5"]);
        assert_eq!(relister.record("c1").unwrap().state, Exited);
    }

    #[tokio::test]
    async fn running_container_that_vanishes_is_reported_died() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Running)]);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);

        fake.list_as(&[]);
        relister.relist().await.unwrap();

        assert_eq!(drain(&mut rx), [died("c1", None)]);
        assert_eq!(relister.record("c1").unwrap().state, Exited);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);
    }

    #[tokio::test]
    async fn failed_inspection_holds_back_events_until_inspection_succeeds() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Running), ("c2", Running)]);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);

        fake.list_as(&[("c1", Exited), ("c2", Exited)]);
        fake.inspect_as(
            "c1",
            Inspection {
                exit_status: Some(1),
                ..Inspection::default()
            },
        );
        fake.inspect_as(
            "c2",
            Inspection {
                exit_status: Some(2),
                ..Inspection::default()
            },
        );
        fake.fail_inspect("c1", true);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), [died("c2", Some(2))]);
        assert_eq!(relister.record("c1").unwrap().state, Running);

        fake.fail_inspect("c1", false);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), [died("c1", Some(1))]);
        assert_eq!(relister.record("c1").unwrap().exit_status, Some(1));
    }

    #[tokio::test]
    async fn container_needing_reinspection_without_new_events_is_reinspected_once() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Running)]);
        fake.inspect_as(
            "c1",
            Inspection {
                pid: Some(10),
                ..Inspection::default()
            },
        );
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);

        fake.list_as(&[("c1", Exited)]);
        fake.fail_inspect("c1", true);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);

        // Back to the state last delivered: no event, but the failed
        // inspection is still owed.
        fake.list_as(&[("c1", Running)]);
        fake.fail_inspect("c1", false);
        fake.inspect_as(
            "c1",
            Inspection {
                pid: Some(11),
                ..Inspection::default()
            },
        );
        fake.inspected();
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);
        assert_eq!(fake.inspected(), ["c1"]);
        assert_eq!(relister.record("c1").unwrap().pid, Some(11));

        relister.relist().await.unwrap();
        assert_eq!(fake.inspected(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn the_health_report_judges_like_the_relister_itself() {
        let fake = FakeSandbox::default();
        let clock = FakeClock::new();
        let (relister, _rx) = relister_with_clock(&fake, &clock);
        assert_eq!(relister.health_report().verdict(SystemTime::now()), Ok(()));
        relister.relist().await.unwrap();
        clock.advance(THRESHOLD + Duration::from_secs(1));
        let report = relister.health_report();
        assert!(relister.healthy().is_err());
        // The report was taken "now" on the relister's clock; judged a
        // moment later on the wall clock, it is just as stale.
        assert!(matches!(
            report.verdict(SystemTime::now()),
            Err(Unhealthy::Stale { .. })
        ));
        let json = serde_json::to_string(&report).unwrap();
        let back: HealthReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
    }

    #[tokio::test]
    async fn relister_is_healthy_right_after_a_relist() {
        let fake = FakeSandbox::default();
        let clock = FakeClock::new();
        let (relister, _rx) = relister_with_clock(&fake, &clock);
        clock.advance(THRESHOLD * 2);

        relister.relist().await.unwrap();

        assert_eq!(relister.healthy(), Ok(()));
    }

    #[tokio::test]
    async fn relister_turns_stale_when_list_keeps_failing() {
        let fake = FakeSandbox::default();
        let clock = FakeClock::new();
        let (relister, _rx) = relister_with_clock(&fake, &clock);
        relister.relist().await.unwrap();
        fake.fail_list(true);

        clock.advance(THRESHOLD);
        assert!(relister.relist().await.is_err());
        assert_eq!(relister.healthy(), Ok(()));

        clock.advance(Duration::from_secs(1));
        assert!(relister.relist().await.is_err());
        assert_eq!(
            relister.healthy(),
            Err(Unhealthy::Stale {
                age: THRESHOLD + Duration::from_secs(1),
                threshold: THRESHOLD,
            })
        );

        fake.fail_list(false);
        relister.relist().await.unwrap();
        assert_eq!(relister.healthy(), Ok(()));
    }

    #[tokio::test]
    async fn relister_that_never_relisted_is_unhealthy_only_after_the_threshold() {
        let fake = FakeSandbox::default();
        let clock = FakeClock::new();
        let (relister, _rx) = relister_with_clock(&fake, &clock);
        fake.fail_list(true);
        assert!(relister.relist().await.is_err());

        clock.advance(THRESHOLD);
        assert_eq!(relister.healthy(), Ok(()));

        clock.advance(Duration::from_secs(1));
        assert_eq!(relister.healthy(), Err(Unhealthy::NeverRelisted));
    }

    #[tokio::test]
    async fn dead_container_keeps_its_last_pid_exit_status_and_ips() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        let ips = vec!["10.88.0.5/16".to_owned(), "fd00::5".to_owned()];
        fake.list_as(&[("c1", Running)]);
        fake.inspect_as(
            "c1",
            Inspection {
                pid: Some(4242),
                exit_status: None,
                ips: ips.clone(),
            },
        );
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);

        // A dead container has no pid or network namespace left to report.
        fake.list_as(&[("c1", Exited)]);
        fake.inspect_as(
            "c1",
            Inspection {
                exit_status: Some(137),
                ..Inspection::default()
            },
        );
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), [died("c1", Some(137))]);
        let dead = Record {
            state: Exited,
            pid: Some(4242),
            exit_status: Some(137),
            ips,
        };
        assert_eq!(relister.record("c1"), Some(dead.clone()));

        fake.list_as(&[]);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);
        assert_eq!(relister.record("c1"), Some(dead));
    }

    #[tokio::test]
    async fn running_container_record_follows_a_changed_ip() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Created)]);
        relister.relist().await.unwrap();
        assert_eq!(relister.record("c1").unwrap().state, Created);

        fake.list_as(&[("c1", Running)]);
        fake.inspect_as(
            "c1",
            Inspection {
                pid: Some(7),
                exit_status: None,
                ips: vec!["10.88.0.9/16".to_owned()],
            },
        );
        relister.relist().await.unwrap();

        assert_eq!(drain(&mut rx), []);
        assert_eq!(relister.record("c1").unwrap().ips, ["10.88.0.9/16"]);
    }

    #[tokio::test]
    async fn forget_drops_the_record_of_a_removed_container() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Exited)]);
        relister.relist().await.unwrap();
        fake.list_as(&[]);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), [died("c1", None)]);
        assert!(relister.record("c1").is_some());

        relister.forget("c1");

        assert_eq!(relister.record("c1"), None);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);
    }

    #[tokio::test]
    async fn failed_list_returns_err_emits_nothing_and_keeps_the_baseline() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Running)]);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), []);

        fake.list_as(&[("c1", Exited)]);
        fake.fail_list(true);
        let error = relister.relist().await.unwrap_err();
        assert_eq!(error.to_string(), "agent unreachable");
        assert_eq!(drain(&mut rx), []);
        assert_eq!(relister.record("c1").unwrap().state, Running);

        fake.fail_list(false);
        relister.relist().await.unwrap();
        assert_eq!(drain(&mut rx), [died("c1", None)]);
    }

    #[tokio::test]
    async fn container_listed_twice_is_compared_once() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Running), ("c1", Exited)]);

        relister.relist().await.unwrap();

        assert_eq!(drain(&mut rx), []);
        assert_eq!(fake.inspected(), ["c1"]);
    }

    #[tokio::test]
    async fn relist_succeeds_after_the_event_receiver_is_dropped() {
        let fake = FakeSandbox::default();
        let (relister, rx) = relister(&fake);
        drop(rx);
        fake.list_as(&[("c1", Running)]);
        fake.inspect_as(
            "c1",
            Inspection {
                pid: Some(3),
                ..Inspection::default()
            },
        );

        relister.relist().await.unwrap();

        assert_eq!(relister.record("c1").unwrap().pid, Some(3));
    }

    #[tokio::test]
    async fn spawned_relister_relists_every_period_and_stops_when_receiver_dropped() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Running)]);
        let handle = Arc::new(relister).spawn();

        while fake.lists() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fake.list_as(&[("c1", Exited)]);
        let died_event = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(died_event.unwrap(), Some(died("c1", None)));

        // Timers never fire early, so 100 ms hold at most 11 passes of 10 ms.
        let before = fake.lists();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let passes = fake.lists() - before;
        assert!((2..=11).contains(&passes), "{passes} relists in 100 ms");

        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("relister keeps running without a receiver")
            .unwrap();
    }

    #[tokio::test]
    async fn spawned_relister_retries_after_a_failed_list() {
        let fake = FakeSandbox::default();
        let (relister, mut rx) = relister(&fake);
        fake.list_as(&[("c1", Exited)]);
        fake.fail_list(true);
        let handle = Arc::new(relister).spawn();
        while fake.lists() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        fake.fail_list(false);

        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(event.unwrap(), Some(died("c1", None)));
        handle.abort();
    }
}
