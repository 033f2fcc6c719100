//! The filters compile, and installed they do what the module promises:
//! a disallowed call ends the process with [`EXIT_STATUS`] and a line that
//! names it; `openat` and `clone3` fail with ENOSYS; the vhost-user threads
//! can start threads and cannot fork; a net device thread moves frames and
//! sets a tap's offloads, and nothing else on the tap; a virtio-fs device
//! thread talks vhost-user and forwards interrupts.
//!
//! A filter cannot be taken off again, so each installing test runs itself
//! again as a child process (`CHILD_ENV` set), whose thread confines itself
//! and whose end the parent reads.

use std::process::{Command, Output};

use std::os::unix::process::ExitStatusExt;
use std::os::unix::thread::JoinHandleExt;

use super::{spawn_confined, Filter, ThreadKind, EXIT_STATUS};

const CHILD_ENV: &str = "KESTREL_SECCOMP_TEST_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs this module's test `name` again in a child process.
fn run_child(name: &str) -> Output {
    let test = format!("seccomp::tests::{name}");
    Command::new(std::env::current_exe().expect("current_exe"))
        .args([&test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("running the test binary again")
}

/// In the child: a thread named `name` confines itself as `kind` and runs
/// `body`; the child exits with what `body` returns, before the test
/// harness prints anything.
fn confined_thread(name: &str, kind: ThreadKind, body: impl FnOnce() -> i32 + Send + 'static) -> ! {
    let filter = Filter::new(kind).expect("building the filter");
    let status = spawn_confined(name, Some(filter), body)
        .expect("starting the confined thread")
        .join()
        .ok()
        .flatten()
        .expect("the confined thread panicked");
    // SAFETY: ends the child at once, as its harness would only print.
    unsafe { libc::_exit(status) }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn every_thread_kinds_filter_compiles_for_x86_64() {
    for kind in ThreadKind::ALL {
        let filter = Filter::new(kind).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(filter.kind(), kind);
        assert!(!filter.allow.is_empty() && !filter.errors.is_empty());
    }
}

#[test]
fn kvm_ioctl_numbers_are_the_kernels() {
    assert_eq!(super::allowlists::KVM_RUN(), 0xae80);
    assert_eq!(super::allowlists::KVM_GET_REGS(), 0x8090_ae81);
}

#[test]
fn tap_ioctl_numbers_are_the_kernels() {
    assert_eq!(libc::TUNSETOFFLOAD, 0x4004_54d0);
    assert_eq!(libc::TUNGETIFF, 0x8004_54d2);
    assert_eq!(libc::TUNSETVNETHDRSZ, 0x4004_54d8);
}

#[test]
fn a_disallowed_syscall_ends_the_process_with_148_naming_thread_and_syscall() {
    if in_child() {
        confined_thread("kestrel-vcpu7", ThreadKind::Vcpu, || {
            // SAFETY: a plain system call; the filter stops it.
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            0
        });
    }
    let output =
        run_child("a_disallowed_syscall_ends_the_process_with_148_naming_thread_and_syscall");
    assert_eq!(
        output.status.code(),
        Some(EXIT_STATUS),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        stderr(&output),
        "kestrel-vmm: seccomp: thread kestrel-vcpu7 made a disallowed syscall 41 (socket); exiting\n"
    );
}

#[test]
fn an_abort_under_a_filter_ends_the_process_with_sigabrt() {
    if in_child() {
        confined_thread("kestrel-vcpu0", ThreadKind::Vcpu, || std::process::abort());
    }
    let output = run_child("an_abort_under_a_filter_ends_the_process_with_sigabrt");
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGABRT),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_vmm_thread_kicks_a_vcpu_thread() {
    if in_child() {
        crate::vm::vcpu::install_kick_handler().expect("installing the kick handler");
        let vcpu = Filter::new(ThreadKind::Vcpu).expect("building the vCPU filter");
        let vcpu = spawn_confined("kestrel-vcpu0", Some(vcpu), std::thread::park)
            .expect("starting the vCPU thread");
        let target = vcpu.as_pthread_t();
        confined_thread("kestrel-vmm", ThreadKind::Vmm, move || {
            let kick = crate::vm::vcpu::kick_signal();
            // SAFETY: the vCPU thread is parked, so alive; the kick signal
            // has a handler that does nothing.
            unsafe { libc::pthread_kill(target, kick) }
        });
    }
    let output = run_child("the_vmm_thread_kicks_a_vcpu_thread");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn opening_a_file_under_a_filter_fails_with_enosys() {
    if in_child() {
        confined_thread(
            "kestrel-vsock",
            ThreadKind::Vsock,
            || match std::fs::File::open("/proc/self/status") {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => 0,
                _ => 1,
            },
        );
    }
    let output = run_child("opening_a_file_under_a_filter_fails_with_enosys");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn the_vhost_user_filter_lets_a_thread_start_threads() {
    if in_child() {
        confined_thread("kestrel-vmm", ThreadKind::VhostUser, || {
            let started = std::thread::Builder::new()
                .name("vring_worker".into())
                .spawn(|| 7);
            match started.map(|t| t.join()) {
                Ok(Ok(7)) => 0,
                _ => 1,
            }
        });
    }
    let output = run_child("the_vhost_user_filter_lets_a_thread_start_threads");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn the_vhost_user_filter_kills_a_fork() {
    if in_child() {
        confined_thread("kestrel-vmm", ThreadKind::VhostUser, || {
            // SAFETY: the filter stops the fork before there is a child.
            match unsafe { libc::fork() } {
                0 => unsafe { libc::_exit(0) },
                _ => 0,
            }
        });
    }
    let output = run_child("the_vhost_user_filter_kills_a_fork");
    assert_eq!(
        output.status.code(),
        Some(EXIT_STATUS),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("thread kestrel-vmm made a disallowed syscall 56 (clone)"),
        "{}",
        stderr(&output)
    );
}

/// A `SOCK_SEQPACKET` pair, the tap's stand-in in the net device's tests.
fn frame_pair() -> (std::fs::File, std::fs::File) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (a.into(), b.into())
}

#[test]
fn the_net_filter_moves_frames_and_sets_offloads() {
    if in_child() {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let (mut ours, mut theirs) = frame_pair();
        // The device creates its event set before the thread confines
        // itself; the thread adds the tap to it and removes it again.
        let epoll = Epoll::new().expect("epoll");
        confined_thread("kestrel-net0", ThreadKind::Net, move || {
            use std::io::{Read, Write};
            use std::os::fd::AsRawFd;
            let fd = ours.as_raw_fd();
            let watch = |op| {
                let event = EpollEvent::new(EventSet::IN, 2);
                epoll.ctl(op, fd, event).is_ok()
            };
            let mut events = [EpollEvent::default(); 4];
            let mut frame = [0u8; 64];
            let moved = watch(ControlOperation::Add)
                && theirs.write_all(b"frame").is_ok()
                && epoll.wait(1000, &mut events).ok() == Some(1)
                && ours.read(&mut frame).ok() == Some(5)
                && ours.write_all(b"reply").is_ok()
                && watch(ControlOperation::Delete);
            // Not a tap, so the ioctl fails; the filter lets it through.
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            let offload = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
            i32::from(!(moved && offload < 0))
        });
    }
    let output = run_child("the_net_filter_moves_frames_and_sets_offloads");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn the_net_filter_kills_any_other_tap_ioctl() {
    if in_child() {
        let (ours, _theirs) = frame_pair();
        confined_thread("kestrel-net0", ThreadKind::Net, move || {
            use std::os::fd::AsRawFd;
            let mut ifreq = [0u8; 40];
            // SAFETY: the filter stops the call before the kernel reads
            // `ifreq`, which is 40 bytes like `struct ifreq` anyway.
            unsafe { libc::ioctl(ours.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) };
            0
        });
    }
    let output = run_child("the_net_filter_kills_any_other_tap_ioctl");
    assert_eq!(
        output.status.code(),
        Some(EXIT_STATUS),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("thread kestrel-net0 made a disallowed syscall 16 (ioctl)"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_net_device_serves_its_queues_under_the_net_filter() {
    if in_child() {
        let filter = Filter::new(ThreadKind::Net).expect("building the net filter");
        crate::vm::virtio::net::tests::serve_both_queues(Some(filter));
        // SAFETY: ends the child at once, as its harness would only print.
        unsafe { libc::_exit(0) }
    }
    let output = run_child("a_net_device_serves_its_queues_under_the_net_filter");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn a_fs_device_talks_to_its_backend_under_the_fs_filter() {
    if in_child() {
        let filter = Filter::new(ThreadKind::Fs).expect("building the fs filter");
        crate::vm::virtio::fs::tests::round_trip(Some(filter));
        // SAFETY: ends the child at once, as its harness would only print.
        unsafe { libc::_exit(0) }
    }
    let output = run_child("a_fs_device_talks_to_its_backend_under_the_fs_filter");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}
