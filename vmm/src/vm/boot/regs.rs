//! A vCPU's state at the kernel's 64-bit entry point: identity page tables,
//! GDT/IDT, segment and control registers, general registers, FPU, boot
//! MSRs and the local APIC's LINT pins (boot protocol, "64-bit boot
//! protocol": paging on, flat segments, `rsi` = zero page).

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use super::{mem_err, BootError};

/// CR0: protected mode.
pub(super) const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type; hard-wired to 1 on every CPU since the 486.
pub(super) const X86_CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub(super) const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension, required for long mode.
pub(super) const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub(super) const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub(super) const EFER_LMA: u64 = 1 << 10;

/// RFLAGS bit 1 is reserved and always reads as 1.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// FPU control word after FNINIT: all exceptions masked, extended precision.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
/// Entries per 4 KiB page table.
const PT_ENTRIES: u64 = 512;
/// Size of the huge pages the boot page directory maps.
const HUGE_PAGE_SHIFT: u64 = 21;

pub(super) const MSR_IA32_TSC: u32 = 0x10;
pub(super) const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub(super) const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub(super) const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub(super) const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub(super) const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub(super) const MSR_STAR: u32 = 0xc000_0081;
pub(super) const MSR_LSTAR: u32 = 0xc000_0082;
pub(super) const MSR_CSTAR: u32 = 0xc000_0083;
pub(super) const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub(super) const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE: fast string operations (`rep movs`) enabled.
pub(super) const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// MTRRdefType: MTRRs enabled, default memory type write-back.
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

/// Local APIC register offsets of the LINT0 and LINT1 local vector table
/// entries.
pub(super) const APIC_LVT0: usize = 0x350;
pub(super) const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 8..=10).
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;

/// Writes the GDT, the IDT and the identity page tables the entry state
/// refers to. Every vCPU writes the same bytes, so the order does not matter.
pub(super) fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))
        .map_err(mem_err("the boot GDT"))?;
    // One null gate: any exception before the kernel loads its own IDT
    // shuts the guest down instead of running garbage.
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(mem_err("the boot IDT"))?;
    for (addr, table) in page_tables() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(mem_err("the boot page tables"))?;
    }
    Ok(())
}

/// The boot page tables, each with its address: PML4[0] -> PDPT,
/// PDPT[0] -> PD, and PD mapping the first GiB 1:1 with 2 MiB pages. That
/// covers the kernel, the zero page and the command line; the kernel builds
/// its own tables before touching anything else.
fn page_tables() -> [(u64, Vec<u64>); 3] {
    let table = |first: u64| {
        let mut entries = vec![0u64; PT_ENTRIES as usize];
        entries[0] = first;
        entries
    };
    let pd = (0..PT_ENTRIES)
        .map(|i| (i << HUGE_PAGE_SHIFT) | PTE_HUGE | PTE_WRITABLE | PTE_PRESENT)
        .collect();
    [
        (PML4_START, table(PDPTE_START | PTE_WRITABLE | PTE_PRESENT)),
        (PDPTE_START, table(PDE_START | PTE_WRITABLE | PTE_PRESENT)),
        (PDE_START, pd),
    ]
}

/// The special registers for the 64-bit entry, starting from what KVM
/// reported (which keeps its APIC base and interrupt bitmap).
pub(super) fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = gdt::segment(BOOT_GDT[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = gdt::segment(BOOT_GDT[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = gdt::segment(BOOT_GDT[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    // Set outright rather than OR-ed: KVM's reset CR0 has caching disabled.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The general registers: `rip` at the entry point, a stack below the page
/// tables, and `rsi` pointing at the zero page as the protocol requires.
pub(super) fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU in its post-FNINIT state with SSE exceptions masked.
pub(super) fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// The MSRs a BIOS would leave behind: no syscall entry points yet, the TSC
/// at 0, fast strings on, and write-back caching for all memory.
pub(super) fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Wires LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as firmware
/// does for a PC in virtual-wire mode.
pub(super) fn wire_lint_pins(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = lapic_reg(lapic, reg);
        set_lapic_reg(lapic, reg, (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8));
    }
}

/// Reads the 32-bit local APIC register at `offset`.
pub(super) fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (byte, reg) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *byte = *reg as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (reg, byte) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *reg = byte as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::boot::layout::MIB;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_the_first_gib_with_2mib_pages() {
        let mem = mem();
        write_boot_tables(&mem).unwrap();
        let pml4_0: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4_0, PDPTE_START | 0x3);
        let pdpte_0: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte_0, PDE_START | 0x3);
        for i in 0..512u64 {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PDE[{i}]");
        }
        for i in 1..512u64 {
            let pml4: u64 = mem.read_obj(GuestAddress(PML4_START + i * 8)).unwrap();
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + i * 8)).unwrap();
            assert_eq!((pml4, pdpte), (0, 0), "entry {i} maps nothing");
        }
    }

    #[test]
    fn page_tables_replace_stale_entries() {
        let mem = mem();
        mem.write_obj(u64::MAX, GuestAddress(PML4_START + 8))
            .unwrap();
        write_boot_tables(&mem).unwrap();
        let stale: u64 = mem.read_obj(GuestAddress(PML4_START + 8)).unwrap();
        assert_eq!(stale, 0);
    }

    #[test]
    fn gdt_in_guest_memory_matches_the_segment_registers() {
        let mem = mem();
        write_boot_tables(&mem).unwrap();
        let sregs = boot_sregs(kvm_sregs::default());
        for (index, seg) in [(1u64, sregs.cs), (2, sregs.ss), (3, sregs.tr)] {
            let entry: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + index * 8))
                .unwrap();
            let decoded = gdt::segment(entry, index as u8);
            assert_eq!(decoded.selector, seg.selector);
            assert_eq!(decoded.type_, seg.type_);
            assert_eq!(decoded.l, seg.l);
        }
        let null: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START)).unwrap();
        assert_eq!(null, 0);
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn boot_sregs_turn_on_long_mode_with_flat_segments() {
        let sregs = boot_sregs(kvm_sregs {
            cr0: 0x6000_0010, // KVM's reset value: CD | NW | ET
            apic_base: 0xfee0_0900,
            ..Default::default()
        });
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
        }
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!(sregs.apic_base, 0xfee0_0900, "KVM's APIC base is kept");
    }

    #[test]
    fn boot_regs_enter_at_the_kernel_with_the_zero_page_in_rsi() {
        let regs = boot_regs(GuestAddress(0x0100_0000));
        assert_eq!(regs.rip, 0x0100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rflags, 0x2);
    }

    #[test]
    fn boot_fpu_masks_all_exceptions() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_caching() {
        let msrs = boot_msrs();
        let value = |index| msrs.iter().find(|m| m.index == index).map(|m| m.data);
        assert_eq!(value(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(value(MSR_MTRR_DEF_TYPE), Some(0x806));
        for index in [
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value(index), Some(0), "{index:#x}");
        }
    }

    #[test]
    fn lint0_becomes_extint_and_lint1_nmi_keeping_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        // Masked (bit 16), delivery mode "fixed" (0), as after reset.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0700);
        wire_lint_pins(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x0001_0400);
    }
}
