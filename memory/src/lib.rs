//! Guest RAM for ferry: one memfd (shmem) holding all of guest memory, mapped shared and
//! described to the rest of the VMM as a `vm_memory::GuestMemoryMmap`.
//!
//! Guest RAM lives in a memfd rather than anonymous memory because the same pages must be
//! reachable from outside this mapping: userfaultfd write-protect on shmem, post-copy
//! fills through a second mapping, and zero-copy local migration that hands the fd to
//! another process.

pub mod dirty;
pub mod fault;
mod image;
pub mod layout;
pub mod live;
mod page_set;
mod ram;
mod sys;

pub use page_set::PageSet;
pub use ram::{check_mappable, GuestMemoryMmap, GuestRam, RamError, RamRegion};
pub use sys::serve_first;

/// The page size of guest RAM and of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// `PAGE_SIZE` for lengths in memory.
pub const PAGE_BYTES: usize = 4096;

/// A page number as an index. Page numbers come from RAM sizes that already fit the
/// address space, so this saturates only on values no bitmap holds anyway.
pub(crate) fn page_index(page: u64) -> usize {
    usize::try_from(page).unwrap_or(usize::MAX)
}
