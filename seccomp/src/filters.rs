//! ferry's own filters: what each thread may do. The README lists the same per thread.
//!
//! Every thread may manage its memory (never mapping it executable), wait on futexes,
//! sleep, write (its log lines), close fds, and end. Beyond that:
//! - `vcpu`: the KVM vCPU ioctls it makes (run, and the state a snapshot reads), by
//!   number; and the file and tap I/O of a device whose register write it handles (the
//!   driver setting `DRIVER_OK` runs requests it queued before).
//! - `api`: accepting and serving connections on the API socket; `FIONBIO` only.
//! - `console`: reading its pipe and writing the console out.
//! - `memory`: reading and writing files and sockets by offset or stream, polling, and
//!   the userfaultfd ioctls (copy, zero-page, wake, write-protect).
//! - `vmm`: what the VMM thread does once the microVM runs (devices, snapshots, the
//!   API's requests, migrations), plus what the threads it starts do before they
//!   confine themselves: files, sockets, threads, seccomp itself; KVM and userfaultfd
//!   ioctls by type, and the tap's, terminal's and `PAGEMAP_SCAN` by number; its own
//!   scheduling policy (`sched_setscheduler` on pid 0). Its
//!   children inherit this filter, so it is the widest, as Firecracker's is.

use std::collections::{BTreeMap, HashMap};

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use linux_raw_sys::ioctl;

use crate::Thread;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

const KVMIO: u32 = 0xAE;
/// userfaultfd's ioctl type (`UFFDIO`).
const UFFDIO: u32 = 0xAA;
/// `PAGEMAP_SCAN` on /proc/self/pagemap: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// The VMM thread's ioctls outside KVM and userfaultfd, by number: the types they share
/// ('T', 'f') also hold requests such as `TIOCSTI`, which types input into a terminal.
const VMM_IOCTLS: &[u64] = &[
    ioctl::FIONBIO as u64,
    ioctl::TCGETS as u64,
    ioctl::TCSETS as u64,
    // How much a socket has yet to send (the Uffd backend's handshake).
    ioctl::TIOCOUTQ as u64,
    ioctl::TUNSETIFF as u64,
    PAGEMAP_SCAN,
];

/// Every thread's basics.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    // abort() on a panic signals its own thread.
    libc::SYS_tgkill,
    libc::SYS_write,
];

/// Syscalls that map or protect memory: allowed unless they ask for PROT_EXEC.
const MAPPING: &[i64] = &[libc::SYS_mmap, libc::SYS_mprotect];

const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_fcntl,
    libc::SYS_newfstatat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_statx,
];

const CONSOLE: &[i64] = &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_read];

/// A device's I/O, when a register write the vCPU handles starts it.
const VCPU: &[i64] = &[
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
];

const MEMORY: &[i64] = &[
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

/// What only the VMM thread does; its filter also holds every other role's (`rules`).
const VMM: &[i64] = &[
    libc::SYS_access,
    libc::SYS_bind,
    libc::SYS_chmod,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_connect,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_fallocate,
    libc::SYS_fchmod,
    libc::SYS_fstat,
    libc::SYS_ftruncate,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_listen,
    libc::SYS_memfd_create,
    libc::SYS_openat,
    libc::SYS_pipe2,
    libc::SYS_prctl,
    libc::SYS_prlimit64,
    libc::SYS_recvmmsg,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    // A thread the VMM thread starts confines itself.
    libc::SYS_seccomp,
    // A migration's destination given by name: glibc's resolver.
    libc::SYS_sendmmsg,
    libc::SYS_set_robust_list,
    libc::SYS_setsockopt,
    libc::SYS_socket,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_userfaultfd,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    // Conditions built from constants here are always valid.
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .expect("a valid seccomp condition");
    SeccompRule::new(vec![c]).expect("a valid seccomp rule")
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &nr in calls {
        rules.insert(nr, Vec::new());
    }
}

/// `ioctl` only with these exact requests.
fn ioctl_requests(rules: &mut Rules, requests: &[u64]) {
    let list = rules.entry(libc::SYS_ioctl).or_default();
    list.extend(requests.iter().map(|&r| cond(1, SeccompCmpOp::Eq, r)));
}

/// `ioctl` only with requests of these types (bits 8 to 15 of the request).
fn ioctl_types(rules: &mut Rules, types: &[u32]) {
    let list = rules.entry(libc::SYS_ioctl).or_default();
    list.extend(
        types
            .iter()
            .map(|&t| cond(1, SeccompCmpOp::MaskedEq(0xff00), u64::from(t) << 8)),
    );
}

fn base() -> Rules {
    let mut rules = Rules::new();
    allow(&mut rules, BASE);
    for &nr in MAPPING {
        // The protection is the third argument of both.
        let no_exec = cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
        rules.insert(nr, vec![no_exec]);
    }
    rules
}

fn size<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).expect("small KVM struct")
}

