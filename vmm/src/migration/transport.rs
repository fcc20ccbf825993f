//! Connections: TCP between hosts, a Unix socket on one host. Every read and write
//! gives up when the migration is cancelled, or when the peer makes no progress for
//! `STALL_TIMEOUT`, so no thread waits forever on a dead peer.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::migration::Endpoint;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::MigrationError;

/// How long a peer may make no progress before the migration fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A post-copy destination's bound, half the source's: when the link goes silent, the
/// destination freezes its guest before the source gives up and says that it may run
/// its own copy.
pub const DESTINATION_STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a blocked read or write looks at the cancel flag.
const POLL: Duration = Duration::from_millis(POLL_MS as u64);
const POLL_MS: libc::c_int = 50;
/// The most one `read` or `write` moves on a connection that shares the host with
/// post-copy's fault threads (`Conn::share_cores`). This kernel does not preempt a
/// thread inside a system call (`PREEMPT_NONE`), so a 1 MiB page batch written or read
/// in one call kept a woken fault thread waiting behind it for up to a millisecond.
const SHARED_IO_BYTES: usize = 64 << 10;

/// A connected stream of either family.
pub enum Stream {
    /// Between hosts.
    Tcp(TcpStream),
    /// On one host.
    Unix(UnixStream),
}

impl Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn setup(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(POLL))?;
                s.set_write_timeout(Some(POLL))?;
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(POLL))?;
                s.set_write_timeout(Some(POLL))?;
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One migration connection: the stream, and the flag that cancels it.
pub struct Conn {
    stream: Stream,
    cancel: Arc<AtomicBool>,
    /// Bytes read and written, for progress.
    pub bytes: u64,
    /// Saying why this side gives up: a cancel must not stop that message.
    closing: bool,
    /// A frame was only partly written: no other frame may follow it.
    pub(super) torn: bool,
    /// How long the peer may send or take nothing.
    stall: Duration,
    /// The most one system call reads or writes.
    io_bytes: usize,
}

