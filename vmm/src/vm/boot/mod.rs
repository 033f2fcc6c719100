//! x86_64 Linux boot for the builtin VMM: guest RAM layout, kernel and initrd
//! loading, the zero page and MP table, and each vCPU's 64-bit entry state.
//!
//! The guest starts directly in the kernel's 64-bit entry point, without
//! firmware: the VMM does what a boot loader and BIOS would have done.
//!
//! - [`guest_memory`] lays RAM out around the 32-bit MMIO hole
//!   ([`layout::MMIO_START`]..4 GiB).
//! - [`load_kernel`] loads a `vmlinux` ELF (preferred) or a bzImage,
//!   [`load_initrd`] puts the initrd as high in low RAM as the kernel allows.
//! - [`configure_system`] writes the command line, the zero page
//!   (`boot_params` with the e820 map) and the MP table that tells Linux
//!   about the vCPUs and the I/O APIC without ACPI.
//! - [`setup_vcpu`] gives each vCPU its CPUID, MSRs, registers, page tables
//!   and local APIC wiring.
//!
//! Loading uses `linux-loader`; the checks around it (which format, does it
//! fit) are ours because its errors do not say which of the two went wrong.
//! The GDT, page tables and MP table are written by hand: no maintained
//! crate provides them (Firecracker and Cloud Hypervisor each keep their own).
//!
//! Guest addresses this module reserves are listed in [`layout`]; the
//! caller must also create the in-kernel irqchip before the vCPUs (the
//! local APIC setup needs it) and give KVM its TSS at
//! [`layout::KVM_TSS_ADDRESS`].

mod cpuid;
mod gdt;
pub mod layout;
mod loader;
mod mptable;
mod regs;
mod zero_page;

use kvm_bindings::{kvm_xcr, kvm_xcrs, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestMemoryMmap};

pub use layout::memory_regions;
pub use loader::{load_initrd, load_kernel, InitrdRange, KernelImage, KernelKind};
pub use zero_page::configure_system;

