//! What each kind of thread may call, and with which arguments.
//!
//! Found by running kestrel-vmm under `strace -f` (a full boot to a serving
//! agent in the nested-KVM harness; the vhost-user backend serving QEMU)
//! and by reading the paths that run once a filter is in place, including
//! the rare ones: a thread's exit, a panic that aborts, a heap that grows or
//! shrinks. Each entry says who needs it.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

use super::{ThreadKind, ANSWERED_WITH_ENOSYS};

ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);

/// One condition on a call's argument `index` (its low 32 bits: every
/// value here is an int or flags).
struct Arg {
    index: u8,
    op: SeccompCmpOp,
    value: u64,
}

fn eq(index: u8, value: impl Into<i64>) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::Eq,
        value: value.into() as u64,
    }
}

/// `arg & mask == value`.
fn masked(index: u8, mask: impl Into<i64>, value: impl Into<i64>) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::MaskedEq(u64::from(mask.into() as u32)),
        value: value.into() as u64,
    }
}

/// None of `bits` is set.
fn clear(index: u8, bits: impl Into<i64>) -> Arg {
    masked(index, bits, 0)
}

/// All of `bits` are set.
fn set(index: u8, bits: impl Into<i64> + Copy) -> Arg {
    masked(index, bits, bits)
}

#[derive(Default)]
struct AllowList(BTreeMap<i64, Vec<SeccompRule>>);

impl AllowList {
    /// Allows `nr` with any arguments.
    fn any(&mut self, nr: i64) {
        self.0.insert(nr, Vec::new());
    }

    /// Allows `nr` when all of `args` hold; calling again for the same `nr`
    /// adds an alternative. A call allowed with any arguments stays so.
    fn when(&mut self, nr: i64, args: &[Arg]) -> Result<(), BackendError> {
        let conditions = args
            .iter()
            .map(|a| SeccompCondition::new(a.index, SeccompCmpArgLen::Dword, a.op.clone(), a.value))
            .collect::<Result<Vec<_>, _>>()?;
        let rule = SeccompRule::new(conditions)?;
        match self.0.get_mut(&nr) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        Ok(())
    }
}

/// `kind`'s allow list.
pub(super) fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut l = AllowList::default();
    every_thread(&mut l)?;
    match kind {
        ThreadKind::Vmm => vmm(&mut l)?,
        ThreadKind::Vcpu => vcpu(&mut l)?,
        ThreadKind::Vsock => vsock(&mut l)?,
        ThreadKind::Net => net(&mut l)?,
        ThreadKind::Fs => fs(&mut l),
        ThreadKind::VhostUser => vhost_user(&mut l)?,
        ThreadKind::Signals => signals(&mut l),
    }
    Ok(l.0)
}

/// What any Rust thread on glibc needs once it runs: memory, locks, logs,
/// its own end, and a panic's abort.
fn every_thread(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    // The allocator: the main heap (brk), each thread's heaps (mmap,
    // mprotect to grow them, madvise to give pages back), large blocks
    // (mmap, mremap, munmap). Never executable memory.
    l.any(SYS_brk);
    l.when(
        SYS_mmap,
        &[clear(2, PROT_EXEC), set(3, MAP_PRIVATE | MAP_ANONYMOUS)],
    )?;
    l.when(SYS_mprotect, &[clear(2, PROT_EXEC)])?;
    l.any(SYS_munmap);
    l.any(SYS_mremap);
    // Also a thread's stack, freed as it exits.
    l.when(SYS_madvise, &[eq(2, MADV_DONTNEED)])?;
    // Mutexes, condition variables, channels, joins: waits and wakes only.
    let futex_cmd = !(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME);
    for op in [FUTEX_WAIT, FUTEX_WAKE, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET] {
        l.when(SYS_futex, &[masked(1, futex_cmd, op)])?;
    }
    // std's channels back off with it.
    l.any(SYS_sched_yield);
    // Logs and the SIGSYS report (stderr), eventfds, consoles.
    l.any(SYS_write);
    l.any(SYS_close);
    // std checks that an fd is open before closing it (debug builds).
    l.when(SYS_fcntl, &[eq(1, F_GETFD)])?;
    // Log timestamps, where the vDSO falls back to the system call.
    l.any(SYS_clock_gettime);
    // std's HashMap keys, drawn once per thread.
    l.any(SYS_getrandom);
    // A thread's end: glibc blocks signals and exits; std takes down the
    // thread's signal stack.
    l.any(SYS_rt_sigprocmask);
    l.any(SYS_sigaltstack);
    l.any(SYS_exit);
    l.any(SYS_exit_group);
    // Signal handlers return (the vCPU kick).
    l.any(SYS_rt_sigreturn);
    // A panic in a release build aborts: SIGABRT, raised at this thread.
    l.any(SYS_getpid);
    l.any(SYS_gettid);
    l.when(SYS_tgkill, &[eq(2, SIGABRT)])?;
    l.when(SYS_rt_sigaction, &[eq(0, SIGABRT)])?;
    // The SIGSYS handler names the thread.
    l.when(SYS_prctl, &[eq(0, PR_GET_NAME)])?;
    for nr in ANSWERED_WITH_ENOSYS {
        l.any(nr);
    }
    Ok(())
}

