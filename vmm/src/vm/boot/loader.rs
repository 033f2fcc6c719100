//! Loading the kernel and the initrd into guest RAM.
//!
//! `linux-loader` copies the images; before calling it we read the headers
//! ourselves to tell "not a kernel" from "a kernel that does not fit", which
//! its errors do not distinguish, and to refuse kernels without a 64-bit
//! entry point before anything is written.

use std::io::{self, Read, Seek, SeekFrom};
use std::mem::size_of;

use linux_loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_X86_64, PT_LOAD,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    ReadVolatile,
};

use super::layout::{DEFAULT_INITRD_ADDR_MAX, HIMEM_START, PAGE_SIZE};
use super::{mem_err, BootError};

/// The kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An uncompressed `vmlinux` ELF, loaded at its physical addresses.
    Elf,
    /// A bzImage: the compressed kernel behind its real-mode setup code.
    BzImage,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// The 64-bit entry point (`rip` at boot).
    pub entry: GuestAddress,
    /// The format it came in.
    pub kind: KernelKind,
    /// The bzImage's setup header (the zero page starts from it); `None`
    /// for an ELF.
    pub setup_header: Option<setup_header>,
    /// The first byte after the memory the kernel occupies once running:
    /// the end of its ELF segments, or for a bzImage the end of the area it
    /// decompresses into. The initrd goes above it.
    pub end: GuestAddress,
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRange {
    /// Its first byte, page-aligned.
    pub addr: GuestAddress,
    /// Its length in bytes.
    pub size: usize,
}

/// The 64-bit entry point of a bzImage, relative to where its protected
/// mode code is loaded (boot protocol 2.12+, `XLF_KERNEL_64`).
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage file.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// The `HdrS` magic of the setup header's `header` field.
pub(super) const HDRS_MAGIC: u32 = 0x5372_6448;
/// Offset of the `HdrS` magic in a bzImage file.
const HDRS_OFFSET: usize = 0x202;
/// Size of a real-mode setup sector.
const SECTOR_SIZE: u64 = 512;
/// A setup header with `setup_sects == 0` means this many sectors.
const DEFAULT_SETUP_SECTS: u64 = 4;

/// Boot protocol versions that introduced the fields we read.
const PROTOCOL_INITRD_ADDR_MAX: u16 = 0x0203;
const PROTOCOL_INIT_SIZE: u16 = 0x020a;
const PROTOCOL_XLOADFLAGS: u16 = 0x020c;

/// Loads a `vmlinux` ELF or a bzImage into `mem`.
///
/// An ELF goes to its segments' physical addresses and is entered at its
/// ELF entry (`startup_64`); a bzImage goes to `code32_start` (1 MiB) and is
/// entered 0x200 bytes later. A file that is neither is
/// [`BootError::NotAKernel`]; a kernel that does not fit is
/// [`BootError::MemoryTooSmall`].
pub fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    kernel: &mut F,
) -> Result<KernelImage, BootError> {
    let prefix = read_prefix(kernel, SETUP_HEADER_OFFSET + size_of::<setup_header>())?;
    let image = if prefix.starts_with(ELFMAG) {
        load_elf(mem, kernel, &prefix)?
    } else if prefix.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(&HDRS_MAGIC.to_le_bytes()[..]) {
        load_bzimage(mem, kernel, &prefix)?
    } else {
        return Err(BootError::NotAKernel(
            "it has no ELF magic at offset 0 and no \"HdrS\" setup header at offset 0x202".into(),
        ));
    };
    tracing::debug!(
        kind = ?image.kind,
        entry = image.entry.0,
        end = image.end.0,
        "kernel loaded"
    );
    Ok(image)
}

