//! `ferry-uffd-handler SOCKET MEMORY_FILE`: a page-fault handler for the Uffd memory
//! backend, written the way Firecracker's example handler is. It listens on SOCKET,
//! takes one connection, reads the region list and the userfaultfd, maps MEMORY_FILE,
//! and answers each missing fault with `UFFDIO_COPY` of that page. It ends when ferry
//! closes the connection, and prints how many faults it served.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAGE: u64 = 4096;

/// One region as ferry (and Firecracker) describes it.
#[derive(serde::Deserialize)]
struct Region {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

fn serve(socket: &str, memory: &str) -> Result<u64, String> {
    let backing = File::open(memory).map_err(|e| format!("{memory}: {e}"))?;
    let len = usize::try_from(backing.metadata().map_err(|e| e.to_string())?.len())
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| format!("{socket}: {e}"))?;
    let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 << 10];
    let (n, fd) = stream.recv_with_fd(&mut buf).map_err(|e| e.to_string())?;
    let regions: Vec<Region> = serde_json::from_slice(&buf[..n])
        .map_err(|e| format!("the region list does not parse: {e}"))?;
    let fd = fd.ok_or("no userfaultfd came with the region list")?;
    if regions.iter().any(|r| r.page_size != PAGE) {
        return Err("only 4 KiB pages are served".into());
    }
    if regions.iter().map(|r| r.size).sum::<u64>() != len as u64 {
        return Err(format!(
            "the regions do not cover the {len}-byte memory file"
        ));
    }
    // SAFETY: the fd was just received and nothing else in this process owns it.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    // SAFETY: a new private read-only mapping of a file this function keeps open; no
    // Rust reference is made to it, only addresses for UFFDIO_COPY.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            backing.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!(
            "mmap {memory}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut served = 0;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds and their count; poll only writes `revents`.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if fds[1].revents != 0 {
            return Ok(served);
        }
        while let Some(event) = uffd.read_event().map_err(|e| e.to_string())? {
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let page = addr as u64 & !(PAGE - 1);
            let region = regions
                .iter()
                .find(|r| page >= r.base_host_virt_addr && page < r.base_host_virt_addr + r.size)
                .ok_or_else(|| format!("a fault at {page:#x} is in no region"))?;
            let src = base as u64 + region.offset + (page - region.base_host_virt_addr);
            // SAFETY: `src` is a page of the file's mapping (the regions cover the file,
            // checked above); `page` is a page the kernel reports missing in ferry's
            // registered range. The kernel copies between the two.
            match unsafe { uffd.copy(src as *const _, page as *mut _, 4096, true) } {
                Ok(_) => served += 1,
                // Another fault on the same page was served first.
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
                Err(e) => return Err(format!("UFFDIO_COPY at {page:#x}: {e}")),
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, memory] = args.as_slice() else {
        eprintln!("usage: ferry-uffd-handler SOCKET MEMORY_FILE");
        return ExitCode::from(2);
    };
    match serve(socket, memory) {
        Ok(served) => {
            println!("ferry-uffd-handler: served {served} faults");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-uffd-handler: {e}");
            ExitCode::FAILURE
        }
    }
}
