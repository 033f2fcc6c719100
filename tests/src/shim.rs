//! The shim's Task service served in process on a private socket, with a
//! process-backend configuration and OCI bundles for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::*;
use containerd_shim_protos::shim_async::TaskClient;
use containerd_shim_protos::ttrpc::context;
use containerd_shim_protos::ttrpc::r#async::{Client, Server};
use containerd_shim_protos::types::task::Status;
use kestrel_host::config::Config;
use kestrel_host::lifecycle::events::{Event, EventStream};
use kestrel_host::shim::register_task_service;
use kestrel_host::shim::service::Runtime;
use kestrel_host::shim::task::TaskService;

use crate::binary;

/// Writes `<dir>/<id>/config.json`, an OCI runtime spec like the one `ctr
/// run --rootfs` writes, running `args` in `rootfs`. Returns the bundle.
pub fn bundle(dir: &Path, id: &str, rootfs: &Path, args: &[&str]) -> PathBuf {
    bundle_with(dir, id, rootfs, args, serde_json::json!({}))
}

pub fn bundle_with(
    dir: &Path,
    id: &str,
    rootfs: &Path,
    args: &[&str],
    annotations: serde_json::Value,
) -> PathBuf {
    let bundle = dir.join(id);
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let config = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": rootfs},
        "hostname": id,
        "annotations": annotations,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    });
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .expect("config.json");
    bundle
}

/// A process-backend configuration whose sandboxes live under `dir`.
pub fn config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.sandbox.hypervisor = "process".into();
    config.sandbox.agent_path = binary("kestrel-agent");
    config.sandbox.state_dir = dir.join("sandboxes");
    config.sandbox.agent_log_level =
        std::env::var("KESTREL_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    config.sandbox.stop_grace_ms = 2000;
    config.lifecycle.relist_period_ms = 200;
    config
}

/// Events received so far, each with when it arrived.
pub type EventLog = Arc<Mutex<Vec<(Instant, Event)>>>;

/// The Task service on a private socket, and a client for it.
pub struct InProcessShim {
    pub dir: tempfile::TempDir,
    pub runtime: Arc<Runtime>,
    pub client: TaskClient,
    pub events: EventLog,
    server: Server,
}

impl InProcessShim {
    pub async fn start() -> InProcessShim {
        let dir = tempfile::tempdir().expect("tempdir");
        let (stream, mut rx) = EventStream::new();
        let runtime = Runtime::new(config(dir.path()), "default", stream);
        let events: EventLog = Arc::default();
        let log = Arc::clone(&events);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                log.lock().unwrap().push((Instant::now(), event));
            }
        });
        let socket = dir.path().join("shim.sock");
        let exit = Arc::new(containerd_shim::ExitSignal::default());
        let service = Arc::new(TaskService::new(Arc::clone(&runtime), exit));
        let mut server = Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .expect("bind");
        server = register_task_service(server, service);
        server.start().await.expect("start server");
        let client = Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("connect");
        InProcessShim {
            dir,
            runtime,
            client: TaskClient::new(client),
            events,
            server,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates and starts a container running `args`; its stdio goes nowhere.
    pub async fn run(&self, rootfs: &Path, id: &str, args: &[&str]) -> u32 {
        let bundle = bundle(self.path(), id, rootfs, args);
        self.create(id, &bundle, "").await;
        self.start_process(id, "").await
    }

    pub async fn create(&self, id: &str, bundle: &Path, stdout: &str) {
        self.create_with_stdin(id, bundle, "", stdout).await
    }

    pub async fn create_with_stdin(&self, id: &str, bundle: &Path, stdin: &str, stdout: &str) {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            stdin: stdin.into(),
            stdout: stdout.into(),
            ..Default::default()
        };
        self.client.create(prompt(), &req).await.expect("Create");
    }

    pub async fn start_process(&self, id: &str, exec_id: &str) -> u32 {
        let req = StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.start(prompt(), &req).await.expect("Start").pid
    }

    /// The pid Pids reports for a container: its guest's (the agent's here).
    pub async fn guest_pid(&self, id: &str) -> u32 {
        let req = PidsRequest {
            id: id.into(),
            ..Default::default()
        };
        let pids = self.client.pids(prompt(), &req).await.expect("Pids");
        pids.processes.first().map(|p| p.pid).expect("a pid")
    }

    pub async fn state(
        &self,
        id: &str,
        exec_id: &str,
    ) -> containerd_shim_protos::ttrpc::Result<StateResponse> {
        let req = StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.state(prompt(), &req).await
    }

    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
    ) -> containerd_shim_protos::ttrpc::Result<()> {
        let req = KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        self.client.kill(prompt(), &req).await.map(drop)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let req = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client
            .wait(context::with_timeout(0), &req)
            .await
            .expect("Wait")
            .exit_status
    }

    pub async fn delete(
        &self,
        id: &str,
        exec_id: &str,
    ) -> containerd_shim_protos::ttrpc::Result<DeleteResponse> {
        let req = DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.delete(prompt(), &req).await
    }

    /// The events of one container, in order, as topic names with the
    /// exec id for exec events.
    pub fn events_of(&self, id: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, e)| describe(e, id))
            .collect()
    }

    pub async fn shutdown(self) {
        let _ = self
            .client
            .shutdown(prompt(), &ShutdownRequest::new())
            .await;
        self.runtime.stop_all().await;
        let mut server = self.server;
        let _ = server.shutdown().await;
    }
}

fn describe(event: &Event, id: &str) -> Option<String> {
    let (container, name) = match event {
        Event::Create { container_id, .. } => (container_id, "create".to_string()),
        Event::Start { container_id, .. } => (container_id, "start".into()),
        Event::Exit {
            container_id,
            exec_id,
            exit,
            ..
        } if exec_id.is_empty() => (container_id, format!("exit {}", exit.status)),
        Event::Exit {
            container_id,
            exec_id,
            exit,
            ..
        } => (container_id, format!("exit {exec_id} {}", exit.status)),
        Event::Delete { container_id, .. } => (container_id, "delete".into()),
        Event::ExecAdded {
            container_id,
            exec_id,
        } => (container_id, format!("exec-added {exec_id}")),
        Event::ExecStarted {
            container_id,
            exec_id,
            ..
        } => (container_id, format!("exec-started {exec_id}")),
        Event::Paused { container_id } => (container_id, "paused".into()),
        Event::Resumed { container_id } => (container_id, "resumed".into()),
        Event::Oom { container_id, .. } => (container_id, "oom".into()),
    };
    (container == id).then_some(name)
}

pub fn prompt() -> context::Context {
    context::with_duration(Duration::from_secs(30))
}

/// The wire status of a State answer.
pub fn status(resp: &StateResponse) -> Status {
    resp.status.enum_value_or(Status::UNKNOWN)
}