fn load_elf<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    kernel: &mut F,
    prefix: &[u8],
) -> Result<KernelImage, BootError> {
    let ehdr: Elf64_Ehdr = from_bytes(prefix)
        .ok_or_else(|| BootError::NotAKernel("its ELF header is cut off".into()))?;
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64
        || ehdr.e_ident[EI_DATA] != ELFDATA2LSB
        || ehdr.e_machine != EM_X86_64
    {
        return Err(BootError::UnsupportedKernel(format!(
            "it is an ELF file, but not a little-endian x86_64 one (class {}, machine {})",
            ehdr.e_ident[EI_CLASS], ehdr.e_machine
        )));
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(BootError::NotAKernel(format!(
            "its ELF program headers are {} bytes, not {}",
            ehdr.e_phentsize,
            size_of::<Elf64_Phdr>()
        )));
    }

    let mut table = vec![0u8; usize::from(ehdr.e_phnum) * size_of::<Elf64_Phdr>()];
    kernel
        .seek(SeekFrom::Start(ehdr.e_phoff))
        .and_then(|_| kernel.read_exact(&mut table))
        .map_err(|e| truncated_or_io(e, "its ELF program headers are cut off"))?;
    let mut end = None;
    for phdr in table
        .chunks_exact(size_of::<Elf64_Phdr>())
        .filter_map(from_bytes::<Elf64_Phdr>)
        .filter(|phdr| phdr.p_type == PT_LOAD)
    {
        let len = phdr.p_memsz.max(phdr.p_filesz);
        let seg_end = phdr.p_paddr.checked_add(len).ok_or_else(|| {
            BootError::NotAKernel(format!(
                "an ELF segment at {:#x} runs past the end of the address space",
                phdr.p_paddr
            ))
        })?;
        if !fits_in_ram(mem, phdr.p_paddr, len) {
            return Err(BootError::MemoryTooSmall {
                what: "the kernel",
                needed: seg_end,
                have: ram_size(mem),
            });
        }
        end = end.max(Some(seg_end));
    }
    let end =
        end.ok_or_else(|| BootError::NotAKernel("the ELF file has no loadable segments".into()))?;

    let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::KernelLoad)?;
    Ok(KernelImage {
        entry: loaded.kernel_load,
        kind: KernelKind::Elf,
        setup_header: None,
        end: GuestAddress(end),
    })
}

fn load_bzimage<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    kernel: &mut F,
    prefix: &[u8],
) -> Result<KernelImage, BootError> {
    let hdr: setup_header = prefix
        .get(SETUP_HEADER_OFFSET..)
        .and_then(from_bytes)
        .ok_or_else(|| BootError::NotAKernel("its bzImage setup header is cut off".into()))?;
    // Copied out: fields of the packed header cannot be borrowed.
    let (version, loadflags, xloadflags) = (hdr.version, hdr.loadflags, hdr.xloadflags);
    if version < PROTOCOL_XLOADFLAGS
        || loadflags & LOADED_HIGH == 0
        || xloadflags & XLF_KERNEL_64 == 0
    {
        return Err(BootError::UnsupportedKernel(format!(
            "the bzImage has no 64-bit entry point (boot protocol {version:#x}, \
             loadflags {loadflags:#x}, xloadflags {xloadflags:#x})"
        )));
    }

    let file_size = kernel
        .seek(SeekFrom::End(0))
        .map_err(|source| BootError::Io {
            what: "the kernel",
            source,
        })?;
    let setup_sects = match u64::from(hdr.setup_sects) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    let payload = file_size
        .checked_sub((setup_sects + 1) * SECTOR_SIZE)
        .ok_or_else(|| {
            BootError::NotAKernel("the bzImage is shorter than its setup sectors".into())
        })?;
    let load = u64::from(hdr.code32_start);
    // The kernel decompresses itself to `pref_address` (or its load address
    // rounded up) and needs `init_size` bytes there.
    let runtime_end = if version >= PROTOCOL_INIT_SIZE {
        hdr.pref_address
            .max(load)
            .saturating_add(u64::from(hdr.init_size))
    } else {
        0
    };
    let load_end = load.saturating_add(payload);
    let end = load_end.max(runtime_end);
    if !fits_in_ram(mem, load, end - load) {
        return Err(BootError::MemoryTooSmall {
            what: "the kernel",
            needed: end,
            have: ram_size(mem),
        });
    }

    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::KernelLoad)?;
    Ok(KernelImage {
        entry: GuestAddress(loaded.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
        kind: KernelKind::BzImage,
        setup_header: loaded.setup_header,
        end: GuestAddress(end),
    })
}

