//! vCPU threads: run the guest, hand port and MMIO exits to the buses, and
//! turn every other exit into a [`VmExit`] for the main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use super::bus::Bus;
use crate::seccomp::{self, Filter};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset with `reboot=k`, or a
    /// KVM system-event reset): a deliberate end, exit status 0.
    Reset,
    /// The guest shut down (triple fault, or a system-event shutdown).
    Shutdown,
    /// The VMM was asked to stop (SIGTERM / SIGINT).
    Stopped,
    /// A KVM exit the VMM cannot handle, or a failing KVM_RUN.
    Failed {
        vcpu: u8,
        reason: String,
        rip: Option<u64>,
    },
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => f.write_str("the guest reset the machine"),
            VmExit::Shutdown => f.write_str("the guest shut down"),
            VmExit::Stopped => f.write_str("stopped on request"),
            VmExit::Failed { vcpu, reason, rip } => {
                write!(f, "vCPU {vcpu}: {reason}")?;
                match rip {
                    Some(rip) => write!(f, " at RIP {rip:#x}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Where vCPUs report the first exit; the main thread waits on `evt`.
#[derive(Debug)]
pub struct ExitSlot {
    reason: Mutex<Option<VmExit>>,
    pub evt: EventFd,
}

impl ExitSlot {
    pub fn new() -> std::io::Result<ExitSlot> {
        Ok(ExitSlot {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` unless an earlier one was; wakes the main thread.
    pub fn report(&self, exit: VmExit) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(exit);
        let _ = self.evt.write(1);
    }

    pub fn take(&self) -> Option<VmExit> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The signal that knocks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the kick signal: its only job is to make
/// KVM_RUN return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_kick)
        .map_err(std::io::Error::from)
}

#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<Option<()>>,
}

/// Starts vCPU `id` running the guest, once its thread has confined itself
/// with `seccomp`, the vCPU filter (`None` with `--no-seccomp`).
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitSlot>,
    stop: Arc<AtomicBool>,
    seccomp: Option<Filter>,
) -> Result<VcpuThread, seccomp::Error> {
    let handle = seccomp::spawn_confined(&format!("kestrel-vcpu{id}"), seccomp, move || {
        if let Some(reason) = run(id, &mut vcpu, &pio, &mmio, &stop) {
            exit.report(reason);
        }
    })?;
    Ok(VcpuThread { handle })
}

impl VcpuThread {
    /// Stops the thread: kicks it out of KVM_RUN until it notices `stop`.
    /// Gives up after `patience` (the process exit ends it anyway).
    pub fn stop(self, patience: Duration) {
        use std::os::unix::thread::JoinHandleExt;
        let deadline = Instant::now() + patience;
        while !self.handle.is_finished() && Instant::now() < deadline {
            // SAFETY: the thread is alive (not finished) and owned by us;
            // the signal has a no-op handler.
            unsafe { libc::pthread_kill(self.handle.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.handle.is_finished() {
            let _ = self.handle.join();
        }
    }
}

/// The environment variable a benchmark sets to the CLOCK_MONOTONIC time
/// (ns) at which it started us; vCPU 0 then logs how long it took to reach
/// its first KVM_RUN.
pub const T0_ENV: &str = "KESTREL_VMM_T0_NS";

fn monotonic_ns() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |now| Duration::from(now).as_nanos())
}

fn log_start_time(id: u8) {
    let Some(t0) = std::env::var(T0_ENV)
        .ok()
        .and_then(|v| v.parse::<u128>().ok())
    else {
        return;
    };
    if id == 0 {
        let since_exec_us = monotonic_ns().saturating_sub(t0) / 1000;
        tracing::info!(since_exec_us = since_exec_us as u64, "first KVM_RUN");
    }
}

fn run(id: u8, vcpu: &mut VcpuFd, pio: &Bus, mmio: &Bus, stop: &AtomicBool) -> Option<VmExit> {
    let failed = |vcpu: &VcpuFd, reason: String| VmExit::Failed {
        vcpu: id,
        reason,
        rip: vcpu.get_regs().ok().map(|r| r.rip),
    };
    log_start_time(id);
    loop {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Some(failed(vcpu, format!("KVM_RUN failed: {e}"))),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !pio.read(u64::from(port), data) {
                    // Nothing there: reads float high, like an empty ISA bus.
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                pio.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio.write(addr, data);
            }
            VcpuExit::Shutdown => {
                tracing::debug!(rip = ?vcpu.get_regs().ok().map(|r| r.rip), "triple fault");
                return Some(VmExit::Shutdown);
            }
            VcpuExit::SystemEvent(kind, _) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    other => failed(vcpu, format!("unhandled KVM system event {other}")),
                })
            }
            VcpuExit::Hlt => {
                tracing::debug!(rip = ?vcpu.get_regs().ok().map(|r| r.rip), "halted");
                return Some(VmExit::Shutdown);
            }
            VcpuExit::InternalError => {
                return Some(failed(
                    vcpu,
                    "KVM internal error (the instruction could not be emulated)".into(),
                ))
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Some(failed(
                    vcpu,
                    format!(
                        "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                    ),
                ))
            }
            other => {
                let reason = format!("unhandled KVM exit {other:?}");
                return Some(failed(vcpu, reason));
            }
        }
    }
}
