//! The Uffd memory backend: guest RAM is registered with a userfaultfd for missing
//! faults, and an external page-fault handler gets that userfaultfd over a Unix socket,
//! with Firecracker's message, so that Firecracker's handlers serve ferry unchanged.
//!
//! The message is one `sendmsg` on a stream socket: a JSON array of regions as data,
//! the userfaultfd as SCM_RIGHTS. Each region is
//! `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}`; `offset`
//! is where the region starts in the memory file, and `page_size_kib` (deprecated in
//! Firecracker) carries the same byte count as `page_size`, as Firecracker sends it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use memory::GuestRam;
use serde::Serialize;
use userfaultfd::{Uffd, UffdBuilder};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::SnapshotError;

/// How long a handler may take to read the message before the load gives up.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(2);

/// One region of guest RAM as Firecracker describes it to its page-fault handler.
#[derive(Debug, Serialize)]
struct UffdRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
    page_size_kib: u64,
}

/// The userfaultfd and the connection to the handler that serves it: both live as long
/// as the VM, since every fault on a page not yet served waits for that handler.
pub struct UffdBackend {
    _uffd: Uffd,
    _stream: UnixStream,
}

fn handler_err(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Handler {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Registers all of `ram` for missing faults, connects to the handler at `socket` and
/// hands it the userfaultfd, then waits until it has taken the message (or hung up).
/// On any error the VM is never built and its RAM is unmapped with `ram`, so whatever
/// the handler still holds refers to nothing.
pub fn connect(ram: &GuestRam, socket: &Path) -> Result<UffdBackend, SnapshotError> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        // Firecracker's handlers read events until EAGAIN.
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| handler_err(socket, format!("cannot create a userfaultfd: {e}")))?;
    let mut regions = Vec::with_capacity(ram.regions().len());
    for r in ram.regions() {
        let len = usize::try_from(r.size).map_err(|_| handler_err(socket, "region too large"))?;
        uffd.register(r.host_addr as *mut libc::c_void, len)
            .map_err(|e| handler_err(socket, format!("cannot register guest RAM: {e}")))?;
        regions.push(UffdRegion {
            base_host_virt_addr: r.host_addr,
            size: r.size,
            offset: r.file_offset,
            page_size: memory::PAGE_SIZE,
            page_size_kib: memory::PAGE_SIZE,
        });
    }
    let message = serde_json::to_vec(&regions)
        .map_err(|e| handler_err(socket, format!("cannot encode the regions: {e}")))?;
    let stream = UnixStream::connect(socket).map_err(|e| {
        handler_err(
            socket,
            format!("cannot connect to the page-fault handler's socket: {e}"),
        )
    })?;
    stream
        .send_with_fd(&message[..], uffd.as_raw_fd())
        .map_err(|e| match e.errno() {
            // The handler hung up before the message went out: the same fault as one
            // that hangs up right after (`wait_taken`), and said the same way.
            libc::EPIPE | libc::ECONNRESET => handler_err(
                socket,
                "the page-fault handler closed the connection before serving guest memory",
            ),
            _ => handler_err(socket, format!("cannot send the userfaultfd: {e}")),
        })?;
    wait_taken(&stream, socket)?;
    Ok(UffdBackend {
        _uffd: uffd,
        _stream: stream,
    })
}

/// Waits until the handler has read the message: the socket's send queue is empty and
/// the peer is still there. A handler that closes the socket, or never reads, fails
/// the load: a guest whose memory nobody serves would hang on its first fault.
fn wait_taken(stream: &UnixStream, socket: &Path) -> Result<(), SnapshotError> {
    let hung_up = || {
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and its count; poll only writes `revents`.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        // POLLHUP: the handler closed its end (a shutdown of its writing side only,
        // which leaves it serving, is POLLRDHUP, and not a failure).
        ready > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
    };
    let closed = || {
        handler_err(
            socket,
            "the page-fault handler closed the connection before serving guest memory",
        )
    };
    let deadline = Instant::now() + HANDLER_TIMEOUT;
    loop {
        if hung_up() {
            return Err(closed());
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int, the bytes this socket sent that
        // the peer has not read yet, to the pointer given.
        let ret = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        // Where SIOCOUTQ is refused, the handler's hangup is all that can be seen.
        if ret != 0 || queued == 0 {
            // A handler that closes without reading also empties the queue: look again.
            return if hung_up() { Err(closed()) } else { Ok(()) };
        }
        if Instant::now() >= deadline {
            return Err(handler_err(
                socket,
                format!(
                    "the page-fault handler did not read the memory regions within {HANDLER_TIMEOUT:?}"
                ),
            ));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}
