//! What a VMM process costs in memory beyond its guest's RAM, read from
//! `/proc/PID/smaps`: the benchmarks' one definition of VMM overhead, so
//! kestrel-vmm, QEMU and a vhost-user backend are measured alike.
//!
//! The guest RAM is the anonymous mapping of exactly the guest's size
//! (kestrel-vmm's `vm-memory` region), or every mapping of QEMU's
//! `memory-backend-memfd`, which QEMU maps whole and a vhost-user backend
//! maps in pieces (the RAM above 1 MiB, say); every other mapping's
//! resident pages count as overhead.

/// Memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    /// Resident outside the guest RAM mapping.
    pub beyond_guest: u64,
    /// The part of `beyond_guest` no other process shares (not libc's
    /// pages, for one).
    pub private_beyond_guest: u64,
    /// VmRSS.
    pub total: u64,
}

/// The name QEMU gives a `memory-backend-memfd` object's memfd, as
/// /proc/PID/smaps shows its mappings.
const QEMU_RAM_MEMFD: &str = "/memfd:memory-backend-memfd";

/// What a mapping may be.
#[derive(Default, PartialEq)]
enum Kind {
    /// Anonymous: guest RAM if it has the guest's size.
    Anonymous,
    /// (Part of) QEMU's guest RAM memfd.
    QemuRam,
    #[default]
    Other,
}

/// One mapping of /proc/PID/smaps, sizes in KiB.
#[derive(Default)]
struct Mapping {
    kind: Kind,
    size: u64,
    rss: u64,
    private: u64,
}

/// `pid`'s memory beyond its guest RAM of `guest_kib`; `None` if the
/// process is gone or maps no guest RAM.
pub fn rss_beyond_guest(pid: u32, guest_kib: u64) -> Option<Rss> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (beyond_guest, private_beyond_guest) = beyond_guest(&smaps, guest_kib)?;
    Some(Rss {
        beyond_guest,
        private_beyond_guest,
        total: crate::rss_kib(pid),
    })
}

/// Sums Rss and private pages, in KiB, over the mappings of `smaps` but
/// guest RAM's; `None` without guest RAM.
fn beyond_guest(smaps: &str, guest_kib: u64) -> Option<(u64, u64)> {
    let (mut rss, mut private, mut found_guest) = (0, 0, false);
    let mut current: Option<Mapping> = None;
    let mut finish = |m: Option<Mapping>| {
        if let Some(m) = m {
            let anonymous_ram = m.kind == Kind::Anonymous && m.size == guest_kib;
            if m.kind == Kind::QemuRam || (anonymous_ram && !found_guest) {
                found_guest = true;
            } else {
                rss += m.rss;
                private += m.private;
            }
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.ends_with(':') {
            let kib = fields.next().and_then(|v| v.parse::<u64>().ok());
            if let (Some(m), Some(kib)) = (current.as_mut(), kib) {
                match first {
                    "Size:" => m.size = kib,
                    "Rss:" => m.rss = kib,
                    "Private_Clean:" | "Private_Dirty:" => m.private += kib,
                    _ => {}
                }
            }
        } else {
            // A mapping's header: range, perms, offset, device, inode, [path].
            finish(current.take());
            let kind = match line.split_whitespace().nth(5) {
                None => Kind::Anonymous,
                Some(path) if path.starts_with(QEMU_RAM_MEMFD) => Kind::QemuRam,
                Some(_) => Kind::Other,
            };
            current = Some(Mapping {
                kind,
                ..Mapping::default()
            });
        }
    }
    finish(current);
    found_guest.then_some((rss, private))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapping's smaps lines, as the kernel prints them.
    fn mapping(header: &str, size: u64, rss: u64, private: u64) -> String {
        format!(
            "{header}\nSize: {size} kB\nRss: {rss} kB\nShared_Clean: {} kB\n\
             Private_Clean: 0 kB\nPrivate_Dirty: {private} kB\n",
            rss - private
        )
    }

    #[test]
    fn anonymous_guest_ram_is_left_out_and_the_rest_summed() {
        let smaps = [
            mapping(
                "55d0-55d1 r-xp 00000000 08:01 42 /usr/bin/kestrel-vmm",
                900,
                800,
                100,
            ),
            mapping("7f00-7f10 rw-p 00000000 00:00 0", 131072, 4000, 4000),
            mapping("7f20-7f21 rw-p 00000000 00:00 0", 2048, 300, 300),
            mapping("7fff-7fff rw-p 00000000 00:00 0 [stack]", 132, 20, 20),
        ]
        .concat();
        assert_eq!(beyond_guest(&smaps, 131072), Some((1120, 420)));
    }

    #[test]
    fn every_piece_of_qemus_ram_memfd_is_guest_ram() {
        let memfd = "rw-s 00100000 00:01 3 /memfd:memory-backend-memfd (deleted)";
        let smaps = [
            mapping(&format!("7f00-7f10 {memfd}"), 261120, 9000, 0),
            mapping(&format!("7f10-7f11 {memfd}"), 640, 8, 0),
            mapping(
                "7f20-7f21 rw-s 00000000 00:01 4 /memfd:other (deleted)",
                64,
                64,
                64,
            ),
            mapping(
                "7f30-7f31 r--p 00000000 08:01 9 /usr/lib/libc.so.6",
                160,
                150,
                0,
            ),
        ]
        .concat();
        assert_eq!(beyond_guest(&smaps, 262144), Some((214, 64)));
    }

    #[test]
    fn without_a_mapping_of_the_guest_size_there_is_no_figure() {
        let smaps = mapping("7f00-7f10 rw-p 00000000 00:00 0", 4096, 10, 10);
        assert_eq!(beyond_guest(&smaps, 262144), None);
    }
}