/// What can go wrong while preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file is in no format we know.
    #[error("the kernel is neither an ELF vmlinux nor a bzImage: {0}")]
    NotAKernel(String),
    /// The kernel is a known format, but not one we can enter in 64-bit mode.
    #[error("the kernel cannot be booted in 64-bit mode: {0}")]
    UnsupportedKernel(String),
    /// `linux-loader` refused the kernel after our own checks passed.
    #[error("loading the kernel into guest memory failed: {0}")]
    KernelLoad(#[source] linux_loader::loader::Error),
    /// Something does not fit in guest RAM; `needed` and `have` are bytes.
    #[error(
        "guest memory too small for {what}: it needs {} MiB, the VM has {} MiB",
        mib_up(*.needed),
        mib_up(*.have)
    )]
    MemoryTooSmall {
        /// What did not fit ("the kernel", "the kernel and initrd").
        what: &'static str,
        /// The guest RAM size it would take.
        needed: u64,
        /// The guest RAM size there is.
        have: u64,
    },
    /// The VM was asked for less RAM than any guest can boot in.
    #[error("guest memory of {mib} MiB is below the minimum of {min_mib} MiB")]
    MemoryBelowMinimum {
        /// The size asked for.
        mib: u64,
        /// [`layout::MIN_MEM_MIB`].
        min_mib: u64,
    },
    /// The VM was asked for more RAM than guest physical addresses can hold.
    #[error("guest memory of {mib} MiB is more than a guest can address")]
    MemoryTooLarge {
        /// The size asked for.
        mib: u64,
    },
    /// The host could not reserve the guest's RAM.
    #[error("allocating {mib} MiB of guest memory failed: {source}")]
    GuestMemoryAlloc {
        /// The size asked for.
        mib: u64,
        /// Why the mapping failed.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The host could not create the file that backs the guest's RAM.
    #[error("creating the {mib} MiB memfd for guest memory failed: {source}")]
    GuestMemoryFile {
        /// The size asked for.
        mib: u64,
        /// Why memfd_create or its resize failed.
        #[source]
        source: std::io::Error,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("writing {what} to guest memory failed: {source}")]
    GuestMemory {
        /// The structure ("the zero page", "the MP table", ...).
        what: &'static str,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Reading the kernel or initrd file failed.
    #[error("reading {what} failed: {source}")]
    Io {
        /// The file ("the kernel", "the initrd").
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is larger than the space the kernel lets it use.
    #[error(
        "the initrd ({} MiB) does not fit below the kernel's initrd limit of {limit:#x} \
         above the kernel",
        mib_up(*.size)
    )]
    InitrdTooLarge {
        /// The initrd's size in bytes.
        size: u64,
        /// The highest address the initrd may end at.
        limit: u64,
    },
    /// The command line cannot be turned into a C string.
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is longer than the kernel (or our buffer) accepts.
    #[error("the kernel command line is {len} bytes long; at most {max} are accepted")]
    CmdlineTooLong {
        /// Its length without the terminating NUL.
        len: usize,
        /// The limit without the terminating NUL.
        max: usize,
    },
    /// The vCPU count is outside what the boot tables can describe.
    #[error("a VM needs between 1 and {max} vCPUs, {vcpus} were asked for")]
    InvalidVcpuCount {
        /// The count asked for.
        vcpus: u8,
        /// [`layout::MAX_VCPUS`].
        max: u8,
    },
    /// A vCPU id is not below the VM's vCPU count.
    #[error("vCPU id {id} does not exist in a VM with {vcpus} vCPUs")]
    InvalidVcpuId {
        /// The id.
        id: u8,
        /// The VM's vCPU count.
        vcpus: u8,
    },
    /// A KVM ioctl failed.
    #[error("KVM could not {what}: {source}")]
    Kvm {
        /// What we asked of KVM ("set the vCPU's CPUID", ...).
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A list handed to KVM grew past what its wrapper can hold.
    #[error("building the {what} list for KVM failed: {source}")]
    KvmList {
        /// The list ("boot MSR", "CPUID").
        what: &'static str,
        /// The wrapper's error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM refused the boot value of MSR {index:#x}")]
    MsrRejected {
        /// The first MSR KVM did not set.
        index: u32,
    },
}

/// Bytes to MiB, rounded up so a shortfall never reads as "0 MiB".
fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(layout::MIB)
}

/// Creates the guest's RAM: `mem_mib` MiB laid out by [`memory_regions`],
/// backed by one memfd mapped `MAP_SHARED` (vm-memory's file-backed
/// regions), so a vhost-user backend (virtiofsd) can map the same pages
/// from the descriptor the VMM hands it. Anonymous private memory could not
/// be shared; every device reaches this memory the same way either way.
pub fn guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, BootError> {
    if mem_mib < layout::MIN_MEM_MIB {
        return Err(BootError::MemoryBelowMinimum {
            mib: mem_mib,
            min_mib: layout::MIN_MEM_MIB,
        });
    }
    let size = mem_mib
        .checked_mul(layout::MIB)
        .filter(|size| size.checked_add(layout::HIGH_RAM_START).is_some())
        .ok_or(BootError::MemoryTooLarge { mib: mem_mib })?;
    let file = guest_memory_file(size).map_err(|source| BootError::GuestMemoryFile {
        mib: mem_mib,
        source,
    })?;
    // One file for all regions, each at the offset where the previous ended.
    let file = Arc::new(file);
    let mut offset = 0u64;
    let ranges: Vec<_> = memory_regions(size)
        .into_iter()
        .map(|(addr, len)| {
            let at = FileOffset::from_arc(file.clone(), offset);
            offset += len as u64;
            (addr, len, Some(at))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|source| BootError::GuestMemoryAlloc {
        mib: mem_mib,
        source,
    })
}

/// A memfd of `size` bytes (sparse: pages are allocated as the guest
/// touches them), closed on exec so no helper inherits the guest's RAM.
fn guest_memory_file(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string; the call has no other
    // inputs and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"kestrel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Prepares vCPU `id` of `vcpus` to start in the kernel's 64-bit entry
/// point: CPUID, boot MSRs, GDT/IDT and identity page tables, segment and
/// control registers, FPU, general registers (`rsi` points at the zero
/// page) and the local APIC's LINT0/LINT1 wiring.
///
/// The VM must have its in-kernel irqchip before the vCPU was created.
/// Application processors get the same state; Linux resets them with
/// INIT/SIPI anyway.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    image: &KernelImage,
    id: u8,
    vcpus: u8,
) -> Result<(), BootError> {
    check_vcpu_count(vcpus)?;
    if id >= vcpus {
        return Err(BootError::InvalidVcpuId { id, vcpus });
    }

    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report the CPUID it supports"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    cpuid::normalize(&mut cpuid, id, vcpus, tsc_deadline)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err("set the vCPU's CPUID"))?;
    if let Some(xcr0) = cpuid::initial_xcr0(&cpuid) {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0] = kvm_xcr {
            xcr: 0,
            value: xcr0,
            ..Default::default()
        };
        vcpu.set_xcrs(&xcrs)
            .map_err(kvm_err("set XCR0 to the CPUID's state components"))?;
    }

    let entries = regs::boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|source| BootError::KvmList {
        what: "boot MSR",
        source,
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("set the boot MSRs"))?;
    // KVM_SET_MSRS stops at the first MSR it rejects.
    if let Some(rejected) = entries.get(written) {
        return Err(BootError::MsrRejected {
            index: rejected.index,
        });
    }

    regs::write_boot_tables(mem)?;
    let sregs = vcpu
        .get_sregs()
        .map_err(kvm_err("read the special registers"))?;
    vcpu.set_sregs(&regs::boot_sregs(sregs))
        .map_err(kvm_err("set the special registers"))?;
    vcpu.set_regs(&regs::boot_regs(image.entry))
        .map_err(kvm_err("set the general registers"))?;
    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(kvm_err("set the FPU state"))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(kvm_err("read the local APIC (is the irqchip created?)"))?;
    regs::wire_lint_pins(&mut lapic);
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err("set the local APIC"))?;
    Ok(())
}

