//! The boot-time data the kernel reads from guest memory: the command line,
//! the zero page (`boot_params`: setup header, initrd, e820 map) and the MP
//! table.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header, LOADED_HIGH};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use super::loader::{InitrdRange, KernelImage, HDRS_MAGIC};
use super::{check_vcpu_count, mem_err, mptable, BootError};

/// `boot_flag`: the 0xAA55 boot sector signature.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` for kernels without a setup header.
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// The boot protocol version that introduced `cmdline_size`.
const PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;

/// Writes everything the kernel reads at boot: the command line at
/// [`CMDLINE_START`], the zero page at [`ZERO_PAGE_START`] (the bzImage's
/// setup header or defaults, the command line and initrd, and an e820 map
/// of exactly the RAM outside the legacy area) and the MP table for
/// `vcpus`.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    image: &KernelImage,
    cmdline: &Cmdline,
    initrd: Option<&InitrdRange>,
    vcpus: u8,
) -> Result<(), BootError> {
    // Checked before anything is written, not only when the MP table is.
    check_vcpu_count(vcpus)?;
    let cmdline_len = write_cmdline(mem, image, cmdline)?;

    let mut params = boot_params {
        hdr: image.setup_header.unwrap_or_else(default_setup_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        // The initrd lies in low RAM, below 4 GiB.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let e820 = e820_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(&e820) {
        *slot = *entry;
    }
    // At most three entries: one per side of the legacy area, one high.
    params.e820_entries = e820.len() as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err("the zero page"))?;
    mptable::write(mem, vcpus)
}

