//! The few raw syscalls that neither libc's safe wrappers nor vm-memory cover. Each is a
//! safe function that checks what the kernel will read or write.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use linux_raw_sys::general::{
    page_region, pm_scan_arg, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
};

/// Creates a close-on-exec memfd that accepts seals.
pub fn memfd_create(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string and the flags are plain constants.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Adds `seals` (F_SEAL_*) to a memfd.
pub fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and only affects the fd we pass.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks until `fd` is readable or `stop` is: `Ok(true)` for `fd`, `Ok(false)` once
/// `stop` is (a fault-handling thread's loop: its userfaultfd, and the eventfd that
/// ends it).
pub fn wait_readable(fd: std::os::fd::RawFd, stop: std::os::fd::RawFd) -> io::Result<bool> {
    Ok(wait_any_readable(&[fd, stop])? & 0b10 == 0)
}

/// Blocks until one of `fds` (at most 64) is readable; returns which, as bits (bit i
/// for `fds[i]`).
pub fn wait_any_readable(fds: &[std::os::fd::RawFd]) -> io::Result<u64> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .take(64)
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polled` is a valid array of `polled.len()` pollfds that lives across
        // the call.
        let ret = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if ret >= 0 {
            return Ok(polled
                .iter()
                .enumerate()
                .filter(|(_, p)| p.revents != 0)
                .fold(0, |bits, (i, _)| bits | 1 << i));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The seals on a memfd (`F_GET_SEALS`).
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and only reads the state of the fd we pass.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// `PAGEMAP_SCAN` on /proc/self/pagemap (Linux 6.7): `_IOWR('f', 16, struct pm_scan_arg)`.
/// Neither libc, linux-raw-sys nor the userfaultfd crate has it, hence by hand.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;

/// One `PAGEMAP_SCAN` over host addresses `start..end` that finds the pages written
/// under uffd-wp async and write-protects them again. The kernel fills at most
/// `found.len()` entries of `found`. Returns how many it filled and where its walk
/// ended (`end`, or earlier when `found` ran full).
pub fn pagemap_scan_written(
    pagemap: &File,
    start: u64,
    end: u64,
    found: &mut [page_region],
) -> io::Result<(usize, u64)> {
    let mut arg = pm_scan_arg {
        size: std::mem::size_of::<pm_scan_arg>() as u64,
        // On this kernel only this exact mask takes the fast path (ENVIRONMENT.md).
        flags: u64::from(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC),
        start,
        end,
        walk_end: 0,
        vec: found.as_mut_ptr() as u64,
        vec_len: found.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: u64::from(PAGE_IS_WRITTEN),
        category_anyof_mask: 0,
        return_mask: u64::from(PAGE_IS_WRITTEN),
    };
    // SAFETY: `arg.vec` points to `found`, `vec_len` of its entries, which this function
    // borrows mutably for the call: the kernel writes only there and into `arg`. The
    // address range is only walked, never dereferenced by this process.
    let ret = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut _) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let filled = usize::try_from(ret).unwrap_or(0).min(found.len());
    Ok((filled, arg.walk_end))
}

// `KVM_CLEAR_DIRTY_LOG`: kvm-ioctls has no wrapper for it.
vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Re-protects the pages set in `bitmap` (which starts at page 0 of `slot`, and covers
/// `num_pages` pages). Refused if `bitmap` holds fewer than `num_pages` bits: the kernel
/// would read past it.
pub fn kvm_clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    let words = usize::try_from(num_pages)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?
        .div_ceil(64);
    if words > bitmap.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "KVM_CLEAR_DIRTY_LOG of {num_pages} pages with a bitmap of {} words",
                bitmap.len()
            ),
        ));
    }
    let arg = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page: 0,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_ptr() as *mut libc::c_void,
        },
    };
    // SAFETY: `arg` points at `bitmap`, checked above to hold at least `num_pages` bits,
    // which outlives the call; the kernel only reads it and `arg`.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reserves `len` bytes of address space with no access and no memory behind them,
/// and releases them: whether a mapping that large fits this process.
pub fn reserve_address_space(len: usize) -> io::Result<()> {
    // SAFETY: a new anonymous PROT_NONE mapping at an address the kernel picks; nothing
    // else refers to it, and it is unmapped right after.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr..addr+len` is the mapping made just above, used by nothing.
    unsafe { libc::munmap(addr, len) };
    Ok(())
}

