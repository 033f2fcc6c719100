//! The sandbox: every container the agent runs, and the guest-wide calls
//! (CreateSandbox, DestroySandbox, guest details, OOM events). The RPC layer
//! in `server.rs` is a thin translation onto these methods.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kestrel_protocols::agent::{
    AgentDetails, CopyFileRequest, CreateContainerRequest, CreateSandboxRequest,
    GuestDetailsResponse, StatsContainerResponse,
};
use kestrel_protocols::oci::LinuxResources;
use tokio::sync::{mpsc, Notify};

use crate::container::cgroup::Hierarchy;
use crate::container::namespaces::PodNamespaces;
use crate::container::process::Process;
use crate::container::{checked_signal, Container, Pod};
use crate::error::{validate_id, Error, Result};
use crate::network::Network;
use crate::reaper::{ExitStatus, Reaper};
use crate::storage::roots::Roots;
use crate::storage::{Lease, Storages};
use crate::{copy_file, init};

/// How often a container's cgroup is checked for new OOM kills. Reading one
/// counter works the same on cgroup v1 and v2; the kernel's notification
/// interfaces differ between them (eventfd vs. inotify).
const OOM_POLL: Duration = Duration::from_millis(200);
/// How long DestroySandbox waits for each container to die.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

enum Slot {
    /// Reserved while CreateContainer runs, so a second create with the
    /// same id fails with ALREADY_EXISTS instead of racing.
    Creating,
    Ready {
        container: Arc<Container>,
        /// The storages its CreateContainer took, released with the slot.
        _storages: Lease,
    },
}

pub struct Sandbox {
    reaper: Reaper,
    hierarchy: Hierarchy,
    shared_dir: PathBuf,
    /// True when the agent is the guest's PID 1; false in host mode.
    is_init: bool,
    network: Network,
    /// Kata's storages, counted by mount point.
    storages: Arc<Storages>,
    /// The storages CreateSandbox mounted: the sandbox's own use.
    sandbox_storages: Mutex<Option<Lease>>,
    containers: Mutex<HashMap<String, Slot>>,
    /// The pod's IPC, UTS and PID namespaces: its first container's.
    pod_namespaces: Mutex<Option<Arc<PodNamespaces>>>,
    /// The id given by CreateSandbox, once it has been called.
    sandbox_id: Mutex<Option<String>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    shutdown: Notify,
}