/// Refuses vCPU counts the MP table and APIC ids cannot describe.
fn check_vcpu_count(vcpus: u8) -> Result<(), BootError> {
    if vcpus == 0 || vcpus > layout::MAX_VCPUS {
        return Err(BootError::InvalidVcpuCount {
            vcpus,
            max: layout::MAX_VCPUS,
        });
    }
    Ok(())
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { what, source }
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::GuestMemory { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_msr_entry, KVM_MAX_CPUID_ENTRIES};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    fn test_image() -> KernelImage {
        KernelImage {
            entry: GuestAddress(0x0100_0000),
            kind: KernelKind::Elf,
            setup_header: None,
            end: GuestAddress(0x0200_0000),
        }
    }

    /// A KVM VM with an irqchip and one vCPU, or `None` (with the skip of
    /// `test` recorded) where this host has no usable KVM.
    fn kvm_vcpu(test: &str) -> Option<(Kvm, kvm_ioctls::VmFd, VcpuFd)> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                crate::skip(test, &format!("/dev/kvm is not usable here: {e}"));
                return None;
            }
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        Some((kvm, vm, vcpu))
    }

    #[test]
    fn guest_memory_below_minimum_is_refused() {
        let err = guest_memory(layout::MIN_MEM_MIB - 1).unwrap_err();
        assert!(
            matches!(err, BootError::MemoryBelowMinimum { mib, .. } if mib == layout::MIN_MEM_MIB - 1)
        );
        assert!(err.to_string().contains("below the minimum"), "{err}");
    }

    #[test]
    fn guest_memory_has_the_requested_size() {
        for mib in [64, 128, 512, 3584, 4096] {
            let mem = guest_memory(mib).unwrap();
            let total: u64 = mem.iter().map(|region| region.len()).sum();
            assert_eq!(total, mib * layout::MIB, "{mib} MiB");
        }
    }

    #[test]
    fn guest_memory_is_one_shared_memfd_a_backend_can_map() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;

        let mem = guest_memory(4096).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2, "below the MMIO hole and above 4 GiB");
        let file = regions[0].file_offset().unwrap().file();
        let mut offset = 0;
        for region in &regions {
            let at = region.file_offset().expect("file-backed");
            assert!(std::ptr::eq(at.file(), file), "one file for all regions");
            assert_eq!(at.start(), offset);
            offset += region.len();
        }
        // What the guest writes is in the file, where another process that
        // maps it (the backend) finds it.
        let high = regions[1].start_addr();
        mem.write_slice(b"guest", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"high", high).unwrap();
        let mut seen = [0u8; 5];
        file.read_exact_at(&mut seen, 0x1000).unwrap();
        assert_eq!(&seen, b"guest");
        let mut seen = [0u8; 4];
        file.read_exact_at(&mut seen, regions[0].len()).unwrap();
        assert_eq!(&seen, b"high");
    }

    #[test]
    fn guest_memory_beyond_the_address_space_is_refused() {
        assert!(matches!(
            guest_memory(u64::MAX / 1024),
            Err(BootError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn memory_too_small_message_speaks_mib() {
        let err = BootError::MemoryTooSmall {
            what: "the kernel and initrd",
            needed: 200 * layout::MIB + 1,
            have: 128 * layout::MIB,
        };
        assert_eq!(
            err.to_string(),
            "guest memory too small for the kernel and initrd: it needs 201 MiB, the VM has 128 MiB"
        );
    }

    #[test]
    fn setup_vcpu_programs_long_mode_entry_state() {
        let Some((kvm, _vm, vcpu)) = kvm_vcpu("setup_vcpu_programs_long_mode_entry_state") else {
            return;
        };
        let mem = guest_memory(128).unwrap();
        let image = test_image();
        setup_vcpu(&kvm, &vcpu, &mem, &image, 0, 2).unwrap();

        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x0100_0000);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 0x2);

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_ne!(sregs.cr0 & regs::X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & regs::X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & regs::X86_CR4_PAE, 0);
        assert_eq!(
            sregs.efer & (regs::EFER_LME | regs::EFER_LMA),
            regs::EFER_LME | regs::EFER_LMA
        );
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);

        let fpu = vcpu.get_fpu().unwrap();
        assert_eq!(fpu.fcw, 0x37f);
        // KVM_GET_FPU does not report MXCSR; the XSAVE area's legacy part
        // holds it at byte 24.
        let xsave = vcpu.get_xsave().unwrap();
        assert_eq!(xsave.region[6], 0x1f80, "MXCSR");

        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .expect("leaf 1");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(leaf1.ebx >> 24, 0, "initial APIC id");

        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: regs::MSR_IA32_MISC_ENABLE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        assert_ne!(msrs.as_slice()[0].data & regs::MISC_ENABLE_FAST_STRING, 0);

        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((regs::lapic_reg(&lapic, regs::APIC_LVT0) >> 8) & 0x7, 0x7);
        assert_eq!((regs::lapic_reg(&lapic, regs::APIC_LVT1) >> 8) & 0x7, 0x4);
    }

    #[test]
    fn setup_vcpu_rejects_an_id_beyond_the_vcpu_count() {
        let Some((kvm, _vm, vcpu)) = kvm_vcpu("setup_vcpu_rejects_an_id_beyond_the_vcpu_count")
        else {
            return;
        };
        let mem = guest_memory(64).unwrap();
        let err = setup_vcpu(&kvm, &vcpu, &mem, &test_image(), 2, 2).unwrap_err();
        assert!(matches!(err, BootError::InvalidVcpuId { id: 2, vcpus: 2 }));
        let err = setup_vcpu(&kvm, &vcpu, &mem, &test_image(), 0, 0).unwrap_err();
        assert!(matches!(err, BootError::InvalidVcpuCount { vcpus: 0, .. }));
    }
}
