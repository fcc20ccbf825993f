//! The few raw syscalls that neither libc's safe wrappers nor vm-memory cover.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

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

/// `PAGEMAP_SCAN` on /proc/self/pagemap (Linux 6.7): `_IOWR('f', 16, struct pm_scan_arg)`.
/// Neither libc, linux-raw-sys nor the userfaultfd crate has it, hence by hand.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;

/// One `PAGEMAP_SCAN` call. Returns how many entries of `arg.vec` the kernel filled.
pub fn pagemap_scan(
    pagemap: &File,
    arg: &mut linux_raw_sys::general::pm_scan_arg,
) -> io::Result<usize> {
    // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to `vec_len` page_region
    // entries that the caller owns for the duration of the call; the kernel writes only
    // there and into `arg.walk_end`.
    let ret = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg as *mut _) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
struct KvmClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    dirty_bitmap: u64,
}

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`. kvm-ioctls has no
/// wrapper for it.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;

/// Re-protects the pages set in `bitmap` (which starts at page 0 of `slot`).
pub fn kvm_clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    num_pages: u32,
    bitmap: &mut [u64],
) -> io::Result<()> {
    let mut arg = KvmClearDirtyLog {
        slot,
        num_pages,
        first_page: 0,
        dirty_bitmap: bitmap.as_mut_ptr() as u64,
    };
    // SAFETY: `arg` describes `bitmap`, which holds at least `num_pages` bits and outlives
    // the call; the kernel only reads it.
    let ret = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_CLEAR_DIRTY_LOG,
            &mut arg as *mut KvmClearDirtyLog,
        )
    };
    if ret < 0 {
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