impl Sandbox {
    pub fn new(reaper: Reaper, shared_dir: PathBuf, is_init: bool) -> Sandbox {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        let roots = Roots::for_agent(&shared_dir, is_init);
        Sandbox {
            reaper,
            hierarchy: Hierarchy::detect(),
            shared_dir,
            is_init,
            network: Network::new(is_init),
            storages: Arc::new(Storages::new(roots, is_init)),
            sandbox_storages: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            pod_namespaces: Mutex::new(None),
            sandbox_id: Mutex::new(None),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            shutdown: Notify::new(),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container id", id)?;
        match self.slots().get(id) {
            Some(Slot::Ready { container, .. }) => Ok(Arc::clone(container)),
            _ => Err(Error::NotFound(format!("container {id} does not exist"))),
        }
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    /// The guest's links, routes and neighbours (the network RPCs).
    pub fn network(&self) -> &Network {
        &self.network
    }

    pub fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<()> {
        if !req.sandbox_id.is_empty() {
            validate_id("sandbox id", &req.sandbox_id)?;
        }
        Network::check_sandbox(&req.hostname, &req.dns)?;
        let unsupported = [
            (req.sandbox_pidns, "a shared sandbox PID namespace"),
            (!req.guest_hook_path.is_empty(), "guest OCI hooks"),
            (!req.kernel_modules.is_empty(), "kernel modules"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(asked, _)| *asked) {
            return Err(Error::Unimplemented(format!(
                "CreateSandbox: {what} are not supported"
            )));
        }
        let mut sandbox_id = self.sandbox_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = sandbox_id.as_ref() {
            return Err(Error::AlreadyExists(format!(
                "sandbox {existing:?} has already been created"
            )));
        }
        std::fs::create_dir_all(&self.shared_dir)
            .map_err(|e| Error::internal(format!("creating {}", self.shared_dir.display()), e))?;
        // Dropped, so unmounted, if anything below fails.
        let storages = self.storages.acquire("CreateSandbox", &req.storages)?;
        if self.is_init {
            init::set_hostname(&req.hostname)?;
        } else {
            tracing::info!(hostname = %req.hostname, "host mode: leaving the host's hostname alone");
        }
        self.network.configure_sandbox(&req.hostname, &req.dns)?;
        *self
            .sandbox_storages
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(storages);
        *sandbox_id = Some(req.sandbox_id.clone());
        tracing::info!(sandbox_id = %req.sandbox_id, "sandbox created");
        Ok(())
    }

    /// Tears the sandbox down, then asks the agent to stop (and, as PID 1,
    /// to power the guest off) once the reply has gone out.
    pub async fn destroy_sandbox(&self) -> Result<()> {
        self.teardown().await;
        self.shutdown.notify_one();
        Ok(())
    }

    /// Removes every container, then unmounts every storage: the
    /// sandbox's, shared ones no container uses any more, and those of a
    /// container whose removal failed.
    pub async fn teardown(&self) {
        let ids: Vec<String> = self.slots().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id, Some(DESTROY_TIMEOUT)).await {
                tracing::warn!(container_id = %id, error = %e, "removing container during sandbox teardown");
            }
        }
        drop(
            self.sandbox_storages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        self.storages.release_all();
    }

    /// Resolves once DestroySandbox has been called.
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await
    }

    pub async fn create_container(self: &Arc<Self>, req: &CreateContainerRequest) -> Result<()> {
        let id = req.container_id.as_str();
        validate_id("container id", id)?;
        let exec_id = if req.exec_id.is_empty() {
            id
        } else {
            req.exec_id.as_str()
        };
        validate_id("exec id", exec_id)?;
        let spec = req
            .OCI
            .as_ref()
            .ok_or_else(|| Error::invalid("CreateContainer has no OCI spec"))?;
        if !req.devices.is_empty() {
            return Err(Error::Unimplemented(
                "CreateContainer: devices are not supported; the Kestrel guest has no hotplugged devices".into(),
            ));
        }
        self.check_root_path(spec)?;
        {
            let mut slots = self.slots();
            if slots.contains_key(id) {
                return Err(Error::AlreadyExists(format!(
                    "container {id} already exists"
                )));
            }
            slots.insert(id.to_string(), Slot::Creating);
        }
        let storages = match self.storages.acquire("CreateContainer", &req.storages) {
            Ok(lease) => lease,
            Err(e) => {
                self.slots().remove(id);
                return Err(e);
            }
        };
        // Containers see the guest's resolv.conf and hosts unless they
        // mount their own.
        let spec = self.network.with_guest_files(spec);
        let bundle = self.shared_dir.join(id);
        let pod_namespaces = self.pod_namespaces().clone();
        let pod = Pod {
            namespaces: pod_namespaces.as_deref(),
            sandbox_pidns: req.sandbox_pidns,
        };
        let created = Container::create(
            &self.reaper,
            &self.hierarchy,
            id,
            exec_id,
            &spec,
            &bundle,
            pod,
        )
        .await;
        match created {
            Ok(c) => {
                let c = Arc::new(c);
                self.adopt_pod_namespaces(&c);
                self.watch_oom(&c);
                let ready = Slot::Ready {
                    container: c,
                    _storages: storages,
                };
                self.slots().insert(id.to_string(), ready);
                tracing::info!(container_id = %id, "container created");
                Ok(())
            }
            Err(e) => {
                self.slots().remove(id);
                drop(storages);
                Err(e)
            }
        }
    }

    /// A guest agent takes an absolute `root.path` only below its roots
    /// (its shared directory, Kata's `/run/kata-containers`), where the
    /// runtime put the rootfs by CopyFile or through the shared
    /// filesystem; checked through symlinks. A relative one is below the
    /// container's shared directory. In host mode the runtime hands over
    /// rootfs directories of the host's own, so any absolute path goes.
    fn check_root_path(&self, spec: &kestrel_protocols::oci::Spec) -> Result<()> {
        let Some(raw) = spec.Root.as_ref().map(|r| r.Path.as_str()) else {
            return Ok(());
        };
        if !self.is_init || !raw.starts_with('/') {
            return Ok(());
        }
        let located = self.storages.roots().locate("root.path", raw)?;
        let real = located
            .path
            .canonicalize()
            .map_err(|e| Error::invalid(format!("root.path {raw:?} cannot be resolved: {e}")))?;
        self.storages
            .roots()
            .locate("root.path", &real.to_string_lossy())
            .map_err(|_| {
                Error::invalid(format!(
                    "root.path {raw:?} resolves to {}, outside the agent's roots",
                    real.display()
                ))
            })?;
        Ok(())
    }

    fn pod_namespaces(&self) -> std::sync::MutexGuard<'_, Option<Arc<PodNamespaces>>> {
        self.pod_namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The pod's first container gives the pod its namespaces (Kata's
    /// infra container rule).
    /// If its init process is already gone, the next container tries again.
    fn adopt_pod_namespaces(&self, c: &Container) {
        let mut pod = self.pod_namespaces();
        if pod.is_some() {
            return;
        }
        match PodNamespaces::of(c.init.pid) {
            Ok(namespaces) => {
                tracing::info!(container_id = %c.id, pid = %c.init.pid, "the pod's namespaces are this container's");
                *pod = Some(Arc::new(namespaces));
            }
            Err(e) => {
                tracing::warn!(container_id = %c.id, error = %e, "cannot hold the pod's namespaces");
            }
        }
    }

    fn watch_oom(&self, c: &Arc<Container>) {
        let weak: Weak<Container> = Arc::downgrade(c);
        let tx = self.oom_tx.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            let mut tick = tokio::time::interval(OOM_POLL);
            loop {
                tick.tick().await;
                let Some(c) = weak.upgrade() else { break };
                let kills = c.cgroup.oom_kills();
                if kills > seen {
                    seen = kills;
                    tracing::info!(container_id = %c.id, "OOM kill");
                    if tx.send(c.id.clone()).is_err() {
                        break;
                    }
                }
            }
        });
    }

    pub async fn get_oom_event(&self) -> Result<String> {
        let mut rx = self.oom_rx.lock().await;
        // The sender lives in `self`, so the channel never closes while idle.
        rx.recv()
            .await
            .ok_or_else(|| Error::Internal("the OOM event stream closed".into()))
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        self.container(id)?.start().await?;
        tracing::info!(container_id = %id, "container started");
        Ok(())
    }

    pub async fn remove_container(&self, id: &str, timeout: Option<Duration>) -> Result<()> {
        let c = self.container(id)?;
        c.destroy(timeout).await?;
        // Its storages are released (unmounted when it was the last user)
        // as the slot goes, before its shared directory is deleted.
        let slot = self.slots().remove(id);
        drop(slot);
        self.remove_copied_files(id).await;
        tracing::info!(container_id = %id, "container removed");
        Ok(())
    }

    /// Deletes `<shared_dir>/<id>`, where CopyFile put the container's
    /// rootfs and bind-mounted files, so a pod's removed container leaves
    /// nothing in the guest. A failure only warns: the container is gone
    /// already and a retried RemoveContainer could not find it. A mount
    /// still below the directory (none of ours: container mounts die with
    /// the container's mount namespace) keeps it, since deleting through a
    /// mount would delete what the mount shows.
    async fn remove_copied_files(&self, id: &str) {
        let dir = self.shared_dir.join(id);
        if mounted_below(&dir) {
            tracing::warn!(container_id = %id, dir = %dir.display(), "not removing the container's shared directory: something is mounted below it");
            return;
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(container_id = %id, dir = %dir.display(), error = %e, "removing the container's shared directory");
            }
            _ => {}
        }
    }

    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        p: Option<&kestrel_protocols::oci::Process>,
    ) -> Result<()> {
        self.container(id)?.exec(&self.reaper, exec_id, p).await
    }

    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let signal = checked_signal(signal)?;
        self.container(id)?.signal(exec_id, signal)
    }

    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        Ok(self.process(id, exec_id)?.wait().await)
    }

    pub async fn pause_container(&self, id: &str) -> Result<()> {
        self.container(id)?.pause().await
    }

    pub async fn resume_container(&self, id: &str) -> Result<()> {
        self.container(id)?.resume().await
    }

    pub fn update_container(&self, id: &str, resources: Option<&LinuxResources>) -> Result<()> {
        let c = self.container(id)?;
        let r = resources.ok_or_else(|| Error::invalid("UpdateContainer has no resources"))?;
        c.cgroup.apply(r)
    }

    pub fn stats_container(&self, id: &str) -> Result<StatsContainerResponse> {
        let c = self.container(id)?;
        let mut resp = StatsContainerResponse::new();
        resp.cgroup_stats = Some(c.cgroup.stats()).into();
        Ok(resp)
    }

    pub fn copy_file(&self, req: &CopyFileRequest) -> Result<()> {
        copy_file::copy(&self.shared_dir, req)
    }

    pub fn guest_details(&self, mem_block_size: bool, hotplug_probe: bool) -> GuestDetailsResponse {
        let mut resp = GuestDetailsResponse::new();
        if mem_block_size {
            resp.mem_block_size_bytes = init::memory_block_size();
        }
        if hotplug_probe {
            resp.support_mem_hotplug_probe = init::supports_memory_probe();
        }
        let mut details = AgentDetails::new();
        details.version = crate::VERSION.to_string();
        details.init_daemon = self.is_init;
        details.supports_seccomp = crate::container::seccomp::supported();
        resp.agent_details = Some(details).into();
        resp
    }

    pub fn set_guest_date_time(&self, sec: i64, usec: i64) -> Result<()> {
        if sec < 0 || !(0..1_000_000).contains(&usec) {
            return Err(Error::invalid(format!(
                "SetGuestDateTime: {sec} s and {usec} µs is not a valid time"
            )));
        }
        if !self.is_init {
            return Err(Error::FailedPrecondition(
                "host mode: the agent does not set the host's clock".into(),
            ));
        }
        init::set_clock(sec, usec)
    }
}

/// Whether the mount table lists a mount point at or below `dir`.
fn mounted_below(dir: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|point| Path::new(&unescape_mount_point(point)).starts_with(dir))
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mount_point(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_with_escaped_spaces_are_read_back() {
        assert_eq!(
            unescape_mount_point(r"/run/my\040shared/c1"),
            "/run/my shared/c1"
        );
        assert_eq!(unescape_mount_point(r"/a\134b"), r"/a\b");
        assert_eq!(unescape_mount_point(r"/trailing\04"), r"/trailing\04");
    }
}
