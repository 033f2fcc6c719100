//! The builtin KVM VMM behind `kestrel-vmm`: one KVM VM with an in-kernel
//! irqchip and PIT, guest RAM from `vm-memory`, vCPU threads, an 8250 on
//! COM1, an i8042 whose reset ends the VM, and on virtio-mmio optionally a
//! virtio-vsock device with a Firecracker-style hybrid Unix socket,
//! virtio-net devices on taps the caller opened, and virtio-fs devices
//! served by vhost-user-fs backends (virtiofsd) the caller started. Guest
//! RAM is a memfd mapped shared, so those backends can map it too.
//!
//! [`Vm::new`] builds everything (kernel loaded, devices wired, vCPUs set
//! up) without running the guest; [`Vm::run`] starts the vCPUs and waits
//! until the guest ends, a vCPU meets an exit it cannot handle, or the
//! caller's stop fd becomes readable.
//!
//! Each thread confines itself with its [`crate::seccomp`] filter as it
//! starts (the device threads in [`Vm::new`], the vCPU threads and
//! then the calling thread in [`Vm::run`]), unless the config says not to.

pub mod boot;
pub mod bus;
pub mod devices;
pub mod vcpu;
pub mod virtio;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use kestrel_guest_image::VmShape;

use self::boot::{layout, BootError, KernelImage};
use self::bus::Bus;
use self::devices::{SerialDevice, COM1_BASE, COM1_GSI, COM1_LEN, I8042, I8042_BASE, I8042_LEN};
pub use self::vcpu::VmExit;
use self::vcpu::{ExitSlot, VcpuThread};
use self::virtio::fs::{FsConfig, FsDevice};
use self::virtio::mmio::MMIO_LEN;
use self::virtio::net::{NetConfig, NetDevice, Tap};
use self::virtio::vsock::VsockDevice;
use self::virtio::{GuestMemoryMmap, MmioTransport};
use crate::seccomp::{Filter, ThreadKind};
use crate::vsock::unix::SocketFile;
use crate::vsock::{Muxer, MuxerConfig};

/// The command line used when the caller gives none: the one our guest
/// image boots with.
pub const DEFAULT_CMDLINE: &str = kestrel_guest_image::KERNEL_PARAMS;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    Stdout,
    File(PathBuf),
}

/// Appended to the command line unless it says otherwise: the VM has no
/// ACPI tables (the MP table describes its CPUs and I/O APIC), so the
/// kernel's search for them could only fail, as "ACPI BIOS Error (bug): A
/// valid RSDP was not found". Without ACPI the guest cannot power off; it
/// reboots, and `reboot=k` makes that an i8042 reset, which ends the VM.
pub const NO_ACPI: &str = "acpi=off";

/// One GSI each from [`layout::IRQ_BASE`] to [`layout::IRQ_MAX`].
const MAX_VIRTIO_DEVICES: usize = (layout::IRQ_MAX - layout::IRQ_BASE + 1) as usize;

/// Whether `cmdline` already has an `acpi=` option.
fn names_acpi(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w.starts_with("acpi="))
}

