//! The boot GDT: flat 64-bit code and data segments and a TSS, and their
//! decoding into the `kvm_segment`s the vCPU's segment registers take.
//!
//! KVM wants both the descriptor in guest memory (the guest reloads
//! segments from it) and the decoded form in `kvm_sregs` (the hidden part
//! of each segment register); both come from the same `u64` here.

use kvm_bindings::kvm_segment;

/// Access/flags word of a 64-bit code segment: present, DPL 0, code,
/// execute/read, accessed; long mode, 4 KiB granularity.
pub(super) const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags word of a data segment: present, DPL 0, data, read/write,
/// accessed; 32-bit default size, 4 KiB granularity.
pub(super) const DATA_FLAGS: u16 = 0xc093;
/// Access/flags word of a TSS: present, busy 64-bit TSS, 4 KiB granularity.
pub(super) const TSS_FLAGS: u16 = 0x808b;

/// GDT index of the code segment (selector 0x08).
pub(super) const CODE_INDEX: u8 = 1;
/// GDT index of the data segment (selector 0x10).
pub(super) const DATA_INDEX: u8 = 2;
/// GDT index of the TSS (selector 0x18).
pub(super) const TSS_INDEX: u8 = 3;

/// The boot GDT: null, code, data, TSS.
pub(super) const BOOT_GDT: [u64; 4] = [
    entry(0, 0, 0),
    entry(CODE64_FLAGS, 0, 0xfffff),
    entry(DATA_FLAGS, 0, 0xfffff),
    entry(TSS_FLAGS, 0, 0xfffff),
];

/// Encodes a segment descriptor from its access/flags word (access byte in
/// bits 0..8, flags nibble in bits 12..16), base and 20-bit limit.
pub(super) const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes GDT entry `index` into the form KVM loads into a segment register.
pub(super) fn segment(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdt_holds_null_code_data_and_tss() {
        assert_eq!(BOOT_GDT[0], 0);
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_decodes_to_flat_long_mode_code() {
        let cs = segment(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(cs.selector, 0x08);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!(cs.type_, 0xb);
        assert_eq!((cs.present, cs.s, cs.dpl), (1, 1, 0));
        assert_eq!((cs.l, cs.db, cs.g), (1, 0, 1));
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn data_segment_decodes_to_flat_read_write_data() {
        let ds = segment(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!(ds.selector, 0x10);
        assert_eq!((ds.base, ds.limit), (0, 0xffff_ffff));
        assert_eq!(ds.type_, 0x3);
        assert_eq!((ds.present, ds.s, ds.dpl), (1, 1, 0));
        assert_eq!((ds.l, ds.db, ds.g), (0, 1, 1));
    }

    #[test]
    fn tss_decodes_to_a_busy_system_segment() {
        let tr = segment(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!(tr.selector, 0x18);
        assert_eq!((tr.base, tr.limit), (0, 0xffff_ffff));
        assert_eq!(tr.type_, 0xb);
        assert_eq!((tr.present, tr.s, tr.g), (1, 0, 1));
    }

    #[test]
    fn null_entry_decodes_to_an_unusable_segment() {
        let null = segment(BOOT_GDT[0], 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn base_and_limit_survive_a_round_trip() {
        let seg = segment(entry(0x4093, 0x1234_5678, 0xabcde), 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.db, 1);
        assert_eq!(seg.g, 0);
    }
}
