//! Marks every write ferry makes through vm-memory in `GuestRam`'s own bitmap.
//!
//! Guest RAM is a `GuestMemoryMmap<WriteLog>`: vm-memory calls `mark_dirty` on each write
//! through it (loaders, virtio queues, device DMA). That is how device writes reach the
//! dirty trackers without each device remembering to say so. The KVM dirty log never
//! sees userspace writes, so without this they would be lost to migration.

use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};

use super::AtomicBitmap;
use crate::PAGE_SIZE;

/// One region's view of the shared write bitmap: offsets in the region become pages of
/// the memfd.
#[derive(Clone, Debug)]
pub struct WriteLog {
    bits: Arc<AtomicBitmap>,
    /// Where the region starts in the memfd, in bytes.
    file_offset: u64,
}

impl WriteLog {
    /// The log of the region that starts `file_offset` bytes into the memfd.
    pub fn new(bits: Arc<AtomicBitmap>, file_offset: u64) -> Self {
        WriteLog { bits, file_offset }
    }

    fn page(&self, offset: usize) -> usize {
        crate::page_index((self.file_offset + offset as u64) / PAGE_SIZE)
    }
}

impl<'a> WithBitmapSlice<'a> for WriteLog {
    type S = RefSlice<'a, WriteLog>;
}

impl Bitmap for WriteLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = self.page(offset);
        let last = self.page(offset.saturating_add(len - 1));
        self.bits.set_range(first, last - first + 1);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.get(self.page(offset))
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, WriteLog> {
        RefSlice::new(self, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_marks_pages_of_the_memfd() {
        let bits = Arc::new(AtomicBitmap::new(64));
        let log = WriteLog::new(bits.clone(), 8 * PAGE_SIZE);
        log.mark_dirty(4095, 2);
        assert!(bits.get(8) && bits.get(9) && !bits.get(10) && !bits.get(7));
        log.slice_at(3 * 4096).mark_dirty(0, 1);
        assert!(bits.get(11));
        log.mark_dirty(0, 0);
        assert!(!bits.get(7));
        assert!(log.dirty_at(4096) && !log.dirty_at(2 * 4096));
    }
}