fn vmm(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    // Waiting for the guest's end (an eventfd) or a stop signal (signalfd).
    l.any(SYS_poll);
    l.any(SYS_ppoll);
    l.any(SYS_read);
    // Kicking vCPU threads out of KVM_RUN, and pausing between kicks.
    l.when(SYS_tgkill, &[eq(2, crate::vm::vcpu::kick_signal())])?;
    l.any(SYS_nanosleep);
    l.any(SYS_clock_nanosleep);
    // Removing the vsock socket.
    l.any(SYS_unlink);
    Ok(())
}

fn vcpu(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    // KVM_GET_REGS: the RIP in a failure's report.
    l.when(SYS_ioctl, &[eq(1, KVM_RUN() as i64)])?;
    l.when(SYS_ioctl, &[eq(1, KVM_GET_REGS() as i64)])?;
    // The virtio-mmio transport hands an activated device copies of its
    // queue eventfds.
    l.when(SYS_fcntl, &[eq(1, F_DUPFD_CLOEXEC)])?;
    Ok(())
}

fn vsock(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    // The event loop: queue kicks, the muxer's epoll, the kill event.
    l.any(SYS_epoll_wait);
    l.any(SYS_epoll_pwait);
    l.any(SYS_epoll_ctl);
    // Eventfds and the muxer's timerfd.
    l.any(SYS_read);
    l.any(SYS_timerfd_settime);
    // Host connections: accepted, made nonblocking, read (recv), written
    // (send with MSG_NOSIGNAL), shut down.
    l.when(SYS_accept4, &[eq(3, SOCK_CLOEXEC)])?;
    l.when(SYS_ioctl, &[eq(1, FIONBIO as i64)])?;
    l.any(SYS_recvfrom);
    l.any(SYS_sendto);
    l.any(SYS_shutdown);
    // Guest connections to host port P dial the Unix socket PATH_P.
    l.when(
        SYS_socket,
        &[
            eq(0, AF_UNIX),
            eq(1, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC),
            eq(2, 0),
        ],
    )?;
    l.any(SYS_connect);
    Ok(())
}

fn net(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    // The event loop: queue kicks, the tap (added while the guest has RX
    // buffers, removed while it has none), the kill event.
    l.any(SYS_epoll_wait);
    l.any(SYS_epoll_pwait);
    l.any(SYS_epoll_ctl);
    // Eventfds, and frames from the tap (frames to it are `write`s, which
    // every thread may make). Taps were opened, checked and given their
    // header size before any filter; only the offloads wait for the
    // guest's driver.
    l.any(SYS_read);
    l.when(SYS_ioctl, &[eq(1, TUNSETOFFLOAD as i64)])?;
    Ok(())
}

fn fs(l: &mut AllowList) {
    use libc::*;
    // The event loop: the backend's call events, the kill event, and the
    // vhost-user socket (watched for the backend hanging up; taken out of
    // the set when it does).
    l.any(SYS_epoll_wait);
    l.any(SYS_epoll_pwait);
    l.any(SYS_epoll_ctl);
    // Eventfds.
    l.any(SYS_read);
    // The vhost-user messages of an activation or a reset, on the socket
    // connected before any filter: requests with their fds (the memfd,
    // kick and call eventfds) and the backend's replies.
    l.any(SYS_sendmsg);
    l.any(SYS_recvmsg);
}

fn vhost_user(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    // The vhost-user socket: created, bound, listened on, accepted once,
    // removed at the end.
    l.when(
        SYS_socket,
        &[eq(0, AF_UNIX), eq(1, SOCK_STREAM | SOCK_CLOEXEC), eq(2, 0)],
    )?;
    l.any(SYS_bind);
    l.any(SYS_listen);
    l.when(SYS_accept4, &[eq(3, SOCK_CLOEXEC)])?;
    l.any(SYS_unlink);
    // QEMU's messages and the fds that come with them; the connection is
    // cloned for the protocol thread and shut down at the end.
    l.any(SYS_recvmsg);
    l.any(SYS_sendmsg);
    l.any(SYS_shutdown);
    l.when(SYS_fcntl, &[eq(1, F_DUPFD_CLOEXEC)])?;
    l.any(SYS_read);
    // Guest memory: QEMU's memfd, mapped shared. Never executable.
    l.when(SYS_mmap, &[clear(2, PROT_EXEC)])?;
    // Vring kick fds go into the vring worker's epoll.
    l.any(SYS_epoll_ctl);
    // The protocol thread: glibc's clone (clone3 answers ENOSYS) for a
    // thread only, never a process; then the new thread's own start.
    l.when(SYS_clone, &[set(0, CLONE_THREAD)])?;
    l.any(SYS_set_robust_list);
    l.any(SYS_rseq);
    l.when(SYS_prctl, &[eq(0, PR_SET_NAME)])?;
    l.any(SYS_sched_getaffinity);
    Ok(())
}

fn signals(l: &mut AllowList) {
    use libc::*;
    // The signalfd, then the two sockets removed before the exit.
    l.any(SYS_read);
    l.any(SYS_unlink);
}
