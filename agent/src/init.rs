//! Duties of the guest's PID 1: the filesystems every Linux user space
//! expects, a session, the hostname, the clock, and a clean power-off.
//! In host mode none of this runs; the agent only becomes a child
//! subreaper so that it still collects its containers' exits.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use nix::unistd::{sethostname, setsid, sync};

use crate::error::{Error, Result};

/// Whether this process is the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// (source, target, fstype, flags, data) of the filesystems PID 1 mounts.
const MOUNTS: &[(&str, &str, &str, MsFlags, &str)] = &[
    (
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    (
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=0755",
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
];

/// Sets up the guest as its PID 1. Errors are logged, not fatal: PID 1
/// exiting would panic the kernel, and a partly set-up guest can still
/// report what went wrong over the API.
pub fn setup_guest() {
    for (source, target, fstype, flags, data) in MOUNTS {
        if let Err(e) = fs::create_dir_all(target) {
            tracing::warn!(target, error = %e, "creating mount point");
            continue;
        }
        let data = (!data.is_empty()).then_some(*data);
        match mount(Some(*source), *target, Some(*fstype), *flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => tracing::warn!(target, fstype, error = %e, "mount failed"),
        }
    }
    // devpts with newinstance serves ptys through its own ptmx.
    let ptmx = Path::new("/dev/ptmx");
    let _ = fs::remove_file(ptmx);
    if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", ptmx) {
        tracing::warn!(error = %e, "linking /dev/ptmx");
    }
    if let Err(e) = setsid() {
        tracing::warn!(error = %e, "setsid");
    }
    // The VM's network is the pod's: its containers reach each other on
    // 127.0.0.1, which CNI's loopback plugin would bring up on a host.
    if let Err(e) = loopback_up() {
        tracing::warn!(error = %e, "bringing up lo");
    }
}

/// Sets the loopback interface up (`ip link set lo up`).
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // (and closed) by `sock`.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: an all-zero ifreq is valid; the name fits in IFNAMSIZ.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes sure fds 0, 1 and 2 are open, so no pipe or socket the agent
/// creates later lands on them (the kernel may start init without them).
pub fn ensure_std_fds() {
    for fd in 0..=2 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            let console = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/console")
                .or_else(|_| {
                    fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open("/dev/null")
                });
            if let Ok(f) = console {
                if f.as_raw_fd() != fd {
                    // SAFETY: duplicating an open descriptor onto a closed one.
                    unsafe { libc::dup2(f.as_raw_fd(), fd) };
                } else {
                    std::mem::forget(f);
                }
            }
        }
    }
}

/// In host mode the agent must still see the exits of processes whose
/// parent died; as PID 1 that is automatic.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The guest's hostname from CreateSandbox (resolv.conf and hosts are
/// [`crate::network`]'s).
pub fn set_hostname(hostname: &str) -> Result<()> {
    if !hostname.is_empty() {
        sethostname(hostname).map_err(|e| Error::invalid(format!("hostname {hostname:?}: {e}")))?;
    }
    Ok(())
}

pub fn set_clock(sec: i64, usec: i64) -> Result<()> {
    let ts = TimeSpec::new(sec, usec * 1000);
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| Error::internal("setting the clock", e))
}

/// The memory block size for hotplug alignment, or 0 where unknown.
pub fn memory_block_size() -> u64 {
    fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0)
}

/// How the guest ends: [`RebootMode::RB_POWER_OFF`] when `acpi` (the
/// kernel's `/sys/firmware/acpi`, absent with `acpi=off` or no tables)
/// exists, else [`RebootMode::RB_AUTOBOOT`].
fn end_of_guest(acpi: &Path) -> RebootMode {
    if acpi.exists() {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    }
}

pub fn supports_memory_probe() -> bool {
    Path::new("/sys/devices/system/memory/probe").exists()
}

/// Flushes filesystems and ends the guest: a power-off where the kernel
/// has a way to power off (ACPI), else a reboot. x86 without ACPI cannot
/// power off (the kernel turns the request into a halt the VMM never sees),
/// but every VMM we run ends the VM on a reset: kestrel-vmm and QEMU
/// `-no-reboot`, with `reboot=k` on our command line.
pub fn power_off() -> ! {
    sync();
    let mode = end_of_guest(Path::new("/sys/firmware/acpi"));
    tracing::info!(?mode, "ending the guest");
    let err = match reboot(mode) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    tracing::error!(error = %err, ?mode, "ending the guest failed");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_powers_off_with_acpi_and_reboots_without() {
        let dir = tempfile::tempdir().unwrap();
        let acpi = dir.path().join("acpi");
        assert_eq!(end_of_guest(&acpi), RebootMode::RB_AUTOBOOT);
        std::fs::create_dir(&acpi).unwrap();
        assert_eq!(end_of_guest(&acpi), RebootMode::RB_POWER_OFF);
    }
}
