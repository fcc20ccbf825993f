//! Guest RAM for ferry: one memfd (shmem) holding all of guest memory, mapped shared and
//! described to the rest of the VMM as a `vm_memory::GuestMemoryMmap`.
//!
//! Guest RAM lives in a memfd rather than anonymous memory because the same pages must be
//! reachable from outside this mapping: userfaultfd write-protect on shmem, post-copy
//! fills through a second mapping, and zero-copy local migration that hands the fd to
//! another process.

pub mod dirty;
pub mod layout;
mod ram;
mod sys;

pub use ram::{GuestRam, RamError, RamRegion};

/// The page size of guest RAM and of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;