fn kvm(dir: u32, nr: u32, size: u32) -> u64 {
    ioctl_expr(dir, KVMIO, nr, size)
}

/// The vCPU ioctls a vCPU thread makes: run, read its state for a snapshot or
/// migration, and tell the guest's clock it was paused.
fn vcpu_ioctls() -> Vec<u64> {
    let rw = _IOC_READ | _IOC_WRITE;
    vec![
        kvm(_IOC_NONE, 0x80, 0),                         // KVM_RUN
        kvm(_IOC_READ, 0x81, size::<kvm_regs>()),        // KVM_GET_REGS
        kvm(_IOC_READ, 0x83, size::<kvm_sregs>()),       // KVM_GET_SREGS
        kvm(rw, 0x88, size::<kvm_msrs>()),               // KVM_GET_MSRS
        kvm(_IOC_READ, 0x8c, size::<kvm_fpu>()),         // KVM_GET_FPU
        kvm(_IOC_READ, 0x8e, size::<kvm_lapic_state>()), // KVM_GET_LAPIC
        kvm(rw, 0x91, size::<kvm_cpuid2>()),             // KVM_GET_CPUID2
        kvm(_IOC_READ, 0x98, size::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        kvm(_IOC_READ, 0x9f, size::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
        kvm(_IOC_READ, 0xa1, size::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        kvm(_IOC_NONE, 0xa3, 0),                         // KVM_GET_TSC_KHZ
        kvm(_IOC_READ, 0xa4, size::<kvm_xsave>()),       // KVM_GET_XSAVE
        kvm(_IOC_READ, 0xa6, size::<kvm_xcrs>()),        // KVM_GET_XCRS
        kvm(_IOC_NONE, 0xad, 0),                         // KVM_KVMCLOCK_CTRL
        kvm(_IOC_READ, 0xcf, size::<kvm_xsave>()),       // KVM_GET_XSAVE2
    ]
}

/// The filter rules of one thread role.
pub(crate) fn rules(thread: Thread) -> Rules {
    let mut rules = base();
    match thread {
        Thread::Vcpu => {
            allow(&mut rules, VCPU);
            ioctl_requests(&mut rules, &vcpu_ioctls());
        }
        Thread::Api => {
            allow(&mut rules, API);
            ioctl_requests(&mut rules, &[libc::FIONBIO]);
        }
        Thread::Console => allow(&mut rules, CONSOLE),
        Thread::Memory => {
            allow(&mut rules, MEMORY);
            ioctl_types(&mut rules, &[UFFDIO]);
        }
        Thread::Vmm => {
            // The threads it starts inherit its filter: it holds what each of them does.
            for calls in [VMM, API, CONSOLE, VCPU, MEMORY] {
                allow(&mut rules, calls);
            }
            ioctl_types(&mut rules, &[KVMIO, UFFDIO]);
            ioctl_requests(&mut rules, VMM_IOCTLS);
            // A post-copy fault thread raising its own priority before it confines
            // itself (pid 0: the calling thread, never another).
            rules.insert(
                libc::SYS_sched_setscheduler,
                vec![cond(0, SeccompCmpOp::Eq, 0)],
            );
        }
    }
    rules
}

/// The filter that traps every syscall not in `rules`.
fn filter(rules: Rules) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// ferry's own filters, one per role.
pub fn builtin() -> Result<HashMap<Thread, BpfProgram>, seccompiler::Error> {
    Thread::ALL
        .into_iter()
        .map(|t| Ok((t, filter(rules(t))?)))
        .collect()
}