fn is_wait(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: Stream, cancel: Arc<AtomicBool>) -> Result<Conn, MigrationError> {
        stream
            .setup()
            .map_err(|e| MigrationError::io("set up the connection", e))?;
        Ok(Conn {
            stream,
            cancel,
            bytes: 0,
            closing: false,
            torn: false,
            stall: STALL_TIMEOUT,
            io_bytes: usize::MAX,
        })
    }

    /// Gives up on a peer silent for `stall` rather than `STALL_TIMEOUT`.
    pub fn set_stall(&mut self, stall: Duration) {
        self.stall = stall;
    }

    /// From now on reads and writes at most `SHARED_IO_BYTES` per system call: the
    /// bulk of post-copy, whose threads would otherwise keep a fault thread waiting.
    /// Pre-copy moves pages faster in larger calls.
    pub fn share_cores(&mut self) {
        self.io_bytes = SHARED_IO_BYTES;
    }

    /// Fails if a cancel was asked for: looked at between frames, and while waiting
    /// on the peer.
    pub fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Whether a cancel was asked for.
    pub fn cancelled(&self) -> bool {
        !self.closing && self.cancel.load(Ordering::Acquire)
    }

    /// From now on only the last message goes out, cancelled or not.
    pub fn closing(&mut self) {
        self.closing = true;
    }

    fn waited(&self, since: Instant, what: &str) -> Result<(), MigrationError> {
        if self.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if since.elapsed() > self.stall {
            return Err(MigrationError::Stalled(format!(
                "the peer {what} nothing for {} s",
                self.stall.as_secs()
            )));
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes.
    pub fn read_all(&mut self, buf: &mut [u8]) -> Result<(), MigrationError> {
        let mut done = 0;
        let mut progress = Instant::now();
        while done < buf.len() {
            let end = buf.len().min(done.saturating_add(self.io_bytes));
            match self.stream.read(&mut buf[done..end]) {
                Ok(0) => return Err(MigrationError::Closed),
                Ok(n) => {
                    done += n;
                    progress = Instant::now();
                }
                Err(e) if is_wait(&e) => self.waited(progress, "sent")?,
                Err(e) => return Err(MigrationError::io("read from the peer", e)),
            }
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Writes all of `buf`.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), MigrationError> {
        let mut done = 0;
        let mut progress = Instant::now();
        while done < buf.len() {
            let end = buf.len().min(done.saturating_add(self.io_bytes));
            match self.stream.write(&buf[done..end]) {
                Ok(0) => return Err(MigrationError::Closed),
                Ok(n) => {
                    done += n;
                    progress = Instant::now();
                }
                Err(e) if is_wait(&e) => self.waited(progress, "took")?,
                Err(e) => return Err(MigrationError::io("write to the peer", e)),
            }
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Sends `file` as SCM_RIGHTS with one byte of data (Unix sockets only).
    pub fn send_fd(&mut self, file: &File) -> Result<(), MigrationError> {
        let Stream::Unix(s) = &self.stream else {
            return Err(MigrationError::Protocol(
                "a memfd can only be handed over a Unix socket".into(),
            ));
        };
        s.send_with_fd(&[0u8][..], file.as_raw_fd()).map_err(|e| {
            MigrationError::io(
                "send guest memory's fd",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        })?;
        Ok(())
    }

    /// Receives a file sent with `send_fd`.
    pub fn recv_fd(&mut self) -> Result<File, MigrationError> {
        let Stream::Unix(s) = &self.stream else {
            return Err(MigrationError::Protocol(
                "a local migration needs a Unix socket".into(),
            ));
        };
        let progress = Instant::now();
        loop {
            let mut byte = [0u8; 1];
            match s.recv_with_fd(&mut byte[..]) {
                Ok((1, Some(file))) => return Ok(file),
                Ok((0, _)) => return Err(MigrationError::Closed),
                Ok(_) => {
                    return Err(MigrationError::Protocol(
                        "the source announced guest memory's fd but sent none".into(),
                    ))
                }
                Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => {
                    self.waited(progress, "sent")?
                }
                Err(e) => {
                    return Err(MigrationError::io(
                        "receive guest memory's fd",
                        std::io::Error::from_raw_os_error(e.errno()),
                    ))
                }
            }
        }
    }

    /// Ends the connection both ways, so the peer sees it at once.
    /// The socket, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on a socket fd we own; it only changes the socket's state.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Waits up to `timeout_ms` until some of `fds` are readable (or hung up); returns
/// which are.
pub fn poll_readable<const N: usize>(
    fds: [RawFd; N],
    timeout_ms: libc::c_int,
) -> std::io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `pfds` is a valid array of N pollfds that lives across the call; poll
    // only writes their `revents`.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(pfds.map(|p| p.revents != 0))
}

/// Connects to `endpoint`, giving up after `STALL_TIMEOUT`.
pub fn connect(endpoint: &Endpoint) -> Result<Stream, MigrationError> {
    let what = format!("connect to {endpoint}");
    match endpoint {
        Endpoint::Tcp(addr) => {
            let addrs: Vec<_> = addr
                .to_socket_addrs()
                .map_err(|e| MigrationError::io(&what, e))?
                .collect();
            let mut last = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, STALL_TIMEOUT) {
                    Ok(s) => return Ok(Stream::Tcp(s)),
                    Err(e) => last = Some(e),
                }
            }
            Err(MigrationError::io(
                &what,
                last.unwrap_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address")),
            ))
        }
        Endpoint::Unix(path) => UnixStream::connect(path)
            .map(Stream::Unix)
            .map_err(|e| MigrationError::io(&what, e)),
    }
}

/// A bound listener of either family; a Unix socket file is removed when it drops.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket at this path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `endpoint`. A Unix socket file that nobody serves is replaced.
    pub fn bind(endpoint: &Endpoint) -> Result<Listener, MigrationError> {
        let what = format!("listen on {endpoint}");
        let listener = match endpoint {
            Endpoint::Tcp(addr) => {
                Listener::Tcp(TcpListener::bind(addr).map_err(|e| MigrationError::io(&what, e))?)
            }
            Endpoint::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok() && UnixStream::connect(path).is_err() {
                    use std::os::unix::fs::FileTypeExt;
                    let is_socket = std::fs::symlink_metadata(path)
                        .map(|m| m.file_type().is_socket())
                        .unwrap_or(false);
                    if is_socket {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path).map_err(|e| MigrationError::io(&what, e))?;
                Listener::Unix(l, path.clone())
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
        .map_err(|e| MigrationError::io(&what, e))?;
        Ok(listener)
    }

    /// Waits for one connection, until `cancel` is set or `deadline` passes.
    pub fn accept(
        &self,
        cancel: &AtomicBool,
        deadline: Option<Instant>,
    ) -> Result<Stream, MigrationError> {
        loop {
            let got = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Stream::Tcp(s)
                }),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Stream::Unix(s)
                }),
            };
            match got {
                Ok(s) => return Ok(s),
                Err(e) if is_wait(&e) => {
                    if cancel.load(Ordering::Acquire) {
                        return Err(MigrationError::Cancelled);
                    }
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        return Err(MigrationError::Stalled(
                            "the source never opened its second stream".into(),
                        ));
                    }
                    let mut pfd = libc::pollfd {
                        fd: self.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd and its count; poll only writes `revents`.
                    unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                }
                Err(e) => return Err(MigrationError::io("accept a migration", e)),
            }
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}
