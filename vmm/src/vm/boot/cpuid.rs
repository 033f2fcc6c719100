//! Per-vCPU CPUID: what KVM supports, with the identity and topology
//! fields a guest reads rewritten to describe this vCPU in this VM
//! (`vcpus` single-threaded cores in one package) instead of the host.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::BootError;

/// Leaf 1 ECX: TSC-deadline timer mode of the local APIC.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the logical processor count in EBX is valid (more than one).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units, should KVM report none.
const DEFAULT_CLFLUSH_SIZE: u32 = 8;

/// Leaf 1 ECX: XSAVE/XRSTOR and XCR0.
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// Leaf 0xD (processor extended state), subleaf 0: the XCR0 bits the vCPU
/// may enable in EDX:EAX.
const LEAF_XSTATE: u32 = 0xd;

/// Leaf 4 (deterministic cache parameters).
const LEAF_CACHE: u32 = 4;
/// Leaf 0xB and its successor 0x1F (extended topology).
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// Topology level types (ECX bits 8..16).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Rewrites `cpuid` for vCPU `id` of `vcpus`.
pub(super) fn normalize(
    cpuid: &mut CpuId,
    id: u8,
    vcpus: u8,
    tsc_deadline: bool,
) -> Result<(), BootError> {
    let (id, vcpus) = (u32::from(id), u32::from(vcpus));
    let mut topology_leaves = Vec::new();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => normalize_leaf1(entry, id, vcpus, tsc_deadline),
            LEAF_CACHE => normalize_cache(entry, vcpus),
            leaf @ (LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2) if !topology_leaves.contains(&leaf) => {
                topology_leaves.push(leaf);
            }
            _ => {}
        }
    }

    // KVM reports however many topology subleaves the host has; replace
    // them with exactly ours.
    cpuid.retain(|entry| !topology_leaves.contains(&entry.function));
    for leaf in topology_leaves {
        for entry in topology(leaf, id, vcpus) {
            cpuid.push(entry).map_err(|source| BootError::KvmList {
                what: "CPUID",
                source,
            })?;
        }
    }
    Ok(())
}

/// The XCR0 a vCPU with `cpuid` starts with: every state component its
/// CPUID offers (leaf 0xD.0 EDX:EAX), or `None` without XSAVE.
///
/// Linux enables exactly these (those it knows) early in boot, so starting
/// there changes nothing for it; but it keeps KVM's own copy of XCR0 right
/// where the guest's XSETBV never reaches KVM. QEMU's TCG does not raise
/// the SVM XSETBV intercept (its exit-code list has none), so nested under
/// it KVM would go on believing XCR0 = 1: CPUID 0xD.0 EBX would stay 576
/// bytes, the guest would warn "XSAVE consistency problem", and KVM would
/// load XCR0 = 1 on every VM entry, under the guest's AVX state.
pub(super) fn initial_xcr0(cpuid: &CpuId) -> Option<u64> {
    let entries = cpuid.as_slice();
    let leaf1 = entries.iter().find(|e| e.function == 1)?;
    if leaf1.ecx & LEAF1_ECX_XSAVE == 0 {
        return None;
    }
    let xstate = entries
        .iter()
        .find(|e| e.function == LEAF_XSTATE && e.index == 0)?;
    let xcr0 = u64::from(xstate.eax) | (u64::from(xstate.edx) << 32);
    // x87 is architecturally always on; without it the leaf is nonsense.
    (xcr0 & 1 == 1).then_some(xcr0)
}

