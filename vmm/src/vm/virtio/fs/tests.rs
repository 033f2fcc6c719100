//! The device driven the way a guest driver drives it (queues built with
//! `virtio-queue`'s mock driver in the VMM's memfd guest memory), against
//! two backends: a small one written here with `vhost-user-backend`, which
//! records what the frontend told it and echoes each request, and the real
//! virtiofsd where it is installed, answering FUSE_INIT.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use super::config::FsConfig;
use super::device::{FsDevice, NUM_QUEUES};
use crate::seccomp::Filter;
use crate::vm::virtio::{GuestMemoryMmap, Interrupt, VirtioDevice};

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const RING_FEATURES: u64 = (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);
const QUEUE_SIZE: u16 = 16;
const REQUEST_QUEUE: usize = 1;
/// Where the test's driver puts its rings and buffers.
const HIPRIO_RING: u64 = 0x10_0000;
const REQUEST_RING: u64 = 0x20_0000;
const IN_BUF: u64 = 0x30_0000;
const OUT_BUF: u64 = 0x31_0000;
const OUT_LEN: u32 = 4096;

/// What the test backend was told, and saw.
#[derive(Default, Debug)]
struct Seen {
    acked_features: Option<u64>,
    /// (guest address, size) of each region of each SET_MEM_TABLE.
    mem_tables: Vec<Vec<(u64, u64)>>,
    /// Per request-queue kick: (size, desc table, avail ring, used ring)
    /// as the backend translated them back to guest addresses.
    rings: Vec<(u16, u64, u64, u64)>,
    stopped: Vec<u32>,
}

/// A vhost-user backend that answers every request chain with `echo:`
/// and the bytes it read.
struct EchoBackend {
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    seen: Arc<Mutex<Seen>>,
}

impl VhostUserBackend for EchoBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        VERSION_1 | RING_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.seen.lock().unwrap().acked_features = Some(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        let regions = mem
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        self.seen.lock().unwrap().mem_tables.push(regions);
        *self.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.seen.lock().unwrap().stopped.push(queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if usize::from(device_event) != REQUEST_QUEUE {
            return Ok(());
        }
        let Some(atomic) = self.mem.lock().unwrap().clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let vring = &vrings[REQUEST_QUEUE];
        {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            self.seen.lock().unwrap().rings.push((
                queue.size(),
                queue.desc_table(),
                queue.avail_ring(),
                queue.used_ring(),
            ));
            while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                let mut read = b"echo:".to_vec();
                for desc in chain.clone().readable() {
                    let mut buf = vec![0u8; desc.len() as usize];
                    mem.read_slice(&mut buf, desc.addr())
                        .map_err(std::io::Error::other)?;
                    read.extend(buf);
                }
                let mut written = 0;
                if let Some(out) = chain.writable().next() {
                    let len = read.len().min(out.len() as usize);
                    mem.write_slice(&read[..len], out.addr())
                        .map_err(std::io::Error::other)?;
                    written = len as u32;
                }
                queue
                    .add_used(&*mem, head, written)
                    .map_err(std::io::Error::other)?;
            }
        }
        vring.signal_used_queue()
    }
}