/// Drops this process's mappings of the shared file pages at `addr..addr+len` (their
/// contents stay in the file): the next access faults, and KVM's own mappings of them
/// are invalidated with them.
pub fn unmap_shared(addr: u64, len: u64) -> io::Result<()> {
    let Ok(len) = usize::try_from(len) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: MADV_DONTNEED on a MAP_SHARED mapping only zaps page-table entries; the
    // pages and their contents stay in the memfd, so no memory Rust refers to changes.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the `len` bytes of this process's memory at `addr` to `file` at `offset`,
/// with `pwrite(2)` straight from there: no copy into a buffer first (saving guest RAM
/// from its mapping). Written by hand because vm-memory's `WriteVolatile` writes at the
/// file's position, which the live snapshot's writer and fault handler would share.
pub fn pwrite_from(
    file: &File,
    addr: *const libc::c_void,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: pwrite reads `addr+done..addr+len` (the kernel checks the range: an
        // address that is not mapped fails with EFAULT) and changes no memory of this
        // process except, if it is mapped here, `file` itself.
        let ret = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                addr.cast::<u8>().wrapping_add(done).cast(),
                len - done,
                at,
            )
        };
        match ret {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Makes this process's page-table entries for the shared file pages at
/// `addr..addr+len` present and writable, as a write to each would, without changing
/// their contents (`MADV_POPULATE_WRITE`): pages are marked dirty, and a hole gets a
/// page of zeros. No page in the range may be under userfaultfd write-protect: a
/// protected page would wait for its handler.
pub fn populate_writable(addr: *mut libc::c_void, len: usize) -> io::Result<()> {
    // SAFETY: MADV_POPULATE_WRITE only faults page-table entries in, as a write would,
    // and writes no byte: the pages and their contents are unchanged, so no memory Rust
    // refers to changes.
    let ret = unsafe { libc::madvise(addr, len, libc::MADV_POPULATE_WRITE) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread, one that serves page faults, ahead of every
/// normal-priority thread: the lowest real-time priority (`SCHED_FIFO` 1). A woken fault
/// thread otherwise waits for the bulk threads, which keep both cores busy, to use up
/// their time slice, while the faulting thread waits for it. A caller must sleep
/// between faults and do bounded work for each, so that it cannot hold a core. Fails
/// where real-time scheduling is refused (no `CAP_SYS_NICE` or `RLIMIT_RTPRIO`, a cgroup
/// without real-time time) or a user's seccomp filter file may not allow the call; the
/// thread then keeps its priority.
pub fn serve_first() -> io::Result<()> {
    if !seccomp::allows_own_policy() {
        return Err(io::Error::other(
            "a seccomp filter file from the user may not allow sched_setscheduler",
        ));
    }
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: changes only the calling thread's (pid 0) scheduling policy; `param` is a
    // valid sched_param that lives across the call.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Discards the pages of `file` in `offset..offset+len` (their contents become zero).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only acts on the file the fd refers to.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The data extents of `file` within `0..len`: `(offset, length)` of every range that
/// holds allocated pages, found with `SEEK_DATA`/`SEEK_HOLE` (what neither std nor
/// libc's safe wrappers offer). Holes read as zero and are never listed.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    data_extents_in(file, 0, len)
}

/// The data extents of `file` within `from..to` (see `data_extents`).
pub fn data_extents_in(file: &File, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    let len = to;
    // The walk moves the file position, which every handle on guest RAM's memfd
    // shares (a tracker's collect, a snapshot, a migration's first round): one walk at
    // a time in this process.
    static WALK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _walk = WALK.lock().unwrap_or_else(|e| e.into_inner());
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let from =
            libc::off_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only moves the file position of the fd we own a reference to.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        if at < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) after `from`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(u64::try_from(at).unwrap_or(u64::MAX)))
    };
    let mut extents = Vec::new();
    let mut at = from;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        extents.push((start, end - start));
        at = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_clear_dirty_log_refuses_a_short_bitmap() {
        let file = File::open("/dev/null").expect("open");
        let err = kvm_clear_dirty_log(&file, 0, 129, &[0, 0]).expect_err("short");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    /// The bytes land at the offset asked; an address that is not mapped and an offset
    /// past what a file can hold are errors, not writes.
    #[test]
    fn test_pwrite_from_writes_at_the_offset_and_refuses_bad_ranges() {
        let file = memfd_create(c"pwrite-from").expect("memfd");
        let data: Vec<u8> = (0..=255u8).cycle().take(3 * 4096 + 17).collect();
        pwrite_from(&file, data.as_ptr().cast(), data.len(), 4096).expect("write");
        let mut back = vec![0u8; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 4096).expect("read");
        assert_eq!(back, data);

        let err = pwrite_from(&file, std::ptr::null(), 4096, 0).expect_err("null");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
        let err = pwrite_from(&file, data.as_ptr().cast(), 1, u64::MAX).expect_err("offset");
        assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    }
}
