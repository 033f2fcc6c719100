//! A booted guest's agent, driven the way the VM benchmarks drive it:
//! waiting until it answers SERVING, and moving bytes through it. The guest
//! image holds no vsock peer but the agent, so throughput goes through the
//! agent's own streams: CopyFile host→guest, a container's stdout
//! guest→host.

use std::path::Path;
use std::time::{Duration, Instant};

use kestrel_host::agent_client::AgentClient;
use kestrel_host::dial::{connect, Address};
use kestrel_host::rootfs::{copy_into_guest, guest_rootfs_path, CHUNK, GUEST_SHARED_DIR};
use kestrel_protocols::agent::CopyFileRequest;
use kestrel_protocols::health::{health_check_response::ServingStatus, CheckRequest};
use kestrel_protocols::health_ttrpc::HealthClient;
use kestrel_protocols::ttrpc::context;

use crate::{create_request, spec};

/// What the agent logs on the guest's console once it listens.
pub const SERVING_LINE: &str = "agent serving";
/// How often the console is looked at while the guest boots.
const POLL: Duration = Duration::from_millis(5);
/// How often the agent is dialled before its console line shows: every
/// dial reaches the booting guest's vsock device, so it must be rare.
const BLIND_DIAL: Duration = Duration::from_millis(500);

/// Clients of an agent that answered SERVING.
pub struct Serving {
    pub client: AgentClient,
    pub health: HealthClient,
}

/// Waits, up to `deadline`, until the agent at `address` answers
/// Health.Check with SERVING. It is dialled as soon as `console` (the
/// guest's serial log) shows [`SERVING_LINE`], and otherwise only every
/// [`BLIND_DIAL`], so that polling does not slow the boot it measures.
/// `alive` is asked on every round and ends the wait with its error (the
/// VM exited, say).
pub async fn wait_serving(
    address: &Address,
    console: &Path,
    deadline: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<Serving, String> {
    let started = Instant::now();
    let mut last = String::from("nothing tried yet");
    let mut dialled: Option<Instant> = None;
    loop {
        if started.elapsed() > deadline {
            return Err(format!("no SERVING agent after {deadline:?} ({last})"));
        }
        alive()?;
        let due = dialled.is_none_or(|t| t.elapsed() >= BLIND_DIAL) || console_serving(console);
        if !due {
            tokio::time::sleep(POLL).await;
            continue;
        }
        dialled = Some(Instant::now());
        let client = match connect(address, Duration::from_secs(1)).await {
            Ok(client) => client,
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let health = HealthClient::new(client.clone());
        match health
            .check(
                context::with_duration(Duration::from_secs(2)),
                &CheckRequest::new(),
            )
            .await
        {
            Ok(resp) if resp.status.enum_value() == Ok(ServingStatus::SERVING) => {
                return Ok(Serving {
                    client: AgentClient::from_client(client, Duration::from_secs(60)),
                    health,
                });
            }
            Ok(resp) => last = format!("Health.Check answered {:?}", resp.status),
            Err(e) => last = format!("Health.Check: {e}"),
        }
        tokio::time::sleep(POLL).await;
    }
}

fn console_serving(console: &Path) -> bool {
    std::fs::read(console).is_ok_and(|log| {
        log.windows(SERVING_LINE.len())
            .any(|w| w == SERVING_LINE.as_bytes())
    })
}

/// The last `lines` lines of a console log.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn blob_request(file_size: usize, offset: usize, data: Vec<u8>) -> CopyFileRequest {
    CopyFileRequest {
        path: format!("{GUEST_SHARED_DIR}/bench/blob"),
        file_size: file_size as i64,
        file_mode: libc::S_IFREG | 0o644,
        dir_mode: 0o750,
        offset: offset as i64,
        data,
        ..Default::default()
    }
}

async fn send(client: &AgentClient, req: CopyFileRequest) -> Result<(), String> {
    client
        .copy_file(req)
        .await
        .map_err(|e| format!("CopyFile: {e}"))
}

/// Sends one `file_size` file of `chunk`s (of [`CHUNK`] bytes, as
/// `kestrel_host::rootfs` sends files) and says how long it took. The
/// guest's /run (a tmpfs of half its RAM) cannot hold the old copy and the
/// new one's `.kestrel-partial` at once, so an empty file replaces the old
/// copy first, untimed.
pub async fn copy_file(
    client: &AgentClient,
    chunk: &[u8],
    file_size: usize,
) -> Result<Duration, String> {
    send(client, blob_request(0, 0, Vec::new())).await?;
    let t = Instant::now();
    for offset in (0..file_size).step_by(CHUNK) {
        send(client, blob_request(file_size, offset, chunk.to_vec())).await?;
    }
    Ok(t.elapsed())
}

/// Copies `rootfs` into the guest, runs `dd if=/dev/zero bs=1M
/// count=<mib>` there as container `id` and reads its stdout: bytes per
/// second from the first byte read to the end.
pub async fn output_rate(
    client: &AgentClient,
    rootfs: &Path,
    id: &str,
    mib: usize,
) -> Result<f64, String> {
    let guest_root = guest_rootfs_path(GUEST_SHARED_DIR, id);
    copy_into_guest(client, rootfs, &guest_root, None)
        .await
        .map_err(|e| format!("copying the rootfs: {e}"))?;
    let count = format!("count={mib}");
    let args = ["dd", "if=/dev/zero", "bs=1M", count.as_str()];
    client
        .create_container(create_request(id, spec(Path::new(&guest_root), &args)))
        .await
        .map_err(|e| format!("CreateContainer: {e}"))?;
    client
        .start_container(id)
        .await
        .map_err(|e| format!("StartContainer: {e}"))?;
    let mut first: Option<Instant> = None;
    let mut bytes = 0usize;
    let mut total = 0usize;
    while let Some(data) = client
        .read_stdout(id, "", CHUNK as u32)
        .await
        .map_err(|e| format!("ReadStdout: {e}"))?
    {
        total += data.len();
        match first {
            None => first = Some(Instant::now()),
            Some(_) => bytes += data.len(),
        }
    }
    let elapsed = first.map(|t| t.elapsed()).unwrap_or_default();
    let status = client
        .wait_process(id, "")
        .await
        .map_err(|e| format!("WaitProcess: {e}"))?;
    client
        .remove_container(id, Duration::from_secs(10))
        .await
        .map_err(|e| format!("RemoveContainer: {e}"))?;
    if status != 0 || total != mib << 20 {
        return Err(format!(
            "dd exited {status} after {total} bytes of stdout (expected {})",
            mib << 20
        ));
    }
    Ok(bytes as f64 / elapsed.as_secs_f64())
}
