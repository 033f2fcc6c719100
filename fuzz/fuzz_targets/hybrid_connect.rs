//! The hybrid-vsock handshake: what a host program writes to the VMM's Unix
//! socket before `OK <port>\n`, read by `kestrel_vmm::vsock::unix::Handshake`
//! from a real socket, as the muxer reads it.
//!
//! The first byte splits the rest into two writes, so lines that arrive in
//! pieces are covered. Besides "no panic": a `Connect` is exactly what
//! `parse_connect` makes of the first line, and the bytes after its newline
//! stay in the socket for the guest, none of them eaten by the handshake.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use kestrel_vmm::vsock::unix::{parse_connect, Handshake, HandshakeStep};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    // More than fits the socket's buffer is a different test (back
    // pressure), and no handshake reads that far.
    if bytes.len() > 4096 {
        return;
    }
    let (mut host, ours) = UnixStream::pair().expect("socketpair");
    let mut handshake = Handshake::new(ours).expect("non-blocking socket");
    let (first, second) = bytes.split_at(usize::from(split).min(bytes.len()));

    host.write_all(first).expect("writing the first piece");
    let mut step = handshake.advance();
    let mut second_sent = false;
    if step == HandshakeStep::Pending {
        host.write_all(second).expect("writing the second piece");
        host.shutdown(Shutdown::Write)
            .expect("closing the host's end");
        second_sent = true;
        step = handshake.advance();
    }

    match step {
        HandshakeStep::Pending => panic!("a closed peer left the handshake pending"),
        HandshakeStep::Failed(_) => {}
        HandshakeStep::Connect(port) => {
            let newline = bytes
                .iter()
                .position(|&b| b == b'\n')
                .expect("a CONNECT ends at a newline");
            assert_eq!(
                parse_connect(&bytes[..newline]),
                HandshakeStep::Connect(port)
            );
            if !second_sent {
                host.write_all(second).expect("writing the second piece");
            }
            host.shutdown(Shutdown::Write).ok();
            let mut rest = Vec::new();
            handshake
                .stream
                .set_nonblocking(false)
                .expect("blocking read of the rest");
            handshake
                .stream
                .read_to_end(&mut rest)
                .expect("reading what follows the line");
            assert_eq!(rest, &bytes[newline + 1..], "the handshake ate guest bytes");
        }
    }
});