/// Serves `backend` on `socket` in a thread until the frontend leaves;
/// returns once the socket listens.
fn serve<B>(backend: Arc<B>, socket: &Path) -> std::thread::JoinHandle<()>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static,
{
    let path = socket.to_path_buf();
    let thread = std::thread::spawn(move || {
        let mut daemon = VhostUserDaemon::new(
            "test-fs".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        daemon.serve(&path).unwrap();
    });
    wait_for(|| socket.exists(), "the backend's socket");
    thread
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Counts the interrupts the device raises.
#[derive(Default)]
struct CountingInterrupt(AtomicUsize);

impl Interrupt for CountingInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The VMM's own guest memory (a shared memfd), for the test's lifetime.
fn guest_memory() -> &'static GuestMemoryMmap {
    let mib = crate::vm::boot::layout::MIN_MEM_MIB;
    Box::leak(Box::new(crate::vm::boot::guest_memory(mib).unwrap()))
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// The guest's side of a started device: both queues, and what kicks them.
struct Guest {
    mem: &'static GuestMemoryMmap,
    _hiprio: MockSplitQueue<'static, GuestMemoryMmap>,
    request: MockSplitQueue<'static, GuestMemoryMmap>,
    kicks: Vec<EventFd>,
    interrupt: Arc<CountingInterrupt>,
}

impl Guest {
    /// Sets up the queues and activates `device` with them, as the
    /// transport does at DRIVER_OK.
    fn start(device: &mut FsDevice) -> Guest {
        let mem = guest_memory();
        let hiprio = MockSplitQueue::create(mem, GuestAddress(HIPRIO_RING), QUEUE_SIZE);
        let request = MockSplitQueue::create(mem, GuestAddress(REQUEST_RING), QUEUE_SIZE);
        let queues: Vec<Queue> = vec![
            hiprio.create_queue().unwrap(),
            request.create_queue().unwrap(),
        ];
        let kicks: Vec<EventFd> = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let interrupt = Arc::new(CountingInterrupt::default());
        device.ack_features(VERSION_1);
        device
            .activate(
                GuestMemoryAtomic::new(mem.clone()),
                interrupt.clone(),
                queues,
                kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            )
            .unwrap();
        Guest {
            mem,
            _hiprio: hiprio,
            request,
            kicks,
            interrupt,
        }
    }

    /// Puts `request` in a readable buffer followed by a writable one on
    /// the request queue, kicks it, and returns the bytes the backend wrote
    /// once the device raised the interrupt.
    fn call(&mut self, request: &[u8]) -> Vec<u8> {
        self.mem.write_slice(request, GuestAddress(IN_BUF)).unwrap();
        self.request
            .add_desc_chains(
                &[
                    desc(IN_BUF, request.len() as u32, VRING_DESC_F_NEXT, 1),
                    desc(OUT_BUF, OUT_LEN, VRING_DESC_F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
        let before = self.interrupt.0.load(Ordering::SeqCst);
        self.kicks[REQUEST_QUEUE].write(1).unwrap();
        wait_for(
            || self.interrupt.0.load(Ordering::SeqCst) > before,
            "the used-buffer interrupt",
        );
        let used = self.request.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(idx, 1, "one chain used");
        let id: u32 = self.mem.read_obj(used.unchecked_add(4)).unwrap();
        let len: u32 = self.mem.read_obj(used.unchecked_add(8)).unwrap();
        assert_eq!(id, 0, "the chain's head");
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(OUT_BUF))
            .unwrap();
        out
    }
}

fn config(socket: &Path) -> FsConfig {
    FsConfig {
        socket: socket.to_path_buf(),
        tag: "kestrel".into(),
        queue_size: QUEUE_SIZE,
    }
}

#[test]
fn the_device_is_virtio_fs_with_the_tag_and_the_backends_ring_features() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let backend = Arc::new(EchoBackend {
        mem: Mutex::new(None),
        seen: seen.clone(),
    });
    let daemon = serve(backend, &socket);

    let device = FsDevice::new(&config(&socket), None).unwrap();

    assert_eq!(device.device_type(), VIRTIO_ID_FS);
    assert_eq!(device.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(device.features(), RING_FEATURES);
    let mut space = [0xffu8; 44];
    device.read_config(0, &mut space);
    assert_eq!(&space[..8], b"kestrel\0");
    assert_eq!(&space[36..40], &[1, 0, 0, 0], "one request queue");
    assert_eq!(&space[40..], &[0; 4], "nothing beyond the config space");
    drop(device);
    daemon.join().unwrap();
}

#[test]
fn activation_shares_guest_memory_and_rings_so_a_request_round_trips() {
    round_trip(None);
}

/// A device whose thread confines itself with `seccomp` activates, carries
/// one request to the test backend and its answer back, and resets; the
/// backend saw the guest's memory regions and rings.
pub(crate) fn round_trip(seccomp: Option<Filter>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let backend = Arc::new(EchoBackend {
        mem: Mutex::new(None),
        seen: seen.clone(),
    });
    let daemon = serve(backend, &socket);
    let mut device = FsDevice::new(&config(&socket), seccomp).unwrap();

    let mut guest = Guest::start(&mut device);
    let answer = guest.call(b"ping");

    assert_eq!(answer, b"echo:ping");
    {
        let seen = seen.lock().unwrap();
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(seen.acked_features, Some(VERSION_1 | protocol));
        let regions: Vec<(u64, u64)> = guest
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        assert_eq!(seen.mem_tables, vec![regions]);
        let ring = &guest.request;
        let expected = (
            QUEUE_SIZE,
            ring.desc_table_addr().0,
            ring.avail_addr().0,
            ring.used_addr().0,
        );
        assert!(!seen.rings.is_empty(), "the kick reached the backend");
        assert!(seen.rings.iter().all(|r| *r == expected), "{seen:?}");
    }

    assert!(device.reset(), "the backend stops the rings");
    let mut stopped = seen.lock().unwrap().stopped.clone();
    stopped.sort();
    assert_eq!(stopped, [0, 1]);
    drop(device);
    daemon.join().unwrap();
}

#[test]
fn a_backend_that_is_not_listening_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let err = FsDevice::new(&config(&socket), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none.sock") && err.contains("virtiofsd"),
        "{err}"
    );
}

#[test]
fn a_backend_without_version_1_is_refused() {
    struct Legacy;
    impl VhostUserBackend for Legacy {
        type Bitmap = ();
        type Vring = VringRwLock;
        fn num_queues(&self) -> usize {
            NUM_QUEUES
        }
        fn max_queue_size(&self) -> usize {
            1024
        }
        fn features(&self) -> u64 {
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::MQ
        }
        fn set_event_idx(&self, _enabled: bool) {}
        fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
            Ok(())
        }
        fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
        }
        fn handle_event(
            &self,
            _device_event: u16,
            _evset: EventSet,
            _vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let daemon = serve(Arc::new(Legacy), &socket);

    let err = FsDevice::new(&config(&socket), None)
        .unwrap_err()
        .to_string();

    assert!(err.contains("VIRTIO_F_VERSION_1"), "{err}");
    daemon.join().unwrap();
}

/// virtiofsd where `scripts/install-virtiofsd.sh` puts it, or on `PATH`.
fn virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/usr/libexec"),
        ])
        .map(|dir| dir.join("virtiofsd"))
        .find(|p| p.is_file())
}

