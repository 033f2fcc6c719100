//! Pod and container configs as kubelet would send them, from the few
//! values a user or a test chooses, and JSON overlays on top of them.
//!
//! The CRI messages have dozens of fields; kubelet fills the ones a runtime
//! relies on (metadata, hostname, namespace options, log paths). Starting
//! from these builders, a caller sets only what its scenario is about.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    ContainerConfig, ContainerMetadata, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata,
};

/// The CFS period kubelet uses when it turns CPUs into a quota.
pub const CPU_PERIOD_US: i64 = 100_000;

/// Which namespaces a pod's containers share: kubelet's defaults are a pod
/// network and IPC namespace and a PID namespace per container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespaces {
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
}

impl Default for Namespaces {
    fn default() -> Self {
        Namespaces {
            network: NamespaceMode::Pod,
            pid: NamespaceMode::Container,
            ipc: NamespaceMode::Pod,
        }
    }
}

impl Namespaces {
    fn option(self) -> NamespaceOption {
        NamespaceOption {
            network: self.network as i32,
            pid: self.pid as i32,
            ipc: self.ipc as i32,
            ..Default::default()
        }
    }
}

/// Parses `pod`, `container`, `node` (any case) into a namespace mode.
pub fn namespace_mode(text: &str) -> Option<NamespaceMode> {
    match text.to_ascii_lowercase().as_str() {
        "pod" => Some(NamespaceMode::Pod),
        "container" => Some(NamespaceMode::Container),
        "node" => Some(NamespaceMode::Node),
        _ => None,
    }
}

/// A pod named `name` in Kubernetes namespace `namespace` with uid `uid`;
/// its hostname is its name, its namespaces kubelet's defaults.
pub fn pod(name: &str, namespace: &str, uid: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(Namespaces::default().option()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sets the pod's namespace modes (kept in step by [`container_namespaces`]
/// on its containers, as kubelet does).
pub fn pod_namespaces(pod: &mut PodSandboxConfig, namespaces: Namespaces) {
    let linux = pod.linux.get_or_insert_with(Default::default);
    let security = linux.security_context.get_or_insert_with(Default::default);
    security.namespace_options = Some(namespaces.option());
}

/// The pod's resources, as kubelet (1.23+) sends the sum of its
/// containers' limits: containerd turns them into the sandbox-sizing
/// annotations (`io.kubernetes.cri.sandbox-cpu-quota`, `-cpu-period`,
/// `-cpu-shares`, `-memory`) a VM runtime sizes its VM from.
pub fn pod_resources(pod: &mut PodSandboxConfig, cpus: f64, memory_bytes: i64) {
    let linux = pod.linux.get_or_insert_with(Default::default);
    linux.resources = Some(resources(cpus, memory_bytes));
}

/// CFS quota and period for `cpus` (0: no limit) and a memory limit
/// (0: none).
pub fn resources(cpus: f64, memory_bytes: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: if cpus > 0.0 { CPU_PERIOD_US } else { 0 },
        cpu_quota: (cpus * CPU_PERIOD_US as f64).round() as i64,
        memory_limit_in_bytes: memory_bytes,
        ..Default::default()
    }
}

/// A container named `name` running `command` (its entrypoint replaced,
/// as a pod spec's `command` does) from `image`, with `PATH` set and
/// kubelet's default namespaces.
pub fn container(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        envs: vec![KeyValue {
            key: "PATH".into(),
            value: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        }],
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(Namespaces::default().option()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sets a container's namespace modes: they must match its pod's.
pub fn container_namespaces(container: &mut ContainerConfig, namespaces: Namespaces) {
    let linux = container.linux.get_or_insert_with(Default::default);
    let security = linux.security_context.get_or_insert_with(Default::default);
    security.namespace_options = Some(namespaces.option());
}

/// `base` with the fields `overlay` (JSON, the message's field names in
/// snake_case, enums as numbers) names replaced; objects merge key by key.
/// The generated types demand every field when read from JSON; this lets a
/// user write only the ones they care about.
pub fn overlay<T: Serialize + DeserializeOwned>(
    base: &T,
    overlay: serde_json::Value,
) -> Result<T, serde_json::Error> {
    let mut value = serde_json::to_value(base)?;
    merge(&mut value, overlay);
    serde_json::from_value(value)
}

fn merge(base: &mut serde_json::Value, overlay: serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) if !slot.is_null() => merge(slot, value),
                    // An absent message (null) has no defaults to merge
                    // into: the overlay must give it whole.
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_become_a_cfs_quota_over_kubelets_period() {
        let r = resources(2.0, 512 << 20);
        assert_eq!((r.cpu_quota, r.cpu_period), (200_000, 100_000));
        assert_eq!(r.memory_limit_in_bytes, 536_870_912);
        assert_eq!(resources(0.0, 0).cpu_period, 0);
    }

    #[test]
    fn a_json_overlay_replaces_only_the_fields_it_names() {
        let base = pod("web", "default", "u1");
        let merged = overlay(
            &base,
            serde_json::json!({"hostname": "h", "metadata": {"attempt": 2},
                               "annotations": {"a": "b"}}),
        )
        .unwrap();
        assert_eq!(merged.hostname, "h");
        let meta = merged.metadata.unwrap();
        assert_eq!((meta.name.as_str(), meta.attempt), ("web", 2));
        assert_eq!(merged.annotations["a"], "b");
        assert_eq!(merged.linux, base.linux);
    }

    #[test]
    fn an_overlay_of_a_field_with_the_wrong_type_is_refused() {
        let base = container("c", "img", &["sleep", "1"]);
        assert!(overlay(&base, serde_json::json!({"command": "sleep 1"})).is_err());
    }
}
