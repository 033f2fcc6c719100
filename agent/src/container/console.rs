//! A terminal process's pty, allocated in the container's own devpts.
//!
//! A container mounts a devpts of its own (`newinstance`), so a pty the
//! agent opened in its devpts does not exist in there: `tty` would say "not
//! a tty" and `/dev/pts` would be empty. So, as runc does with its console
//! socket, the setup helper opens `/dev/ptmx` once it is inside the
//! container's mount namespace (after pivot_root for an init process, after
//! joining the namespaces for an exec), makes the slave its controlling
//! terminal and its stdio, and sends the master to the agent over a unix
//! socket pair with `SCM_RIGHTS`. The agent then serves the master as it
//! serves any stdio (see `stdio.rs`).
//!
//! The helper sends the master before it reports success on its control
//! socket (the `ok` line, or EOF once an exec'd program runs), so when the
//! agent has seen success the master is already queued on the console
//! socket and the agent reads it without waiting.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{grantpt, posix_openpt, unlockpt};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::{dup2, fchown, Uid};

use super::spec::ProcessConfig;
use crate::stdio::set_window_size;

/// The helper's end of the console socket.
pub const CONSOLE_FD: RawFd = 4;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console socket pair: {0}")]
    Pair(Errno),
    #[error("opening /dev/ptmx in the container (does it mount a devpts on /dev/pts?): {0}")]
    OpenMaster(Errno),
    #[error("unlocking the container's pty: {0}")]
    Unlock(Errno),
    #[error("opening the slave of the container's pty: {0}")]
    OpenSlave(std::io::Error),
    #[error("setting the container's terminal size: {0}")]
    Resize(std::io::Error),
    #[error("giving the container's pty to uid {uid}: {source}")]
    Chown { uid: u32, source: Errno },
    #[error("making the pty the controlling terminal: {0}")]
    ControllingTerminal(std::io::Error),
    #[error("putting the pty on fd {fd}: {source}")]
    Redirect { fd: RawFd, source: Errno },
    #[error("console socket: {0}")]
    Socket(Errno),
    #[error("sending the pty master to the agent: {0}")]
    Send(Errno),
    #[error("receiving the pty master from the setup helper: {0}")]
    Receive(Errno),
    #[error("the setup helper sent no pty master")]
    NoMaster,
    #[error("the setup helper sent a descriptor that is not a pty master")]
    NotAMaster,
    #[error("the setup helper sent more than one descriptor")]
    ExtraDescriptors,
}

/// The agent's end of a console socket.
pub struct ConsoleSocket(OwnedFd);

impl ConsoleSocket {
    /// The agent's end, and the end to place on the helper's [`CONSOLE_FD`].
    pub fn pair() -> Result<(ConsoleSocket, OwnedFd), ConsoleError> {
        let (agent, helper) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ConsoleError::Pair)?;
        Ok((ConsoleSocket(agent), helper))
    }

    /// Takes the pty master the helper sent. Call only once the helper
    /// reported success: the master is queued by then, so this never waits.
    pub fn receive_master(&self) -> Result<OwnedFd, ConsoleError> {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            self.0.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| match e {
            Errno::EAGAIN => ConsoleError::NoMaster,
            e => ConsoleError::Receive(e),
        })?;
        let mut received = Vec::new();
        for cmsg in msg.cmsgs().map_err(ConsoleError::Receive)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the kernel has just installed these descriptors in
                // our table for us; nothing else refers to them.
                received.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let mut received = received.into_iter();
        let master = received.next().ok_or(ConsoleError::NoMaster)?;
        if received.next().is_some() {
            return Err(ConsoleError::ExtraDescriptors);
        }
        let mut index: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int to the pointer we pass; it
        // fails on anything that is not a pty master.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut index) } != 0 {
            return Err(ConsoleError::NotAMaster);
        }
        Ok(master)
    }
}

/// In the helper: takes its end of the console socket, close-on-exec so the
/// container's program never inherits it.
pub fn adopt() -> Result<OwnedFd, ConsoleError> {
    fcntl(CONSOLE_FD, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(ConsoleError::Socket)?;
    // SAFETY: the agent placed the console socket at CONSOLE_FD before exec
    // and nothing else in this process owns that descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(CONSOLE_FD) })
}

/// In the helper, inside the container's mount namespace and a new session:
/// opens a pty of the container's devpts, makes its slave the controlling
/// terminal and stdio 0-2, and sends the master to the agent.
pub fn attach(socket: OwnedFd, process: &ProcessConfig) -> Result<(), ConsoleError> {
    // glibc's posix_openpt opens /dev/ptmx, which in a container's /dev is
    // the link to its own devpts' pts/ptmx.
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(ConsoleError::OpenMaster)?;
    grantpt(&master).map_err(ConsoleError::Unlock)?;
    unlockpt(&master).map_err(ConsoleError::Unlock)?;
    // SAFETY: into_raw_fd gives up nix's ownership of an open descriptor.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let slave = open_peer(&master)?;
    if let Some((rows, cols)) = process.console_size {
        set_window_size(master.as_fd(), rows, cols).map_err(ConsoleError::Resize)?;
    }
    // As runc does for stdio, so a non-root process owns its terminal; the
    // group (devpts' gid=, usually tty) stays.
    if process.uid != 0 {
        fchown(slave.as_raw_fd(), Some(Uid::from_raw(process.uid)), None).map_err(|source| {
            ConsoleError::Chown {
                uid: process.uid,
                source,
            }
        })?;
    }
    // SAFETY: TIOCSCTTY takes an int argument and touches no memory.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(ConsoleError::ControllingTerminal(
            std::io::Error::last_os_error(),
        ));
    }
    for fd in 0..3 {
        dup2(slave.as_raw_fd(), fd).map_err(|source| ConsoleError::Redirect { fd, source })?;
    }
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(b"m")],
        &[ControlMessage::ScmRights(&[master.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .map_err(ConsoleError::Send)?;
    Ok(())
}

/// Opens the slave through the master itself (TIOCGPTPEER), not by the name
/// ptsname gives: no path lookup that could reach another devpts.
fn open_peer(master: &OwnedFd) -> Result<OwnedFd, ConsoleError> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as an int and returns a new
    // descriptor, which we own from here on.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(ConsoleError::OpenSlave(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is the new descriptor TIOCGPTPEER just opened for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sent_master_is_received_and_anything_else_is_refused() {
        let (socket, helper) = ConsoleSocket::pair().unwrap();
        assert!(matches!(
            socket.receive_master(),
            Err(ConsoleError::NoMaster)
        ));
        let pty = nix::pty::openpty(None, None).unwrap();
        let send = |fd: RawFd| {
            sendmsg::<()>(
                helper.as_raw_fd(),
                &[IoSlice::new(b"m")],
                &[ControlMessage::ScmRights(&[fd])],
                MsgFlags::empty(),
                None,
            )
            .unwrap()
        };
        send(pty.master.as_raw_fd());
        let master = socket.receive_master().unwrap();
        // The received master is the same pty's: it reads the slave's writes.
        nix::unistd::write(&pty.slave, b"x").unwrap();
        let mut buf = [0u8; 1];
        nix::unistd::read(master.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf, b"x");

        send(pty.slave.as_raw_fd());
        assert!(matches!(
            socket.receive_master(),
            Err(ConsoleError::NotAMaster)
        ));
    }
}