/// The setup header for a kernel that brought none (an ELF vmlinux).
fn default_setup_header() -> setup_header {
    setup_header {
        loadflags: LOADED_HIGH,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    }
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; returns its
/// length with the NUL.
fn write_cmdline(
    mem: &GuestMemoryMmap,
    image: &KernelImage,
    cmdline: &Cmdline,
) -> Result<usize, BootError> {
    let cmdline = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = cmdline.as_bytes_with_nul();
    // A bzImage says how long a command line it takes (without the NUL);
    // longer ones would be cut silently.
    let max_with_nul = image
        .setup_header
        .filter(|hdr| hdr.version >= PROTOCOL_CMDLINE_SIZE)
        .map_or(CMDLINE_MAX_SIZE, |hdr| {
            (hdr.cmdline_size as usize).saturating_add(1)
        })
        .min(CMDLINE_MAX_SIZE);
    if bytes.len() > max_with_nul {
        return Err(BootError::CmdlineTooLong {
            len: bytes.len() - 1,
            max: max_with_nul - 1,
        });
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(mem_err("the kernel command line"))?;
    Ok(bytes.len())
}

/// The e820 map: every RAM region, with the low one split around the
/// legacy area [`EBDA_START`]..[`HIMEM_START`] (EBDA, MP table, VGA and
/// BIOS windows).
fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, end: u64| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: E820_RAM,
    };
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        if start < EBDA_START {
            map.push(ram(start, end.min(EBDA_START)));
        }
        let high_start = start.max(HIMEM_START);
        if end > high_start {
            map.push(ram(high_start, end));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use linux_loader::bootparam::XLF_KERNEL_64;

    use super::*;
    use crate::vm::boot::layout::{HIGH_RAM_START, MIB, MMIO_START};
    use crate::vm::boot::loader::tests::{fake_bzimage, fake_elf};
    use crate::vm::boot::{guest_memory, load_initrd, load_kernel};

    fn cmdline(text: &str) -> Cmdline {
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str(text).unwrap();
        cmdline
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    /// Boots the fake ELF in `mib` MiB and returns the zero page.
    fn configure(mib: u64) -> (GuestMemoryMmap, boot_params) {
        let mem = guest_memory(mib).unwrap();
        let image = load_kernel(&mem, &mut Cursor::new(fake_elf())).unwrap();
        configure_system(&mem, &image, &cmdline("console=ttyS0"), None, 1).unwrap();
        let params = zero_page(&mem);
        (mem, params)
    }

    fn e820(params: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = params.e820_table;
        table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    #[test]
    fn e820_covers_exactly_the_ram_below_the_hole() {
        for mib in [64, 128, 512, 3072] {
            let (_, params) = configure(mib);
            assert_eq!(
                e820(&params),
                vec![
                    (0, EBDA_START, E820_RAM),
                    (HIMEM_START, mib * MIB - HIMEM_START, E820_RAM),
                ],
                "{mib} MiB"
            );
        }
    }

    #[test]
    fn e820_continues_at_4gib_and_never_covers_the_hole() {
        for mib in [3584, 4096] {
            let (_, params) = configure(mib);
            let map = e820(&params);
            assert_eq!(
                map,
                vec![
                    (0, EBDA_START, E820_RAM),
                    (HIMEM_START, MMIO_START - HIMEM_START, E820_RAM),
                    (HIGH_RAM_START, mib * MIB - MMIO_START, E820_RAM),
                ],
                "{mib} MiB"
            );
            let total: u64 = map.iter().map(|(_, size, _)| size).sum();
            assert_eq!(total, mib * MIB - (HIMEM_START - EBDA_START));
            for (addr, size, _) in map {
                assert!(addr + size <= MMIO_START || addr >= HIGH_RAM_START);
            }
        }
    }

    #[test]
    fn elf_zero_page_carries_the_magic_and_loader_defaults() {
        let (_, params) = configure(128);
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
        assert_ne!(hdr.loadflags & LOADED_HIGH, 0);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, "console=ttyS0".len() as u32 + 1);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));
    }

    #[test]
    fn bzimage_zero_page_keeps_the_kernels_setup_header() {
        let mem = guest_memory(128).unwrap();
        let image = load_kernel(&mem, &mut Cursor::new(fake_bzimage(XLF_KERNEL_64))).unwrap();
        configure_system(&mem, &image, &cmdline("quiet"), None, 2).unwrap();
        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.code32_start }, HIMEM_START as u32);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    }

    #[test]
    fn zero_page_points_at_the_initrd() {
        let mem = guest_memory(256).unwrap();
        let image = load_kernel(&mem, &mut Cursor::new(fake_elf())).unwrap();
        let initrd = load_initrd(&mem, &image, &mut Cursor::new(vec![7u8; 12_345])).unwrap();
        configure_system(&mem, &image, &cmdline("quiet"), Some(&initrd), 1).unwrap();
        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.ramdisk_image }, initrd.addr.0 as u32);
        assert_eq!({ hdr.ramdisk_size }, 12_345);
    }

    #[test]
    fn cmdline_is_nul_terminated_at_cmdline_start() {
        let (mem, _) = configure(64);
        let mut bytes = vec![0xffu8; "console=ttyS0".len() + 1];
        mem.read_slice(&mut bytes, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(bytes, b"console=ttyS0\0");
    }

    #[test]
    fn cmdline_longer_than_the_bzimage_accepts_is_refused() {
        let mem = guest_memory(128).unwrap();
        let image = load_kernel(&mem, &mut Cursor::new(fake_bzimage(XLF_KERNEL_64))).unwrap();
        // The fake bzImage takes 0x7ff bytes.
        let long = "x".repeat(0x800);
        let err = configure_system(&mem, &image, &cmdline(&long), None, 1).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::CmdlineTooLong {
                    len: 0x800,
                    max: 0x7ff
                }
            ),
            "{err}"
        );
        let fits = "x".repeat(0x7ff);
        configure_system(&mem, &image, &cmdline(&fits), None, 1).unwrap();
    }

    #[test]
    fn configure_system_writes_the_mp_table() {
        let (mem, _) = configure(64);
        let signature: [u8; 4] = mem.read_obj(GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&signature, b"_MP_");
    }

    #[test]
    fn configure_system_refuses_zero_vcpus() {
        let mem = guest_memory(64).unwrap();
        let image = load_kernel(&mem, &mut Cursor::new(fake_elf())).unwrap();
        let err = configure_system(&mem, &image, &cmdline("quiet"), None, 0).unwrap_err();
        assert!(matches!(err, BootError::InvalidVcpuCount { .. }), "{err}");
    }
}
