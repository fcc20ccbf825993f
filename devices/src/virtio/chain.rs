//! Reading a descriptor chain the guest offered, checked before any byte is touched.
//!
//! virtio-queue walks the chain; it stops quietly at a loop, an out-of-range `next`, an
//! unreadable descriptor table or a chain over 4 GiB. Each of those leaves the last
//! descriptor it yielded still saying "next", which is how ferry tells a cut-off chain
//! from a complete one.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// One checked descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical start; `addr..addr+len` is guest RAM.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// The device may write it (else only read it).
    pub writable: bool,
}

/// A complete chain: its head index (for the used ring) and its descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Index of the first descriptor.
    pub head: u16,
    /// The descriptors, in order.
    pub descs: Vec<Desc>,
}

/// What was wrong with a chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The head could not be read at all.
    #[error("descriptor chain {head} is empty or its descriptor table is not in guest RAM")]
    Empty {
        /// Head index.
        head: u16,
    },
    /// The chain loops, points past the table, or runs over 4 GiB.
    #[error("descriptor chain {head} loops, points outside its table or exceeds 4 GiB")]
    Broken {
        /// Head index.
        head: u16,
    },
    /// A buffer is not (all) guest RAM.
    #[error("descriptor chain {head}: buffer {len:#x} bytes at {addr:#x} is not guest RAM")]
    OutsideRam {
        /// Head index.
        head: u16,
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain does not have the shape the device needs.
    #[error("descriptor chain {head}: {reason}")]
    Layout {
        /// Head index.
        head: u16,
        /// What the device expected.
        reason: &'static str,
    },
}

impl Chain {
    /// Walks `chain` and checks every buffer against `mem`.
    pub fn read<M>(chain: DescriptorChain<M>, mem: &M::Target) -> Result<Chain, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut descs = Vec::new();
        let mut open = false;
        for d in chain {
            open = d.has_next();
            let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if len > 0 && !mem.check_range(d.addr(), len, access) {
                return Err(ChainError::OutsideRam {
                    head,
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            descs.push(Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            });
        }
        if descs.is_empty() {
            return Err(ChainError::Empty { head });
        }
        if open {
            return Err(ChainError::Broken { head });
        }
        Ok(Chain { head, descs })
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum()
    }
}