/// Leaf 1: initial APIC id and logical processor count in EBX, the
/// hypervisor bit, and TSC-deadline when KVM can emulate it.
fn normalize_leaf1(entry: &mut kvm_cpuid_entry2, id: u32, vcpus: u32, tsc_deadline: bool) {
    let clflush = match (entry.ebx >> 8) & 0xff {
        0 => DEFAULT_CLFLUSH_SIZE,
        size => size,
    };
    entry.ebx = (id << 24) | (vcpus << 16) | (clflush << 8) | (entry.ebx & 0xff);
    entry.ecx |= LEAF1_ECX_HYPERVISOR;
    if tsc_deadline {
        entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
    if vcpus > 1 {
        entry.edx |= LEAF1_EDX_HTT;
    } else {
        entry.edx &= !LEAF1_EDX_HTT;
    }
}

/// Leaf 4: each cache is private to its core up to L2, L3 is shared by
/// the package; the package has `vcpus` cores.
fn normalize_cache(entry: &mut kvm_cpuid_entry2, vcpus: u32) {
    let cache_type = entry.eax & 0x1f;
    if cache_type == 0 {
        return;
    }
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level >= 3 { vcpus - 1 } else { 0 };
    let cores = (vcpus - 1).min(0x3f);
    entry.eax = (cores << 26) | ((sharing & 0xfff) << 14) | (entry.eax & 0x3fff);
}

/// Leaf 0xB/0x1F subleaves: an SMT level of one thread, a core level of
/// `vcpus` cores, and the terminating invalid level; EDX is the x2APIC id.
fn topology(leaf: u32, id: u32, vcpus: u32) -> [kvm_cpuid_entry2; 3] {
    // Bits of the x2APIC id that number the cores.
    let core_bits = u32::BITS - (vcpus - 1).leading_zeros();
    let subleaf = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: id,
        ..Default::default()
    };
    [
        subleaf(0, 0, 1, LEVEL_SMT),
        subleaf(1, core_bits, vcpus, LEVEL_CORE),
        subleaf(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID table shaped like a KVM one from an 8-thread host.
    fn host_cpuid() -> CpuId {
        let entry = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x000a_06a4, 0x0708_0800, 0x7ffa_fbbf, 0xbfeb_fbff),
            // L1d (level 1, type 1), L2 (level 2, type 3), L3 (level 3, type 3), end.
            entry(4, 0, 0x1c00_4121, 0, 0, 0),
            entry(4, 1, 0x1c00_4143, 0, 0, 0),
            entry(4, 2, 0x1c03_c163, 0, 0, 0),
            entry(4, 3, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 8, 0x201, 7),
            entry(0x8000_0008, 0, 0x3027, 0, 0x7, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn leaf1_carries_the_vcpu_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = host_cpuid();
        normalize(&mut cpuid, 3, 4, true).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3, "initial APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!((leaf1.ebx >> 8) & 0xff, 8, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_clears_the_htt_bit() {
        let mut cpuid = host_cpuid();
        normalize(&mut cpuid, 0, 1, false).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn topology_leaf_reports_one_thread_per_core_and_the_x2apic_id() {
        let mut cpuid = host_cpuid();
        normalize(&mut cpuid, 5, 6, false).unwrap();
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff, end.edx), (0, 0, 5));
        let count = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == 0xb)
            .count();
        assert_eq!(count, 3);
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn cache_leaf_reports_the_vcpus_as_cores_of_one_package() {
        let mut cpuid = host_cpuid();
        normalize(&mut cpuid, 0, 4, false).unwrap();
        for index in 0..3 {
            let leaf = find(&cpuid, 4, index);
            assert_eq!(leaf.eax >> 26, 3, "cores per package - 1, subleaf {index}");
        }
        assert_eq!((find(&cpuid, 4, 0).eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((find(&cpuid, 4, 1).eax >> 14) & 0xfff, 0, "L2 is per core");
        assert_eq!((find(&cpuid, 4, 2).eax >> 14) & 0xfff, 3, "L3 is shared");
        assert_eq!(find(&cpuid, 4, 2).eax & 0x3fff, 0x0163, "cache type kept");
        assert_eq!(find(&cpuid, 4, 3).eax, 0, "terminator untouched");
    }

    #[test]
    fn amd_address_size_leaf_is_left_alone() {
        let mut cpuid = host_cpuid();
        normalize(&mut cpuid, 1, 2, false).unwrap();
        let leaf = find(&cpuid, 0x8000_0008, 0);
        assert_eq!((leaf.eax, leaf.ecx), (0x3027, 0x7));
    }

    #[test]
    fn xcr0_starts_at_every_state_component_the_cpuid_offers() {
        let mut cpuid = host_cpuid();
        assert_eq!(initial_xcr0(&cpuid), None, "no leaf 0xD");
        // x87, SSE, AVX and PKRU: what QEMU's `-cpu max` offers L1.
        let xstate = kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index: 0,
            eax: 0x207,
            ebx: 0x240,
            ecx: 0xa88,
            ..Default::default()
        };
        cpuid.push(xstate).unwrap();
        assert_eq!(initial_xcr0(&cpuid), Some(0x207));

        for entry in cpuid.as_mut_slice() {
            if entry.function == 1 {
                entry.ecx &= !LEAF1_ECX_XSAVE;
            }
        }
        assert_eq!(initial_xcr0(&cpuid), None, "XSAVE not offered");
    }

    #[test]
    fn xcr0_needs_x87() {
        let mut cpuid = host_cpuid();
        let xstate = kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index: 0,
            eax: 0x6,
            ..Default::default()
        };
        cpuid.push(xstate).unwrap();
        assert_eq!(initial_xcr0(&cpuid), None);
    }
}
