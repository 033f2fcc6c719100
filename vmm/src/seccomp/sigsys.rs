//! The SIGSYS handler: says which thread made which disallowed call, and
//! ends the process with [`EXIT_STATUS`].
//!
//! It runs inside the offending call, under that thread's filter, so it
//! uses only what every allow list has (`prctl(PR_GET_NAME)`, `write`,
//! `exit_group`), and formats into a stack buffer: no allocation, no lock.

use std::sync::OnceLock;

use super::syscall_names::syscall_name;
use super::EXIT_STATUS;

/// `si_code` of a SIGSYS raised by a seccomp filter (`SYS_SECCOMP` in
/// `<asm-generic/siginfo.h>`).
const SYS_SECCOMP: libc::c_int = 1;

/// The head of `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in
/// `<asm-generic/siginfo.h>`); libc's `siginfo_t` does not expose it.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// Installs the handler once per process; later calls return the first
/// call's outcome.
pub(super) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
                .map_err(|e| e.errno())
        })
        .map_err(std::io::Error::from_raw_os_error)
}

extern "C" fn on_sigsys(signum: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler;
    // `SigsysInfo` is a prefix of its layout for SIGSYS.
    let info = unsafe { &*(info as *const SigsysInfo) };
    // A SIGSYS someone sent with kill(2) is not ours to report.
    if signum != libc::SIGSYS || info.code != SYS_SECCOMP {
        return;
    }
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included.
    let named = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0;
    let name = match named {
        true => &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())],
        false => &b"?"[..],
    };
    let mut line = Line::default();
    line.push(b"kestrel-vmm: seccomp: thread ");
    line.push(name);
    line.push(b" made a disallowed syscall ");
    line.push_decimal(info.syscall);
    if let Some(syscall) = syscall_name(i64::from(info.syscall)) {
        line.push(b" (");
        line.push(syscall.as_bytes());
        line.push(b")");
    }
    line.push(b"; exiting\n");
    // SAFETY: writes our own buffer to stderr, then ends the process
    // without running anything else of it: both are async-signal-safe.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// A line built on the stack; what does not fit is cut.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Line {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_decimal(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut rest = n.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::Line;

    #[test]
    fn numbers_are_written_in_decimal() {
        for (n, text) in [(0, "0"), (41, "41"), (-1, "-1"), (i32::MIN, "-2147483648")] {
            let mut line = Line::default();
            line.push_decimal(n);
            assert_eq!(&line.buf[..line.len], text.as_bytes());
        }
    }

    #[test]
    fn a_line_too_long_is_cut_at_its_buffer() {
        let mut line = Line::default();
        line.push(&[b'x'; 200]);
        line.push(b"more");
        assert_eq!(line.len, line.buf.len());
    }
}
