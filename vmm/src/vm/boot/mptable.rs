//! The Intel MultiProcessor Specification 1.4 table: how Linux learns about
//! the vCPUs, the I/O APIC and the ISA interrupt wiring without ACPI.
//!
//! The floating pointer sits at [`MPTABLE_START`] in the EBDA, where Linux
//! scans for it; the configuration table follows it directly. With many
//! vCPUs the table runs past 0xa0000, which is still guest RAM and, like
//! the whole of [`MPTABLE_START`]..[`HIMEM_START`], absent from the e820
//! map, so the guest never reuses it.

use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, HIMEM_START, IOAPIC_START, IRQ_MAX, MAX_VCPUS, MPTABLE_START};
use super::{check_vcpu_count, mem_err, BootError};

const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// Specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
const MPC_OEM: [u8; 8] = *b"KESTREL ";
const MPC_PRODUCT_ID: [u8; 12] = *b"KVM VMM     ";
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";
const BUS_ID_ISA: u8 = 0;

/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
/// I/O APIC entry flag.
const MPC_APIC_USABLE: u8 = 1 << 0;
/// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus".
const MP_IRQ_DEFAULT: u16 = 0;
/// Local interrupt destination "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

/// KVM's local APIC and I/O APIC versions.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature (family 6) and feature flags (FPU, APIC) of each
/// processor entry; Linux reads the real ones from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | (1 << 0);

/// The MP floating pointer structure.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    /// Length in 16-byte paragraphs.
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

/// The MP configuration table header.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

/// An I/O interrupt (`MpcIntsrc`) or local interrupt (`MpcLintsrc`)
/// assignment: the two share one layout.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// The sizes the specification gives; with them, none of the structs has
// padding.
const _: () = assert!(size_of::<MpfIntel>() == 16);
const _: () = assert!(size_of::<MpcTable>() == 44);
const _: () = assert!(size_of::<MpcCpu>() == 20);
const _: () = assert!(size_of::<MpcBus>() == 8);
const _: () = assert!(size_of::<MpcIoapic>() == 8);
const _: () = assert!(size_of::<MpcIntsrc>() == 8);

// The largest table still ends below 1 MiB, inside the area the e820 map
// leaves out.
const _: () = assert!(
    MPTABLE_START
        + (size_of::<MpfIntel>()
            + size_of::<MpcTable>()
            + size_of::<MpcCpu>() * MAX_VCPUS as usize
            + size_of::<MpcBus>()
            + size_of::<MpcIoapic>()
            + size_of::<MpcIntsrc>() * (IRQ_MAX as usize + 1 + 2)) as u64
        <= HIMEM_START
);

// SAFETY: plain `repr(C)` integers and byte arrays without padding (sizes
// asserted above): every byte pattern is a valid value.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as for `MpfIntel`.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as for `MpfIntel`.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as for `MpfIntel`.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as for `MpfIntel`.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as for `MpfIntel`.
unsafe impl ByteValued for MpcIntsrc {}

/// Writes the MP floating pointer and configuration table for `vcpus`.
pub(super) fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    check_vcpu_count(vcpus)?;
    let table_addr = MPTABLE_START + size_of::<MpfIntel>() as u64;
    let table = config_table(vcpus);

    let mut mpf = MpfIntel {
        signature: MPF_SIGNATURE,
        physptr: table_addr as u32,
        length: 1,
        specification: MP_SPEC_REV,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice());

    mem.write_obj(mpf, GuestAddress(MPTABLE_START))
        .map_err(mem_err("the MP floating pointer"))?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(mem_err("the MP table"))?;
    Ok(())
}

/// The configuration table: header and entries.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    for id in 0..vcpus {
        let boot = if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        let cpu = MpcCpu {
            type_: MP_PROCESSOR,
            apicid: id,
            apicver: LAPIC_VERSION,
            cpuflag: CPU_ENABLED | boot,
            cpufeature: CPU_SIGNATURE,
            featureflag: CPU_FEATURES,
            reserved: [0; 2],
        };
        entries.extend_from_slice(cpu.as_slice());
    }
    let bus = MpcBus {
        type_: MP_BUS,
        busid: BUS_ID_ISA,
        bustype: BUS_TYPE_ISA,
    };
    entries.extend_from_slice(bus.as_slice());
    let ioapic = MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_START as u32,
    };
    entries.extend_from_slice(ioapic.as_slice());
    // ISA IRQ n arrives on I/O APIC pin n, as KVM's default GSI routing
    // delivers it; pins past 15 carry the virtio-mmio devices' GSIs.
    for irq in 0..=IRQ_MAX as u8 {
        let intsrc = MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_INT,
            irqflag: MP_IRQ_DEFAULT,
            srcbus: BUS_ID_ISA,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        entries.extend_from_slice(intsrc.as_slice());
    }
    for (irqtype, dstapic, lint) in [(MP_EXTINT, 0, 0), (MP_NMI, ALL_LOCAL_APICS, 1)] {
        let lintsrc = MpcIntsrc {
            type_: MP_LINTSRC,
            irqtype,
            irqflag: MP_IRQ_DEFAULT,
            srcbus: BUS_ID_ISA,
            srcbusirq: 0,
            dstapic,
            dstirq: lint,
        };
        entries.extend_from_slice(lintsrc.as_slice());
    }

    let length = size_of::<MpcTable>() + entries.len();
    let mut header = MpcTable {
        signature: MPC_SIGNATURE,
        // At most MAX_VCPUS entries of 20 bytes: well below 64 KiB.
        length: length as u16,
        spec: MP_SPEC_REV,
        oem: MPC_OEM,
        productid: MPC_PRODUCT_ID,
        oemptr: 0,
        lapic: APIC_START as u32,
        ..Default::default()
    };
    header.checksum = checksum(&[header.as_slice(), &entries].concat());
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&entries);
    table
}

