//! What the spec of a sandbox's first container (a CRI pod's pause
//! container, or a lone container) says about the sandbox itself: the pod's
//! network namespace and the size of its VM.
//!
//! containerd's CRI plugin (1.6.7 and later) puts the pod's resource limits
//! (the sum of its containers', as the kubelet computes them) on the
//! sandbox container as annotations. As Kata's static sandbox sizing does,
//! they are added to the configured `[vm]` shape, which stays the guest's
//! own share, and the result must stay within `[vm] max_vcpus` /
//! `max_memory_mib`.

use std::path::PathBuf;

use kestrel_hypervisor::VmShape;
use kestrel_protocols::oci;

use crate::config::VmConfig;

/// CPU quota of the pod, in microseconds per period.
pub const CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CPU period of the pod, in microseconds.
pub const CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// Memory limit of the pod, in bytes.
pub const MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error("annotation {key}: {value:?} is not a whole number")]
    NotANumber { key: &'static str, value: String },
    #[error(
        "the pod asks for {asked} vCPUs (cpu quota {quota} / period {period}), {total} with the guest's own {base}; at most {max} are allowed ([vm] max_vcpus)"
    )]
    TooManyVcpus {
        asked: u64,
        quota: i64,
        period: u64,
        base: u8,
        total: u64,
        max: u8,
    },
    #[error(
        "the pod asks for {asked} MiB of memory, {total} MiB with the guest's own {base} MiB; at most {max} MiB are allowed ([vm] max_memory_mib)"
    )]
    TooMuchMemory {
        asked: u64,
        base: u32,
        total: u64,
        max: u32,
    },
}

/// The network namespace the spec names: for a CRI pod, the one its CNI
/// plugin set up on the host.
pub fn network_namespace(spec: &oci::Spec) -> Option<PathBuf> {
    spec.Linux
        .as_ref()?
        .Namespaces
        .iter()
        .find(|ns| ns.Type == "network" && !ns.Path.is_empty())
        .map(|ns| PathBuf::from(&ns.Path))
}

/// The VM shape for a sandbox whose first container has `spec`.
pub fn vm_shape(spec: &oci::Spec, vm: &VmConfig) -> Result<VmShape, SizingError> {
    let number = |key: &'static str| -> Result<Option<i64>, SizingError> {
        match spec.Annotations.get(key).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(value) => value
                .parse::<i64>()
                .map(Some)
                .map_err(|_| SizingError::NotANumber {
                    key,
                    value: value.to_string(),
                }),
        }
    };
    let quota = number(CPU_QUOTA_ANNOTATION)?.unwrap_or(0);
    let period = number(CPU_PERIOD_ANNOTATION)?.unwrap_or(0);
    let memory = number(MEMORY_ANNOTATION)?.unwrap_or(0);

    // A quota of -1 (or none) is "no CPU limit": nothing to add.
    let vcpus_asked = match (u64::try_from(quota), u64::try_from(period)) {
        (Ok(q), Ok(p)) if q > 0 && p > 0 => q.div_ceil(p),
        _ => 0,
    };
    let vcpus = u64::from(vm.vcpus) + vcpus_asked;
    if vcpus > u64::from(vm.max_vcpus) {
        return Err(SizingError::TooManyVcpus {
            asked: vcpus_asked,
            quota,
            period: u64::try_from(period).unwrap_or(0),
            base: vm.vcpus,
            total: vcpus,
            max: vm.max_vcpus,
        });
    }
    let memory_asked = u64::try_from(memory).unwrap_or(0).div_ceil(MIB);
    let memory_mib = u64::from(vm.memory_mib) + memory_asked;
    if memory_mib > u64::from(vm.max_memory_mib) {
        return Err(SizingError::TooMuchMemory {
            asked: memory_asked,
            base: vm.memory_mib,
            total: memory_mib,
            max: vm.max_memory_mib,
        });
    }
    // Both fit in their types: they are at most the configured maxima.
    Ok(VmShape {
        memory_mib: memory_mib as u32,
        vcpus: vcpus as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &[(&str, &str)]) -> oci::Spec {
        let mut spec = oci::Spec::new();
        for (k, v) in annotations {
            spec.Annotations.insert(k.to_string(), v.to_string());
        }
        spec
    }

    #[test]
    fn a_pod_without_limits_gets_the_configured_shape() {
        let vm = VmConfig::default();
        assert_eq!(vm_shape(&spec(&[]), &vm).unwrap(), vm.shape());
        let unlimited = spec(&[
            (CPU_QUOTA_ANNOTATION, "-1"),
            (CPU_PERIOD_ANNOTATION, "100000"),
        ]);
        assert_eq!(vm_shape(&unlimited, &vm).unwrap(), vm.shape());
    }

    #[test]
    fn a_pods_limits_are_added_to_the_guests_own_share() {
        let vm = VmConfig::default();
        let pod = spec(&[
            (CPU_QUOTA_ANNOTATION, "150000"),
            (CPU_PERIOD_ANNOTATION, "100000"),
            (MEMORY_ANNOTATION, &(512 * MIB).to_string()),
        ]);
        let shape = vm_shape(&pod, &vm).unwrap();
        assert_eq!(shape.vcpus, vm.vcpus + 2, "1.5 CPUs round up to 2");
        assert_eq!(shape.memory_mib, vm.memory_mib + 512);
    }

    #[test]
    fn a_pod_over_the_maxima_is_refused_naming_what_it_asked() {
        let vm = VmConfig::default();
        let cpus = spec(&[
            (CPU_QUOTA_ANNOTATION, "6400000"),
            (CPU_PERIOD_ANNOTATION, "100000"),
        ]);
        let err = vm_shape(&cpus, &vm).unwrap_err().to_string();
        assert!(
            err.contains("64 vCPUs") && err.contains("max_vcpus"),
            "{err}"
        );
        let memory = spec(&[(MEMORY_ANNOTATION, &(64 * 1024 * MIB).to_string())]);
        let err = vm_shape(&memory, &vm).unwrap_err().to_string();
        assert!(
            err.contains("65536 MiB") && err.contains("max_memory_mib"),
            "{err}"
        );
        let junk = spec(&[(MEMORY_ANNOTATION, "lots")]);
        let err = vm_shape(&junk, &vm).unwrap_err().to_string();
        assert!(
            err.contains(MEMORY_ANNOTATION) && err.contains("lots"),
            "{err}"
        );
    }

    #[test]
    fn the_network_namespace_is_the_one_with_a_path() {
        let mut s = oci::Spec::new();
        let mut ns = oci::LinuxNamespace::new();
        ns.Type = "network".into();
        s.Linux.mut_or_insert_default().Namespaces.push(ns.clone());
        assert_eq!(network_namespace(&s), None);
        ns.Path = "/var/run/netns/cni-1".into();
        s.Linux.mut_or_insert_default().Namespaces = vec![ns];
        assert_eq!(
            network_namespace(&s),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
    }
}
