//! The guest physical address map: where RAM is, where the boot structures
//! go, and the MMIO hole the VMM's devices live in.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), IDT at 0x520
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack pointer (grows down)
//! 0x0000_9000  PML4, PDPTE at 0xa000, PDE at 0xb000
//! 0x0002_0000  kernel command line (CMDLINE_MAX_SIZE)
//! 0x0009_fc00  MP table (EBDA; not RAM in the e820 map up to 1 MiB)
//! 0x0010_0000  HIMEM_START: bzImage load address; RAM from here on
//! 0x0100_0000  vmlinux load address (its ELF physical addresses)
//! ...          initrd, as high as allowed in low RAM
//! 0xd000_0000  MMIO_START: 32-bit MMIO hole, devices from here up
//! 0xfec0_0000  I/O APIC, 0xfee0_0000 local APIC, 0xfffb_d000 KVM TSS
//! 4 GiB        HIGH_RAM_START: RAM beyond what fits below the hole
//! ```

use vm_memory::GuestAddress;

// The boot module is x86_64-only: usize is 64 bits wide, so the u64 <-> usize
// casts in it are lossless.
const _: () = assert!(usize::BITS == u64::BITS);

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// Start of the 32-bit MMIO hole (4 GiB - 768 MiB); guest RAM stops here.
pub const MMIO_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO hole: everything from [`MMIO_START`] to 4 GiB.
/// Devices allocate upward from [`MMIO_START`]; the top holds the
/// architectural windows ([`IOAPIC_START`], [`APIC_START`],
/// [`KVM_TSS_ADDRESS`]).
pub const MMIO_SIZE: u64 = HIGH_RAM_START - MMIO_START;
/// Where RAM that does not fit below the hole continues.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// First GSI for virtio-mmio devices; 0..=4 are the PIT, keyboard, cascade
/// and serial ports.
pub const IRQ_BASE: u32 = 5;
/// Last GSI: KVM's in-kernel I/O APIC has 24 pins.
pub const IRQ_MAX: u32 = 23;

/// The I/O APIC's MMIO window (KVM's in-kernel one).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO window.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for its real-mode TSS on Intel
/// (`VmFd::set_tss_address`); inside the hole, so never RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// The boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (a single null gate).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`boot_params`); `rsi` points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial `rsp`/`rbp`; the stack grows down below it.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The boot PML4 (`cr3`).
pub const PML4_START: u64 = 0x9000;
/// The boot page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// The boot page directory: 512 2 MiB pages identity-mapping the first GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// The room for the command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area; conventional RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// The MP floating pointer, followed by the MP configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the legacy area below 1 MiB; RAM resumes here in the e820 map.
pub const HIMEM_START: u64 = 0x10_0000;

/// The initrd limit for kernels whose setup header does not give one.
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Guest page size, the initrd's alignment.
pub const PAGE_SIZE: u64 = 0x1000;

/// The least RAM [`super::guest_memory`] accepts: a kernel loads at 16 MiB
/// and decompresses into the next 16, and needs room to run after that.
pub const MIN_MEM_MIB: u64 = kestrel_guest_image::VmShape::MIN_MEMORY_MIB as u64;
/// The most vCPUs: APIC ids are 8 bits, 0xff is broadcast, and the I/O
/// APIC takes the id after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

/// Guest RAM regions for `mem_size` bytes: one region from 0 below
/// [`MMIO_START`], the rest from [`HIGH_RAM_START`] up.
pub fn memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size == 0 {
        return Vec::new();
    }
    let low = mem_size.min(MMIO_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > low {
        regions.push((GuestAddress(HIGH_RAM_START), (mem_size - low) as usize));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_below_the_hole_is_one_region_from_zero() {
        for size in [64 * MIB, 128 * MIB, 512 * MIB, MMIO_START] {
            assert_eq!(
                memory_regions(size),
                vec![(GuestAddress(0), size as usize)],
                "{size:#x}"
            );
        }
    }

    #[test]
    fn memory_past_the_hole_continues_at_4gib() {
        for size in [3584 * MIB, 4096 * MIB, 8192 * MIB] {
            let regions = memory_regions(size);
            assert_eq!(
                regions,
                vec![
                    (GuestAddress(0), MMIO_START as usize),
                    (GuestAddress(HIGH_RAM_START), (size - MMIO_START) as usize),
                ],
                "{size:#x}"
            );
        }
    }

    #[test]
    fn no_region_overlaps_the_mmio_hole() {
        for size in [MIB, 3 * 1024 * MIB, MMIO_START + 1, 16 * 1024 * MIB] {
            for (start, len) in memory_regions(size) {
                let end = start.0 + len as u64;
                assert!(
                    end <= MMIO_START || start.0 >= HIGH_RAM_START,
                    "{size:#x}: [{:#x}, {end:#x})",
                    start.0
                );
            }
        }
    }

    #[test]
    fn zero_memory_has_no_regions() {
        assert!(memory_regions(0).is_empty());
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, BOOT_GDT_START + 4 * 8),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (ZERO_PAGE_START, ZERO_PAGE_START + PAGE_SIZE),
            (BOOT_STACK_POINTER - 0x800, BOOT_STACK_POINTER),
            (PML4_START, PML4_START + PAGE_SIZE),
            (PDPTE_START, PDPTE_START + PAGE_SIZE),
            (PDE_START, PDE_START + PAGE_SIZE),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, HIMEM_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
