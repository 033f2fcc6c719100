//! ttrpc frames into the agent: the bytes a runtime (or anything that can
//! reach vsock port 1024) writes, into the agent server `kestrel-agent`
//! serves (`server::server`: its listener wrapped in `unknown_service`'s
//! frame-rewriting `Redirect`, the agent's own services) over a `Sandbox`
//! in host mode, listening on a Unix socket in this process, so coverage
//! and panics of its threads count.
//!
//! Input: pieces, each a kind byte, a big-endian u16 length and that many
//! bytes. An even kind makes a request frame of the bytes (a `Request`
//! message, ideally), with a header that fits and the stream id the next
//! two bytes give; an odd kind writes the bytes as they are (headers that
//! lie about lengths, truncated frames). Besides "no panic": whatever the
//! agent answers is well-formed ttrpc.
//!
//! The agent runs as it does on a host: as root it may make cgroups and
//! mounts. `scripts/fuzz.sh` runs this target in its own mount and network
//! namespaces, so what a request manages to mount goes away with it.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use kestrel_agent::reaper::Reaper;
use kestrel_agent::sandbox::Sandbox;
use kestrel_agent::server;
use kestrel_protocols::protobuf::Message;
use kestrel_protocols::ttrpc::proto::MESSAGE_HEADER_LENGTH;
use kestrel_protocols::ttrpc::r#async::transport::Listener;
use kestrel_protocols::ttrpc::{self, Response};
use libfuzzer_sys::fuzz_target;

/// How long an input waits for the agent's answers. Some methods never
/// answer on their own (GetOOMEvent, WaitProcess of a live process); the
/// fuzzer moves on without them.
const ANSWER_WAIT: Duration = Duration::from_millis(100);

/// The agent's directory: a fixed path, so the seeds' CopyFile paths
/// (below `shared/`) name it. One agent_ttrpc run at a time.
const AGENT_DIR: &str = "/tmp/kestrel-fuzz-agent";

/// The socket of the agent this process serves, started once.
fn agent() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = PathBuf::from(AGENT_DIR);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the agent's directory");
        let socket = dir.join("agent.sock");
        let shared = dir.join("shared");
        let address = format!("unix://{}", socket.display());
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let reaper = Reaper::default();
                reaper.start().expect("SIGCHLD handler");
                let sandbox = Arc::new(Sandbox::new(reaper, shared, false));
                let listener = Listener::bind(&address).expect("binding the agent socket");
                let mut server = server::server(listener, sandbox);
                server.start().await.expect("starting the agent server");
                ready_tx.send(()).expect("fuzz thread waits");
                std::future::pending::<()>().await;
            });
        });
        ready_rx.recv().expect("the agent server started");
        socket
    })
}

/// The bytes to write, from the fuzz input (see the module doc).
fn frames(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let [kind, hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (body, tail) = rest.split_at(len);
        data = tail;
        if kind % 2 == 1 {
            out.extend_from_slice(body);
            continue;
        }
        let (stream_id, body) = match body {
            [a, b, body @ ..] => (u32::from(u16::from_be_bytes([*a, *b])), body),
            _ => (1, body),
        };
        let header = ttrpc::MessageHeader::new_request(stream_id, body.len() as u32);
        out.extend_from_slice(&Vec::<u8>::from(header));
        out.extend_from_slice(body);
    }
    out
}

/// Checks that every complete frame the agent sent is a response or data
/// frame, and that a response carries a `Response` message.
fn check_answers(mut answers: &[u8]) {
    while answers.len() >= MESSAGE_HEADER_LENGTH {
        let header = ttrpc::MessageHeader::from(&answers[..MESSAGE_HEADER_LENGTH]);
        let end = MESSAGE_HEADER_LENGTH + header.length as usize;
        let Some(payload) = answers.get(MESSAGE_HEADER_LENGTH..end) else {
            return;
        };
        match header.type_ {
            ttrpc::proto::MESSAGE_TYPE_RESPONSE => {
                Response::parse_from_bytes(payload).expect("the agent's response decodes");
            }
            ttrpc::proto::MESSAGE_TYPE_DATA => {}
            other => panic!("the agent sent a frame of type {other}"),
        }
        answers = &answers[end..];
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = frames(data);
    let Ok(mut stream) = UnixStream::connect(agent()) else {
        panic!("the agent stopped accepting connections");
    };
    stream
        .set_write_timeout(Some(ANSWER_WAIT))
        .expect("timeout");
    stream.set_read_timeout(Some(ANSWER_WAIT)).expect("timeout");
    // The agent may close the connection over a bad frame before reading
    // everything: a failed write is an answer too.
    if stream.write_all(&bytes).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let mut answers = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answers.extend_from_slice(&buf[..n]),
        }
    }
    check_answers(&answers);
});