/// The VM to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line; the VMM appends [`NO_ACPI`] (unless it has
    /// an `acpi=` option) and its `virtio_mmio.device=` entries.
    pub cmdline: String,
    /// Guest memory and vCPUs.
    pub shape: VmShape,
    /// The hybrid vsock socket; no vsock device without it.
    pub vsock_uds: Option<PathBuf>,
    pub vsock_cid: u64,
    /// One virtio-net device each, in this order after the vsock device,
    /// so the first is the guest's eth0.
    pub nets: Vec<NetConfig>,
    /// One virtio-fs device each, after the NICs, each connected to its
    /// backend's socket when the VM is built.
    pub filesystems: Vec<FsConfig>,
    pub serial: SerialOut,
    /// Whether the VMM's threads confine themselves with seccomp filters
    /// (`--no-seccomp` turns it off).
    pub seccomp: bool,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            shape: VmShape::default(),
            vsock_uds: None,
            vsock_cid: crate::vsock::DEFAULT_GUEST_CID,
            nets: Vec::new(),
            filesystems: Vec::new(),
            serial: SerialOut::Stdout,
            seccomp: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the {what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot open the {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Vsock(#[from] crate::vsock::Error),
    #[error(transparent)]
    VsockDevice(#[from] self::virtio::vsock::Error),
    #[error(transparent)]
    Net(#[from] self::virtio::net::Error),
    #[error(transparent)]
    Fs(#[from] self::virtio::fs::Error),
    #[error("the tag {0} is given to more than one --fs")]
    FsTagRepeated(String),
    #[error("tap-fd {0} is given to more than one --net")]
    TapFdRepeated(i32),
    #[error("{0} virtio devices asked for; the VM has interrupts for {max}", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    #[error("wiring the devices: {0}")]
    Devices(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

/// A built VM, ready to run.
pub struct Vm {
    /// Both kept open for the VM's lifetime: vCPUs and devices refer to the
    /// VM, and some KVM implementations (the nested `kvm_pvm`) tear the VM
    /// down with the /dev/kvm fd.
    _kvm: Kvm,
    _vm: VmFd,
    /// The guest's RAM: KVM's memory slots point into these mappings.
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitSlot>,
    /// The hybrid vsock socket's file, removed with the VM.
    vsock_socket: Option<SocketFile>,
    seccomp: bool,
}

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Vm, VmmError> {
        // Everything that depends only on the input first: a wrong path or
        // size is reported the same way with or without KVM.
        let mem = boot::guest_memory(config.shape.memory_mib.into())?;
        let image = load_images(&mem, config)?;
        let initrd = initrd_of(&mem, config, &image)?;
        if let Some(uds) = &config.vsock_uds {
            if uds.symlink_metadata().is_ok() {
                return Err(crate::vsock::Error::SocketExists(uds.clone()).into());
            }
        }
        for (i, fs) in config.filesystems.iter().enumerate() {
            if config.filesystems[..i].iter().any(|f| f.tag == fs.tag) {
                return Err(VmmError::FsTagRepeated(fs.tag.clone()));
            }
        }
        let devices =
            usize::from(config.vsock_uds.is_some()) + config.nets.len() + config.filesystems.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(VmmError::TooManyDevices(devices));
        }
        // Each tap is taken over (and closed with the VM) once; checked,
        // and its header size set, before any thread confines itself.
        let mut taps = Vec::with_capacity(config.nets.len());
        for (i, net) in config.nets.iter().enumerate() {
            if config.nets[..i].iter().any(|n| n.tap_fd == net.tap_fd) {
                return Err(VmmError::TapFdRepeated(net.tap_fd));
            }
            taps.push(Tap::from_inherited_fd(net.tap_fd).map_err(virtio::net::Error::from)?);
        }

        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        register_memory(&vm, &mem)?;

        let exit = Arc::new(ExitSlot::new().map_err(io_err("creating the exit event"))?);
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let mut cmdline =
            Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| VmmError::Cmdline(e.to_string()))?;
        cmdline
            .insert_str(&config.cmdline)
            .map_err(|e| VmmError::Cmdline(e.to_string()))?;
        if !names_acpi(&config.cmdline) {
            cmdline
                .insert_str(NO_ACPI)
                .map_err(|e| VmmError::Cmdline(e.to_string()))?;
        }

        let serial = SerialDevice::new(serial_writer(&config.serial)?)
            .map_err(io_err("creating the serial port"))?;
        vm.register_irqfd(serial.irq_evt(), COM1_GSI)
            .map_err(kvm_err("wire the serial interrupt"))?;
        insert(&mut pio, Arc::new(Mutex::new(serial)), COM1_BASE, COM1_LEN)?;
        let reset = exit
            .evt
            .try_clone()
            .map_err(io_err("cloning the exit event"))?;
        let i8042 = I8042::new(reset);
        insert(&mut pio, Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;

        // Bound now, so a taken path is reported before the guest boots;
        // removed when `vsock_socket` drops, on this thread or the one
        // `Vm::run` runs on (see `Muxer::take_socket_file`).
        let mut vsock_socket = None;
        if let Some(uds) = &config.vsock_uds {
            let mut muxer = Muxer::new(MuxerConfig::new(config.vsock_cid, uds))?;
            vsock_socket = muxer.take_socket_file();
            let filter = filter_if(config.seccomp, ThreadKind::Vsock)?;
            let device = VsockDevice::new(muxer, filter)?;
            add_virtio_mmio(&vm, &mem, &mut mmio, &mut cmdline, Box::new(device), 0)?;
        }
        let first_net = u32::from(config.vsock_uds.is_some());
        for (index, (net, tap)) in config.nets.iter().zip(taps).enumerate() {
            tracing::info!(
                index,
                tap = tap.name(),
                mac = %net.mac,
                mtu = net.mtu,
                offload = net.offload,
                "virtio-net device"
            );
            let filter = filter_if(config.seccomp, ThreadKind::Net)?;
            let device = NetDevice::new(index, tap, net, filter)?;
            let slot = first_net + index as u32;
            add_virtio_mmio(&vm, &mem, &mut mmio, &mut cmdline, Box::new(device), slot)?;
        }
        let first_fs = first_net + config.nets.len() as u32;
        for (index, fs) in config.filesystems.iter().enumerate() {
            tracing::info!(
                index,
                tag = fs.tag,
                socket = %fs.socket.display(),
                queue_size = fs.queue_size,
                "virtio-fs device"
            );
            let filter = filter_if(config.seccomp, ThreadKind::Fs)?;
            let device = FsDevice::new(fs, filter)?;
            let slot = first_fs + index as u32;
            add_virtio_mmio(&vm, &mem, &mut mmio, &mut cmdline, Box::new(device), slot)?;
        }

        let vcpu_count = config.shape.vcpus;
        boot::configure_system(&mem, &image, &cmdline, initrd.as_ref(), vcpu_count)?;
        let mut vcpus = Vec::with_capacity(vcpu_count.into());
        for id in 0..vcpu_count {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            boot::setup_vcpu(&kvm, &vcpu, &mem, &image, id, vcpu_count)?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            vcpus,
            pio,
            mmio,
            exit,
            vsock_socket,
            seccomp: config.seccomp,
        })
    }

    /// Runs the guest until it ends, a vCPU fails, or `stop` is readable.
    /// Removes the vsock socket before returning.
    ///
    /// Once the vCPUs run, the calling thread confines itself with the VMM
    /// filter: after this returns it may only log and exit.
    pub fn run(mut self, stop: Option<BorrowedFd<'_>>) -> Result<VmExit, VmmError> {
        let vcpu_filter = filter_if(self.seccomp, ThreadKind::Vcpu)?;
        let vmm_filter = filter_if(self.seccomp, ThreadKind::Vmm)?;
        vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        let halt = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<VcpuThread> = Vec::new();
        let mut outcome = Ok(());
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let started = vcpu::spawn(
                id as u8,
                fd,
                self.pio.clone(),
                self.mmio.clone(),
                self.exit.clone(),
                halt.clone(),
                vcpu_filter.clone(),
            );
            match started {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    outcome = Err(e.into());
                    break;
                }
            }
        }
        if let (Ok(()), Some(filter)) = (&outcome, &vmm_filter) {
            outcome = filter.install().map_err(VmmError::from);
        }
        let exit = match outcome {
            Ok(()) => Ok(self.wait(stop)),
            Err(e) => Err(e),
        };
        halt.store(true, Ordering::Release);
        for thread in threads {
            thread.stop(Duration::from_millis(500));
        }
        drop(self.vsock_socket.take());
        exit
    }

    fn wait(&self, stop: Option<BorrowedFd<'_>>) -> VmExit {
        let mut fds = vec![libc::pollfd {
            fd: self.exit.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(stop) = stop {
            fds.push(libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        loop {
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return VmExit::Failed {
                    vcpu: 0,
                    reason: format!("waiting for the VM: {e}"),
                    rip: None,
                };
            }
            if fds.get(1).is_some_and(|f| f.revents != 0) {
                return VmExit::Stopped;
            }
            if fds[0].revents != 0 {
                let _ = self.exit.evt.read();
                // The i8042 writes the event without a reason: a reset.
                return self.exit.take().unwrap_or(VmExit::Reset);
            }
        }
    }
}

/// `kind`'s filter, or `None` where seccomp is off.
fn filter_if(seccomp: bool, kind: ThreadKind) -> Result<Option<Filter>, VmmError> {
    Ok(seccomp.then(|| Filter::new(kind)).transpose()?)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Devices(format!("guest memory: {e}")))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which `Vm`
        // keeps for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}

fn load_images(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<KernelImage, VmmError> {
    let mut kernel = open(&config.kernel, "kernel")?;
    Ok(boot::load_kernel(mem, &mut kernel)?)
}

fn initrd_of(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    image: &KernelImage,
) -> Result<Option<boot::InitrdRange>, VmmError> {
    let Some(path) = &config.initrd else {
        return Ok(None);
    };
    let mut initrd = open(path, "initrd")?;
    Ok(Some(boot::load_initrd(mem, image, &mut initrd)?))
}

fn open(path: &Path, what: &'static str) -> Result<File, VmmError> {
    File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => VmmError::Missing {
            what,
            path: path.to_path_buf(),
        },
        _ => VmmError::File {
            what,
            path: path.to_path_buf(),
            source,
        },
    })
}

fn serial_writer(out: &SerialOut) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match out {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(path) => Box::new(File::create(path).map_err(|source| VmmError::File {
            what: "serial output file",
            path: path.clone(),
            source,
        })?),
    })
}

fn insert(
    bus: &mut Bus,
    device: Arc<Mutex<dyn bus::BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), VmmError> {
    bus.insert(device, base, len)
        .map_err(|e| VmmError::Devices(e.to_string()))
}

/// Puts a virtio device on the MMIO bus at slot `index`: its window, its
/// interrupt (irqfd), its queue notifications (ioeventfds), and the
/// `virtio_mmio.device=` entry that tells the guest where it is.
fn add_virtio_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
    device: Box<dyn virtio::VirtioDevice>,
    index: u32,
) -> Result<(), VmmError> {
    let base = layout::MMIO_START + u64::from(index) * MMIO_LEN;
    let gsi = layout::IRQ_BASE + index;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating a device interrupt"))?;
    vm.register_irqfd(&irq, gsi)
        .map_err(kvm_err("wire a virtio interrupt"))?;
    let transport = MmioTransport::new(GuestMemoryAtomic::new(mem.clone()), device, irq)
        .map_err(io_err("creating the virtio-mmio transport"))?;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), queue as u32)
            .map_err(kvm_err("wire a virtio queue notification"))?;
    }
    insert(mmio, Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
    cmdline
        .add_virtio_mmio_device(MMIO_LEN, vm_memory::GuestAddress(base), gsi, None)
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::names_acpi;

    #[test]
    fn acpi_is_turned_off_unless_the_command_line_names_it() {
        assert!(!names_acpi("console=ttyS0 reboot=k panic=1 pci=off"));
        assert!(!names_acpi("noacpi_like_word acpi_rsdp"));
        assert!(names_acpi("console=ttyS0 acpi=force"));
        assert!(names_acpi("acpi=off"));
    }
}