const FUSE_INIT: u32 = 26;

#[test]
fn virtiofsd_answers_fuse_init_through_the_device() {
    let test = "vm::virtio::fs::tests::virtiofsd_answers_fuse_init_through_the_device";
    let Some(binary) = virtiofsd() else {
        crate::skip(
            test,
            "virtiofsd is not installed (scripts/install-virtiofsd.sh)",
        );
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        crate::skip(test, "virtiofsd needs root to serve a directory");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    let mut child = std::process::Command::new(binary)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&shared)
        .args([
            "--sandbox",
            "none",
            "--cache",
            "never",
            "--log-level",
            "warn",
        ])
        .spawn()
        .unwrap();
    wait_for(|| socket.exists(), "virtiofsd's socket");
    let mut device = FsDevice::new(&config(&socket), None).unwrap();
    assert_eq!(device.features() & RING_FEATURES, RING_FEATURES);
    let mut guest = Guest::start(&mut device);

    // fuse_in_header (len, opcode, unique, nodeid, uid, gid, pid, extlen,
    // padding), then fuse_init_in (major, minor, max_readahead, flags).
    let mut request = Vec::new();
    for (value, size) in [
        (56u64, 4),
        (u64::from(FUSE_INIT), 4),
        (7, 8),
        (0, 8),
        (0, 4),
        (0, 4),
        (0, 4),
        (0, 4),
        (7, 4),
        (31, 4),
        (0x2_0000, 4),
        (0, 4),
    ] {
        request.extend_from_slice(&value.to_le_bytes()[..size]);
    }
    let answer = guest.call(&request);

    // fuse_out_header (len, error, unique), then fuse_init_out (major, ...).
    assert!(answer.len() >= 24, "{answer:?}");
    let word = |at: usize| u32::from_le_bytes(answer[at..at + 4].try_into().unwrap());
    assert_eq!(word(0) as usize, answer.len(), "reply length");
    assert_eq!(word(4), 0, "FUSE_INIT error");
    assert_eq!(u64::from_le_bytes(answer[8..16].try_into().unwrap()), 7);
    assert_eq!(word(16), 7, "FUSE major version");

    drop(device);
    let status = child.wait().unwrap();
    assert!(status.success(), "virtiofsd left with {status}");
}
