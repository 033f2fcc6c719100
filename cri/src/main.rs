//! `kestrel-cri`: crictl-like commands on a CRI runtime's unix socket.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use kestrel_cri::api::{
    ContainerConfig, ContainerState, NamespaceMode, PodSandboxConfig, PodSandboxState,
};
use kestrel_cri::{config, CriClient, DEFAULT_ENDPOINT};

#[derive(Parser)]
#[command(
    name = "kestrel-cri",
    version,
    about = "A small CRI client (runtime.v1), crictl-like"
)]
struct Cli {
    /// The runtime's CRI socket.
    #[arg(long, global = true, default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pod sandbox; prints its id.
    Runp {
        #[command(flatten)]
        pod: PodFlags,
        /// The runtime handler (containerd's `runtimes.NAME`); empty: the default.
        #[arg(long, default_value = "")]
        runtime: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a container in a pod; prints its id.
    Create {
        pod_id: String,
        #[command(flatten)]
        container: ContainerFlags,
        /// The pod's config as given to runp (JSON): the runtime reads the
        /// log directory and security context from it.
        #[arg(long, value_name = "FILE")]
        pod_config: Option<PathBuf>,
        /// The pod's log directory, when there is no --pod-config.
        #[arg(long)]
        log_dir: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start a created container.
    Start { id: String },
    /// Show a pod's status.
    Inspectp {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a container's status.
    Inspect {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show an image the runtime has (exit status 1 when it has none).
    Inspecti {
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a container (ExecSync); exits with its status.
    Exec {
        id: String,
        /// Seconds before the runtime gives up on it (0: no limit).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        #[arg(long)]
        json: bool,
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Stop a container: SIGTERM, SIGKILL after --timeout seconds.
    Stop {
        id: String,
        #[arg(long, default_value_t = 10)]
        timeout: i64,
    },
    /// Remove a container.
    Rm { id: String },
    /// Stop a pod and its containers.
    Stopp { id: String },
    /// Remove a stopped pod.
    Rmp { id: String },
    /// List pods.
    Pods {
        #[arg(long)]
        json: bool,
    },
    /// List containers.
    Ps {
        /// Only this pod's containers.
        #[arg(long)]
        pod: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// A pod's config: JSON (`--config`, snake_case field names, enums as
/// numbers), then these flags over it.
#[derive(Args)]
struct PodFlags {
    /// PodSandboxConfig JSON; flags given override its fields.
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The pod's uid (default: derived from namespace and name).
    #[arg(long)]
    uid: Option<String>,
    #[arg(long)]
    hostname: Option<String>,
    /// Where the runtime writes container logs (PodSandboxConfig.log_directory).
    #[arg(long)]
    log_dir: Option<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "pod-annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "pod-label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The pod's CPUs (linux.resources: VM runtimes size the VM from them).
    #[arg(long = "pod-cpus")]
    cpus: Option<f64>,
    /// The pod's memory in MiB (linux.resources).
    #[arg(long = "pod-memory")]
    memory_mib: Option<i64>,
    /// The network namespace: pod, container or node (without --config:
    /// a config file says its own).
    #[arg(long, default_value = "pod", value_parser = mode)]
    network: i32,
    /// The PID namespace: pod (shared by the pod's containers), container or node.
    #[arg(long, default_value = "container", value_parser = mode)]
    pid: i32,
    /// The IPC namespace: pod or node.
    #[arg(long, default_value = "pod", value_parser = mode)]
    ipc: i32,
}

#[derive(Args)]
struct ContainerFlags {
    /// ContainerConfig JSON; flags given override its fields.
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    image: Option<String>,
    /// NAME=VALUE; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    envs: Vec<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The log file, relative to the pod's log directory.
    #[arg(long)]
    log_path: Option<String>,
    #[arg(long)]
    cpus: Option<f64>,
    /// MiB.
    #[arg(long)]
    memory: Option<i64>,
    #[arg(long)]
    workdir: Option<String>,
    /// Namespace modes (pod, container, node); default: the pod's.
    #[arg(long, value_parser = mode)]
    network: Option<i32>,
    #[arg(long, value_parser = mode)]
    pid: Option<i32>,
    #[arg(long, value_parser = mode)]
    ipc: Option<i32>,
    /// The command, replacing the image's entrypoint.
    #[arg(last = true)]
    command: Vec<String>,
}

fn mode(text: &str) -> Result<i32, String> {
    config::namespace_mode(text)
        .map(|m| m as i32)
        .ok_or_else(|| format!("{text:?}: expected pod, container or node"))
}

fn pairs(items: &[String]) -> anyhow::Result<HashMap<String, String>> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{item:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// A CPU count and MiB of memory (pod or container flags) as CRI's CPU
/// count and memory bytes.
fn limits(cpus: Option<f64>, memory_mib: Option<i64>) -> anyhow::Result<(f64, i64)> {
    let cpus = cpus.unwrap_or(0.0);
    if !cpus.is_finite() || cpus < 0.0 {
        bail!("{cpus} CPUs: expected a number of CPUs, 0 or more");
    }
    let mib = memory_mib.unwrap_or(0);
    let memory = mib
        .checked_mul(1 << 20)
        .filter(|bytes| *bytes >= 0)
        .with_context(|| format!("{mib} MiB of memory: expected 0 or more, below 2^43"))?;
    Ok((cpus, memory))
}

fn read_json(path: &PathBuf) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

impl PodFlags {
    fn build(&self) -> anyhow::Result<PodSandboxConfig> {
        let name = self.name.clone().unwrap_or_default();
        let uid = self.uid.clone().unwrap_or_default();
        let mut pod = config::pod(&name, &self.namespace, &uid);
        if let Some(file) = &self.config {
            pod = config::overlay(&pod, read_json(file)?)
                .with_context(|| format!("{} is not a PodSandboxConfig", file.display()))?;
        }
        let meta = pod.metadata.get_or_insert_with(Default::default);
        if meta.name.is_empty() {
            bail!("a pod needs a name: --name or metadata.name in --config");
        }
        // kubelet's uids are unique per pod; namespace/name is unique
        // among the pods a person runs by hand.
        if meta.uid.is_empty() {
            meta.uid = format!("{}-{}", meta.namespace, meta.name);
        }
        if let Some(hostname) = &self.hostname {
            pod.hostname = hostname.clone();
        }
        if let Some(dir) = &self.log_dir {
            pod.log_directory = dir.clone();
        }
        pod.annotations.extend(pairs(&self.annotations)?);
        pod.labels.extend(pairs(&self.labels)?);
        if self.cpus.is_some() || self.memory_mib.is_some() {
            let (cpus, memory) = limits(self.cpus, self.memory_mib)?;
            config::pod_resources(&mut pod, cpus, memory);
        }
        if self.config.is_none() {
            let namespaces = self.namespaces()?;
            // A pod on the node's network has the node's UTS namespace, and
            // kubelet sets no hostname for it (runtimes refuse one there).
            if namespaces.network == NamespaceMode::Node && self.hostname.is_none() {
                pod.hostname.clear();
            }
            config::pod_namespaces(&mut pod, namespaces);
        }
        Ok(pod)
    }

    fn namespaces(&self) -> anyhow::Result<config::Namespaces> {
        let mode =
            |v: i32| kestrel_cri::api::NamespaceMode::try_from(v).context("unknown namespace mode");
        Ok(config::Namespaces {
            network: mode(self.network)?,
            pid: mode(self.pid)?,
            ipc: mode(self.ipc)?,
        })
    }
}

impl ContainerFlags {
    fn build(&self, pod: config::Namespaces) -> anyhow::Result<ContainerConfig> {
        let pick = |flag: Option<i32>, default: NamespaceMode| {
            flag.map_or(Ok(default), |v| {
                NamespaceMode::try_from(v).context("unknown namespace mode")
            })
        };
        let namespaces = config::Namespaces {
            network: pick(self.network, pod.network)?,
            pid: pick(self.pid, pod.pid)?,
            ipc: pick(self.ipc, pod.ipc)?,
        };
        let command: Vec<&str> = self.command.iter().map(String::as_str).collect();
        let name = self.name.clone().unwrap_or_default();
        let image = self.image.clone().unwrap_or_default();
        let mut c = config::container(&name, &image, &command);
        config::container_namespaces(&mut c, namespaces);
        if let Some(file) = &self.config {
            c = config::overlay(&c, read_json(file)?)
                .with_context(|| format!("{} is not a ContainerConfig", file.display()))?;
        }
        if c.metadata.as_ref().is_none_or(|m| m.name.is_empty()) {
            bail!("a container needs a name: --name or metadata.name in --config");
        }
        if c.image.as_ref().is_none_or(|i| i.image.is_empty()) {
            bail!("a container needs an image: --image or image.image in --config");
        }
        for (name, value) in pairs(&self.envs)? {
            c.envs.retain(|kv| kv.key != name);
            c.envs.push(kestrel_cri::api::KeyValue { key: name, value });
        }
        c.annotations.extend(pairs(&self.annotations)?);
        c.labels.extend(pairs(&self.labels)?);
        if let Some(path) = &self.log_path {
            c.log_path = path.clone();
        }
        if let Some(dir) = &self.workdir {
            c.working_dir = dir.clone();
        }
        if self.cpus.is_some() || self.memory.is_some() {
            let (cpus, memory) = limits(self.cpus, self.memory)?;
            let linux = c.linux.get_or_insert_with(Default::default);
            linux.resources = Some(config::resources(cpus, memory));
        }
        Ok(c)
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn container_state(state: i32) -> &'static str {
    ContainerState::try_from(state).map_or("UNKNOWN", |s| match s {
        ContainerState::ContainerCreated => "CREATED",
        ContainerState::ContainerRunning => "RUNNING",
        ContainerState::ContainerExited => "EXITED",
        ContainerState::ContainerUnknown => "UNKNOWN",
    })
}

fn pod_state(state: i32) -> &'static str {
    PodSandboxState::try_from(state).map_or("UNKNOWN", |s| match s {
        PodSandboxState::SandboxReady => "READY",
        PodSandboxState::SandboxNotready => "NOTREADY",
    })
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = CriClient::connect(&cli.endpoint).await?;
    match cli.command {
        Command::Runp { pod, runtime, json } => {
            let config = pod.build()?;
            let id = client.run_pod_sandbox(config, &runtime).await?;
            if json {
                print_json(&serde_json::json!({ "id": id }))?;
            } else {
                println!("{id}");
            }
        }
        Command::Create {
            pod_id,
            container,
            pod_config,
            log_dir,
            json,
        } => {
            let mut pod_config = match pod_config {
                Some(file) => config::overlay(&config::pod("", "", ""), read_json(&file)?)
                    .with_context(|| format!("{} is not a PodSandboxConfig", file.display()))?,
                None => config::pod("", "", ""),
            };
            if let Some(dir) = log_dir {
                pod_config.log_directory = dir;
            }
            let namespaces = pod_config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.as_ref())
                .map(|o| config::Namespaces {
                    network: o.network(),
                    pid: o.pid(),
                    ipc: o.ipc(),
                })
                .unwrap_or_default();
            let config = container.build(namespaces)?;
            if let Some(image) = config.image.as_ref().map(|i| i.image.clone()) {
                if client.image_status(&image).await?.is_none() {
                    bail!("image {image:?} is not in the runtime's image store");
                }
            }
            let id = client.create_container(&pod_id, config, pod_config).await?;
            if json {
                print_json(&serde_json::json!({ "id": id }))?;
            } else {
                println!("{id}");
            }
        }
        Command::Start { id } => {
            client.start_container(&id).await?;
            println!("{id}");
        }
        Command::Inspectp { id, json } => {
            let s = client.pod_sandbox_status(&id).await?;
            if json {
                print_json(&s)?;
            } else {
                let meta = s.metadata.clone().unwrap_or_default();
                println!("ID:        {}", s.id);
                println!(
                    "NAME:      {}/{} (uid {})",
                    meta.namespace, meta.name, meta.uid
                );
                println!("STATE:     {}", pod_state(s.state));
                println!("HANDLER:   {}", s.runtime_handler);
                if let Some(net) = &s.network {
                    println!("IP:        {}", net.ip);
                }
            }
        }
        Command::Inspect { id, json } => {
            let s = client.container_status(&id).await?;
            if json {
                print_json(&s)?;
            } else {
                let meta = s.metadata.clone().unwrap_or_default();
                println!("ID:        {}", s.id);
                println!("NAME:      {}", meta.name);
                println!("STATE:     {}", container_state(s.state));
                println!(
                    "IMAGE:     {}",
                    s.image.map(|i| i.image).unwrap_or_default()
                );
                if s.state == ContainerState::ContainerExited as i32 {
                    println!("EXIT CODE: {}", s.exit_code);
                    println!("REASON:    {} {}", s.reason, s.message);
                }
                if !s.log_path.is_empty() {
                    println!("LOG:       {}", s.log_path);
                }
            }
        }
        Command::Inspecti { image, json } => match client.image_status(&image).await? {
            Some(i) if json => print_json(&i)?,
            Some(i) => {
                println!("ID:    {}", i.id);
                println!("TAGS:  {}", i.repo_tags.join(", "));
                println!("SIZE:  {}", i.size);
            }
            None => {
                eprintln!("image {image:?} is not in the runtime's image store");
                return Ok(ExitCode::FAILURE);
            }
        },
        Command::Exec {
            id,
            timeout,
            json,
            cmd,
        } => {
            let timeout = (timeout > 0).then(|| Duration::from_secs(timeout));
            let out = client.exec_sync(&id, &cmd, timeout).await?;
            if json {
                print_json(&serde_json::json!({
                    "stdout": String::from_utf8_lossy(&out.stdout),
                    "stderr": String::from_utf8_lossy(&out.stderr),
                    "exit_code": out.exit_code,
                }))?;
            } else {
                std::io::stdout().write_all(&out.stdout)?;
                std::io::stderr().write_all(&out.stderr)?;
            }
            return Ok(ExitCode::from(out.exit_code.clamp(0, 255) as u8));
        }
        Command::Stop { id, timeout } => {
            client.stop_container(&id, timeout).await?;
            println!("{id}");
        }
        Command::Rm { id } => {
            client.remove_container(&id).await?;
            println!("{id}");
        }
        Command::Stopp { id } => {
            client.stop_pod_sandbox(&id).await?;
            println!("{id}");
        }
        Command::Rmp { id } => {
            client.remove_pod_sandbox(&id).await?;
            println!("{id}");
        }
        Command::Pods { json } => {
            let pods = client.list_pod_sandbox(None).await?;
            if json {
                print_json(&pods)?;
            } else {
                println!("{:<13}  {:<8}  {:<30}  HANDLER", "POD ID", "STATE", "NAME");
                for p in pods {
                    let meta = p.metadata.clone().unwrap_or_default();
                    let name = format!("{}/{}", meta.namespace, meta.name);
                    println!(
                        "{:<13}  {:<8}  {:<30}  {}",
                        short(&p.id),
                        pod_state(p.state),
                        name,
                        p.runtime_handler
                    );
                }
            }
        }
        Command::Ps { pod, json } => {
            let filter = pod.map(|pod_sandbox_id| kestrel_cri::api::ContainerFilter {
                pod_sandbox_id,
                ..Default::default()
            });
            let containers = client.list_containers(filter).await?;
            if json {
                print_json(&containers)?;
            } else {
                println!(
                    "{:<13}  {:<8}  {:<20}  {:<13}  IMAGE",
                    "CONTAINER", "STATE", "NAME", "POD ID"
                );
                for c in containers {
                    let name = c.metadata.clone().unwrap_or_default().name;
                    println!(
                        "{:<13}  {:<8}  {:<20}  {:<13}  {}",
                        short(&c.id),
                        container_state(c.state),
                        name,
                        short(&c.pod_sandbox_id),
                        c.image.map(|i| i.image).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kestrel-cri: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kestrel-cri: {e:#}");
            ExitCode::FAILURE
        }
    }
}
