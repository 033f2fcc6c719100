//! The tap a `--net` option names: an fd the parent opened (in whatever
//! network namespace it chose, with tc mirroring behind it) and left open
//! for us. We never create or name taps; we check that the fd is one,
//! configure its virtio-net header, and read and write frames on it.
//!
//! The `IFF_NO_PI` check is only as good as the kernel's answer: the
//! 6.18 kernel on our development machines reports `IFF_NO_PI` from
//! `TUNGETIFF` on taps opened without it (their frames then start with
//! a 4-byte packet-information header, and the guest sees garbage), while
//! Debian's 6.1 reports the truth.
//!
//! All the checks and `TUNSETVNETHDRSZ` run while the VM is built, before
//! any seccomp filter; only `TUNSETOFFLOAD` runs later, on the device
//! thread, when the guest's driver has said which offloads it takes.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, c_uint};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
};

use super::{Backend, VNET_HDR_LEN};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap-fd {fd} is not an open file descriptor (did the caller keep it open across exec?)"
    )]
    NotOpen {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("tap-fd {fd} is not a tap device (TUNGETIFF failed)")]
    NotATap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("tap-fd {fd} ({name}) was opened without {missing}; open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    WrongFlags {
        fd: RawFd,
        name: String,
        missing: &'static str,
    },
    #[error("tap-fd {fd} ({name}): {what}")]
    Setup {
        fd: RawFd,
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNGETIFF fills it: the name, then the flags in the
/// union that follows (40 bytes in all on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// A tap taken over from the parent, non-blocking, with 12-byte virtio-net
/// headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Takes over the inherited `fd` and checks it is a tap opened with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; sets the header size and
    /// non-blocking mode. The fd is closed when the `Tap` drops, also when
    /// a check fails. The caller must not hand the same fd in twice.
    pub fn from_inherited_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only reads the fd's flags; it fails on a closed fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::NotOpen { fd, source });
        }
        // SAFETY: the fd is open, and the `--net` contract gives it to us
        // alone; `Vm::new` refuses an fd named twice.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut ifreq = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _rest: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one `struct ifreq`, which `ifreq` is in
        // size and layout; it lives across the call.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifreq as *mut IfReq) } < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::NotATap { fd, source });
        }
        let name = CStr::from_bytes_until_nul(&ifreq.name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        let flags = c_int::from(ifreq.flags);
        let wrong = |missing| TapError::WrongFlags {
            fd,
            name: name.clone(),
            missing,
        };
        if flags & (libc::IFF_TUN | libc::IFF_TAP) != libc::IFF_TAP {
            return Err(wrong(
                "IFF_TAP (it is a tun, which carries IP packets, not Ethernet frames)",
            ));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(wrong("IFF_NO_PI"));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(wrong("IFF_VNET_HDR"));
        }
        let setup = |what| {
            let source = io::Error::last_os_error();
            TapError::Setup {
                fd,
                name: name.clone(),
                what,
                source,
            }
        };
        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const c_int) } < 0 {
            return Err(setup(
                "setting the virtio-net header size (TUNSETVNETHDRSZ)",
            ));
        }
        // SAFETY: F_GETFL and F_SETFL only read and set the fd's status flags.
        let status = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if status < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) } < 0 {
            return Err(setup("making it non-blocking"));
        }
        Ok(Tap { file, name })
    }

    /// The interface's name, as the caller's network namespace knows it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The TUN offload flags that match the guest's `features`. The tap
/// accepts TSO and UFO only with checksum offload, as the virtio spec
/// makes the driver accept them only with `GUEST_CSUM`.
pub fn offload_flags(features: u64) -> c_uint {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, features: u64) -> io::Result<()> {
        let flags = offload_flags(features);
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