/// Loads the initrd page-aligned as high as possible: below the end of low
/// RAM and the kernel's `initrd_addr_max` (0x37ffffff where the kernel does
/// not say), and above the kernel.
pub fn load_initrd<F: ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    image: &KernelImage,
    initrd: &mut F,
) -> Result<InitrdRange, BootError> {
    let io_err = |source| BootError::Io {
        what: "the initrd",
        source,
    };
    let size = initrd.seek(SeekFrom::End(0)).map_err(io_err)?;
    initrd.rewind().map_err(io_err)?;

    let low_end = low_ram_end(mem);
    let addr_max = image
        .setup_header
        .filter(|hdr| hdr.version >= PROTOCOL_INITRD_ADDR_MAX)
        .map_or(DEFAULT_INITRD_ADDR_MAX, |hdr| {
            u64::from(hdr.initrd_addr_max)
        });
    let limit = low_end.min(addr_max.saturating_add(1));
    let floor = image.end.0.next_multiple_of(PAGE_SIZE);
    let start = limit
        .checked_sub(size)
        .map(|start| start & !(PAGE_SIZE - 1))
        .filter(|&start| start >= floor);
    let Some(start) = start else {
        return Err(if limit < low_end {
            BootError::InitrdTooLarge { size, limit }
        } else {
            BootError::MemoryTooSmall {
                what: "the kernel and initrd",
                needed: floor.saturating_add(size),
                have: ram_size(mem),
            }
        });
    };

    // `size` fits below `limit`, itself below 4 GiB.
    let size = size as usize;
    mem.read_exact_volatile_from(GuestAddress(start), initrd, size)
        .map_err(mem_err("the initrd"))?;
    tracing::debug!(addr = start, size, "initrd loaded");
    Ok(InitrdRange {
        addr: GuestAddress(start),
        size,
    })
}

/// The end (exclusive) of the RAM region that starts at address 0.
pub(super) fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(0))
        .map_or(0, |region| region.start_addr().0 + region.len())
}

/// All guest RAM, in bytes.
pub(super) fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|region| region.len()).sum()
}

/// Whether `[start, start + len)` lies in one RAM region.
fn fits_in_ram(mem: &GuestMemoryMmap, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    mem.find_region(GuestAddress(start))
        .is_some_and(|region| end <= region.start_addr().0 + region.len())
}

/// Reads up to `len` bytes from the start of `file`: fewer if it is shorter.
fn read_prefix<F: Read + Seek>(file: &mut F, len: usize) -> Result<Vec<u8>, BootError> {
    let io_err = |source| BootError::Io {
        what: "the kernel",
        source,
    };
    file.rewind().map_err(io_err)?;
    let mut prefix = Vec::with_capacity(len);
    file.by_ref()
        .take(len as u64)
        .read_to_end(&mut prefix)
        .map_err(io_err)?;
    Ok(prefix)
}

/// A plain-data header from the start of `bytes`, or `None` if too short.
fn from_bytes<T: ByteValued>(bytes: &[u8]) -> Option<T> {
    T::read_exact_from(bytes).ok()
}

