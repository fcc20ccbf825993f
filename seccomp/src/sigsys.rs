//! The `SIGSYS` handler: a filter traps a forbidden syscall, and this says which thread
//! made which syscall and ends the process, as Firecracker does (status 148).
//!
//! It runs on the thread that made the syscall, which may hold any lock, even the
//! allocator's: it formats on the stack, reads the thread's name from a const
//! thread-local, and writes with `write(2)` to the log's fd without a lock.

use std::fmt::Write as _;

/// Firecracker's exit status after a bad syscall.
pub const BAD_SYSCALL_STATUS: i32 = 148;

/// `si_code` of a signal sent by a seccomp filter (`SYS_SECCOMP`).
const SYS_SECCOMP: i32 = 1;

pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature, and
    // sa_mask is initialised by sigemptyset before use.
    let result = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

extern "C" fn handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo. For SIGSYS its union holds
    // `{ void *call_addr; int syscall; unsigned arch; }` after the three leading ints
    // and their padding: `syscall` is the seventh int.
    let (code, nr) = unsafe { ((*info).si_code, *info.cast::<i32>().add(6)) };
    // Every thread ferry confines calls `apply`, which records its name; `-` for any
    // other (asking the kernel could itself be forbidden).
    let raw = crate::NAME.with(std::cell::Cell::get);
    let thread = if raw[0] == 0 {
        "-"
    } else {
        crate::thread_name(&raw)
    };
    let mut line = logger::Line::start(thread, logger::Level::Error, None);
    if code == SYS_SECCOMP {
        let _ = write!(
            line,
            "Shutting down VM after intercepting a bad syscall ({nr}: {}) on thread {thread}: \
             its seccomp filter forbids it",
            crate::names::name(nr)
        );
    } else {
        let _ = write!(
            line,
            "Shutting down VM after SIGSYS with code {code} on thread {thread}"
        );
    }
    line.finish();
    // SAFETY: ends the process at once, running nothing of this process's.
    unsafe { libc::_exit(BAD_SYSCALL_STATUS) };
}