/// The byte that makes `bytes` (whose checksum byte is still 0) sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::boot::layout::MIB;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap()
    }

    fn sum(mem: &GuestMemoryMmap, addr: u64, len: usize) -> u8 {
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// The configuration table's entries, by type, read back from memory.
    fn entries(mem: &GuestMemoryMmap) -> Vec<(u8, Vec<u8>)> {
        let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        let header: MpcTable = mem.read_obj(GuestAddress(u64::from(mpf.physptr))).unwrap();
        let mut addr = u64::from(mpf.physptr) + size_of::<MpcTable>() as u64;
        let end = u64::from(mpf.physptr) + u64::from(header.length);
        let mut found = Vec::new();
        while addr < end {
            let type_: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
            let len = if type_ == MP_PROCESSOR { 20 } else { 8 };
            let mut bytes = vec![0u8; len];
            mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            found.push((type_, bytes));
            addr += len as u64;
        }
        assert_eq!(addr, end, "entries end where the header says");
        found
    }

    #[test]
    fn checksums_make_both_structures_sum_to_zero() {
        for vcpus in [1, 2, 4, 37, MAX_VCPUS] {
            let mem = mem();
            write(&mem, vcpus).unwrap();
            let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
            assert_eq!(mpf.signature, *b"_MP_");
            assert_eq!((mpf.length, mpf.specification), (1, 4));
            assert_eq!(sum(&mem, MPTABLE_START, 16), 0, "{vcpus} vCPUs");
            let header: MpcTable = mem.read_obj(GuestAddress(u64::from(mpf.physptr))).unwrap();
            assert_eq!(header.signature, *b"PCMP");
            assert_eq!(header.spec, 4);
            assert_eq!(header.lapic, 0xfee0_0000);
            assert_eq!(
                sum(&mem, u64::from(mpf.physptr), usize::from(header.length)),
                0,
                "{vcpus} vCPUs"
            );
        }
    }

    #[test]
    fn entry_counts_match_the_vcpus() {
        for vcpus in [1, 3, 16] {
            let mem = mem();
            write(&mem, vcpus).unwrap();
            let entries = entries(&mem);
            let count = |t| entries.iter().filter(|(type_, _)| *type_ == t).count();
            assert_eq!(count(MP_PROCESSOR), usize::from(vcpus));
            assert_eq!(count(MP_BUS), 1);
            assert_eq!(count(MP_IOAPIC), 1);
            assert_eq!(count(MP_INTSRC), 24);
            assert_eq!(count(MP_LINTSRC), 2);
        }
    }

    #[test]
    fn processors_are_numbered_from_the_boot_cpu() {
        let mem = mem();
        write(&mem, 3).unwrap();
        let cpus: Vec<_> = entries(&mem)
            .into_iter()
            .filter(|(t, _)| *t == MP_PROCESSOR)
            .map(|(_, b)| (b[1], b[3]))
            .collect();
        assert_eq!(
            cpus,
            vec![
                (0, CPU_ENABLED | CPU_BOOTPROCESSOR),
                (1, CPU_ENABLED),
                (2, CPU_ENABLED)
            ]
        );
    }

    #[test]
    fn ioapic_takes_the_id_after_the_last_vcpu() {
        let mem = mem();
        write(&mem, 4).unwrap();
        let (_, ioapic) = entries(&mem)
            .into_iter()
            .find(|(t, _)| *t == MP_IOAPIC)
            .unwrap();
        assert_eq!(&ioapic[1..4], &[4, 0x11, MPC_APIC_USABLE]);
        assert_eq!(ioapic[4..8], 0xfec0_0000_u32.to_le_bytes());
    }

    #[test]
    fn isa_irqs_arrive_on_the_same_ioapic_pins() {
        let mem = mem();
        write(&mem, 2).unwrap();
        let routes: Vec<_> = entries(&mem)
            .into_iter()
            .filter(|(t, _)| *t == MP_INTSRC)
            .map(|(_, b)| (b[1], b[4], b[5], b[6], b[7]))
            .collect();
        let expected: Vec<_> = (0..24)
            .map(|irq| (MP_INT, BUS_ID_ISA, irq, 2, irq))
            .collect();
        assert_eq!(routes, expected);
    }

    #[test]
    fn local_interrupts_are_extint_on_lint0_and_nmi_on_lint1() {
        let mem = mem();
        write(&mem, 2).unwrap();
        let lints: Vec<_> = entries(&mem)
            .into_iter()
            .filter(|(t, _)| *t == MP_LINTSRC)
            .map(|(_, b)| (b[1], b[6], b[7]))
            .collect();
        assert_eq!(lints, vec![(MP_EXTINT, 0, 0), (MP_NMI, 0xff, 1)]);
    }

    #[test]
    fn zero_or_too_many_vcpus_are_refused() {
        let mem = mem();
        for vcpus in [0, MAX_VCPUS + 1] {
            assert!(matches!(
                write(&mem, vcpus),
                Err(BootError::InvalidVcpuCount { .. })
            ));
        }
    }

    #[test]
    fn largest_table_ends_below_1mib() {
        let table = config_table(MAX_VCPUS);
        let end = MPTABLE_START + size_of::<MpfIntel>() as u64 + table.len() as u64;
        assert!(end <= HIMEM_START, "ends at {end:#x}");
    }
}