/// A short read means a damaged file; anything else is an I/O failure.
fn truncated_or_io(err: io::Error, what: &str) -> BootError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        BootError::NotAKernel(what.into())
    } else {
        BootError::Io {
            what: "the kernel",
            source: err,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Cursor;
    use std::path::PathBuf;

    use super::*;
    use crate::vm::boot::layout::{MIB, MMIO_START};

    /// Where the fake ELF's single segment and entry point are.
    pub(in crate::vm::boot) const ELF_PADDR: u64 = 0x0100_0000;
    const ELF_PAYLOAD: &[u8] = b"kestrel-kernel!!";
    const ELF_MEMSZ: u64 = 0x20_0000;

    /// A minimal vmlinux-like ELF64: one PT_LOAD of `ELF_PAYLOAD` at
    /// `ELF_PADDR` (memsz `ELF_MEMSZ`), entered at its start.
    pub(in crate::vm::boot) fn fake_elf() -> Vec<u8> {
        let ehdr_size = size_of::<Elf64_Ehdr>();
        let phdr_size = size_of::<Elf64_Phdr>();
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(ELFMAG);
        ehdr.e_ident[EI_CLASS] = ELFCLASS64;
        ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
        ehdr.e_ident[6] = 1; // EV_CURRENT
        ehdr.e_type = 2; // ET_EXEC
        ehdr.e_machine = EM_X86_64;
        ehdr.e_version = 1;
        ehdr.e_entry = ELF_PADDR;
        ehdr.e_phoff = ehdr_size as u64;
        ehdr.e_ehsize = ehdr_size as u16;
        ehdr.e_phentsize = phdr_size as u16;
        ehdr.e_phnum = 1;
        let phdr = Elf64_Phdr {
            p_type: PT_LOAD,
            p_flags: 5, // R+X
            p_offset: (ehdr_size + phdr_size) as u64,
            p_vaddr: 0xffff_ffff_8100_0000,
            p_paddr: ELF_PADDR,
            p_filesz: ELF_PAYLOAD.len() as u64,
            p_memsz: ELF_MEMSZ,
            p_align: 0x20_0000,
        };
        let mut file = ehdr.as_slice().to_vec();
        file.extend_from_slice(phdr.as_slice());
        file.extend_from_slice(ELF_PAYLOAD);
        file
    }

    const BZ_SETUP_SECTS: u8 = 1;
    const BZ_PAYLOAD: &[u8] = b"compressed-kernel-bytes";
    pub(in crate::vm::boot) const BZ_INITRD_ADDR_MAX: u32 = 0x2fff_ffff;

    /// A minimal bzImage: boot protocol 2.15 with a 64-bit entry, one setup
    /// sector, and a tiny "compressed kernel".
    pub(in crate::vm::boot) fn fake_bzimage(xloadflags: u16) -> Vec<u8> {
        let hdr = setup_header {
            setup_sects: BZ_SETUP_SECTS,
            boot_flag: 0xaa55,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: BZ_INITRD_ADDR_MAX,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 0x7ff,
            pref_address: 0x0100_0000,
            init_size: 0x0100_0000,
            ..Default::default()
        };
        let setup_len = (usize::from(BZ_SETUP_SECTS) + 1) * SECTOR_SIZE as usize;
        let mut file = vec![0u8; setup_len];
        file[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        file.extend_from_slice(BZ_PAYLOAD);
        file
    }

    fn ram(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&crate::vm::boot::memory_regions(mib * MIB)).unwrap()
    }

    fn elf_image() -> KernelImage {
        load_kernel(&ram(64), &mut Cursor::new(fake_elf())).unwrap()
    }

    #[test]
    fn elf_kernel_loads_at_its_physical_address_and_enters_at_its_entry() {
        let mem = ram(64);
        let image = load_kernel(&mem, &mut Cursor::new(fake_elf())).unwrap();
        assert_eq!(image.kind, KernelKind::Elf);
        assert_eq!(image.entry, GuestAddress(ELF_PADDR));
        assert_eq!(image.end, GuestAddress(ELF_PADDR + ELF_MEMSZ));
        assert!(image.setup_header.is_none());
        let mut copied = vec![0u8; ELF_PAYLOAD.len()];
        mem.read_slice(&mut copied, GuestAddress(ELF_PADDR))
            .unwrap();
        assert_eq!(copied, ELF_PAYLOAD);
    }

    #[test]
    fn bzimage_kernel_enters_0x200_after_its_load_address() {
        let mem = ram(64);
        let image = load_kernel(&mem, &mut Cursor::new(fake_bzimage(XLF_KERNEL_64))).unwrap();
        assert_eq!(image.kind, KernelKind::BzImage);
        assert_eq!(image.entry, GuestAddress(HIMEM_START + 0x200));
        let hdr = image.setup_header.expect("setup header");
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        // pref_address + init_size: where it decompresses to.
        assert_eq!(image.end, GuestAddress(0x0200_0000));
        let mut copied = vec![0u8; BZ_PAYLOAD.len()];
        mem.read_slice(&mut copied, GuestAddress(HIMEM_START))
            .unwrap();
        assert_eq!(copied, BZ_PAYLOAD);
    }

    #[test]
    fn bzimage_without_a_64bit_entry_is_unsupported() {
        let err = load_kernel(&ram(64), &mut Cursor::new(fake_bzimage(0))).unwrap_err();
        assert!(matches!(err, BootError::UnsupportedKernel(_)), "{err}");
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        // A fixed xorshift sequence: "random", but the same every run.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let bytes: Vec<u8> = (0..8192)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let err = load_kernel(&ram(64), &mut Cursor::new(bytes)).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with("the kernel is neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_is_not_a_kernel() {
        let err = load_kernel(&ram(64), &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
    }

    #[test]
    fn elf_cut_off_in_its_program_headers_is_not_a_kernel() {
        let mut elf = fake_elf();
        elf.truncate(size_of::<Elf64_Ehdr>() + 8);
        let err = load_kernel(&ram(64), &mut Cursor::new(elf)).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
    }

    #[test]
    fn elf_for_another_machine_is_unsupported() {
        let mut elf = fake_elf();
        elf[18] = 183; // EM_AARCH64
        let err = load_kernel(&ram(64), &mut Cursor::new(elf)).unwrap_err();
        assert!(matches!(err, BootError::UnsupportedKernel(_)), "{err}");
    }

    #[test]
    fn kernel_beyond_guest_memory_is_memory_too_small() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap();
        let err = load_kernel(&mem, &mut Cursor::new(fake_elf())).unwrap_err();
        match err {
            BootError::MemoryTooSmall { needed, have, .. } => {
                assert_eq!(needed, ELF_PADDR + ELF_MEMSZ);
                assert_eq!(have, 16 * MIB);
            }
            other => panic!("expected MemoryTooSmall, got {other}"),
        }
    }

    #[test]
    fn initrd_sits_page_aligned_at_the_top_of_low_ram() {
        for mib in [64, 128, 512] {
            let mem = ram(mib);
            let image = load_kernel(&mem, &mut Cursor::new(fake_elf())).unwrap();
            let initrd = vec![0x5a_u8; 10_000];
            let range = load_initrd(&mem, &image, &mut Cursor::new(initrd.clone())).unwrap();
            assert_eq!(range.size, initrd.len());
            assert_eq!(range.addr.0 % PAGE_SIZE, 0);
            assert!(range.addr.0 >= image.end.0);
            let end = range.addr.0 + range.size as u64;
            assert!(end <= mib * MIB, "{mib} MiB: ends at {end:#x}");
            assert!(mib * MIB - end < PAGE_SIZE, "{mib} MiB: not at the top");
            let mut copied = vec![0u8; initrd.len()];
            mem.read_slice(&mut copied, range.addr).unwrap();
            assert_eq!(copied, initrd);
        }
    }

    #[test]
    fn initrd_stays_below_the_default_initrd_addr_max() {
        let mem = ram(3584);
        let image = elf_image();
        let range = load_initrd(&mem, &image, &mut Cursor::new(vec![1u8; 5000])).unwrap();
        let end = range.addr.0 + range.size as u64;
        assert!(end <= DEFAULT_INITRD_ADDR_MAX + 1);
        assert!(DEFAULT_INITRD_ADDR_MAX + 1 - end < PAGE_SIZE);
    }

    #[test]
    fn initrd_stays_below_the_bzimage_initrd_addr_max() {
        let mem = ram(4096);
        let image = load_kernel(&mem, &mut Cursor::new(fake_bzimage(XLF_KERNEL_64))).unwrap();
        let range = load_initrd(&mem, &image, &mut Cursor::new(vec![1u8; 5000])).unwrap();
        let end = range.addr.0 + range.size as u64;
        assert!(end <= u64::from(BZ_INITRD_ADDR_MAX) + 1);
        assert!(end < MMIO_START);
    }

    #[test]
    fn initrd_never_reaches_into_the_mmio_hole() {
        let mem = ram(4096);
        let mut image = elf_image();
        let mut hdr = setup_header {
            version: 0x020f,
            initrd_addr_max: 0xffff_ffff,
            ..Default::default()
        };
        hdr.header = HDRS_MAGIC;
        image.setup_header = Some(hdr);
        let range = load_initrd(&mem, &image, &mut Cursor::new(vec![1u8; 5000])).unwrap();
        let end = range.addr.0 + range.size as u64;
        assert!(end <= MMIO_START);
        assert!(MMIO_START - end < PAGE_SIZE);
    }

    #[test]
    fn initrd_that_does_not_fit_above_the_kernel_is_memory_too_small() {
        let mem = ram(64);
        let image = elf_image();
        let too_big = vec![0u8; (64 * MIB - image.end.0) as usize + 1];
        let err = load_initrd(&mem, &image, &mut Cursor::new(too_big)).unwrap_err();
        match err {
            BootError::MemoryTooSmall { what, have, .. } => {
                assert_eq!(what, "the kernel and initrd");
                assert_eq!(have, 64 * MIB);
            }
            other => panic!("expected MemoryTooSmall, got {other}"),
        }
    }

    #[test]
    fn initrd_larger_than_the_kernel_allows_is_too_large() {
        let mem = ram(2048);
        let image = elf_image();
        let too_big = vec![0u8; (DEFAULT_INITRD_ADDR_MAX + 1 - image.end.0) as usize + 1];
        let err = load_initrd(&mem, &image, &mut Cursor::new(too_big)).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    /// Where `kestrel image build` leaves the guest image by default.
    fn built_image_dir() -> Option<PathBuf> {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(cache.join("kestrel").join("image"))
    }

    #[test]
    fn built_guest_kernels_load_in_both_formats() {
        let test = "built_guest_kernels_load_in_both_formats";
        let Some(dir) = built_image_dir() else {
            crate::skip(test, "neither XDG_CACHE_HOME nor HOME is set");
            return;
        };
        let (vmlinux, bzimage) = (dir.join("vmlinux"), dir.join("bzImage"));
        if !vmlinux.exists() || !bzimage.exists() {
            crate::skip(
                test,
                &format!(
                    "no built guest image in {} (kestrel image build)",
                    dir.display()
                ),
            );
            return;
        }
        let mem = ram(256);

        let image = load_kernel(&mem, &mut std::fs::File::open(&vmlinux).unwrap()).unwrap();
        assert_eq!(image.kind, KernelKind::Elf);
        assert!(image.entry.0 >= HIMEM_START && image.entry.0 < image.end.0);
        assert!(image.end.0 <= 256 * MIB);

        let image = load_kernel(&mem, &mut std::fs::File::open(&bzimage).unwrap()).unwrap();
        assert_eq!(image.kind, KernelKind::BzImage);
        assert_eq!(image.entry, GuestAddress(HIMEM_START + 0x200));
        let hdr = image.setup_header.expect("setup header");
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert!(image.end.0 <= 256 * MIB);
    }
}
