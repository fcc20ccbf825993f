//! Guest RAM as a memory file: the memfd's pages laid out one region after the other
//! (the memfd's own layout, and Firecracker's), holes where guest RAM holds nothing.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};

use crate::dirty::DirtyBitmap;
use crate::{sys, GuestRam, RamError, PAGE_SIZE};

fn access(what: &str) -> impl Fn(&dyn std::fmt::Display) -> RamError + '_ {
    move |e| RamError::Access(format!("{what}: {e}"))
}

impl GuestRam {
    /// The ranges of the memfd that hold pages, as `(offset, length)`: everything else
    /// was never touched (or was discarded) and reads as zero.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>, RamError> {
        sys::data_extents(self.file(), self.size())
            .map_err(|e| access("SEEK_DATA on guest RAM")(&e))
    }

    /// The guest ranges of memfd bytes `offset..offset+len`, split where regions meet.
    pub fn guest_ranges(&self, offset: u64, len: u64) -> Vec<(GuestAddress, u64)> {
        let end = offset.saturating_add(len);
        self.regions()
            .iter()
            .filter_map(|r| {
                let from = offset.max(r.file_offset);
                let to = end.min(r.file_offset + r.size);
                (from < to).then(|| {
                    (
                        GuestAddress(r.guest_addr.0 + (from - r.file_offset)),
                        to - from,
                    )
                })
            })
            .collect()
    }

    /// Writes memfd bytes `offset..offset+len` to `file` at the same offset.
    fn write_range(&self, file: &mut File, offset: u64, len: u64) -> Result<(), RamError> {
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| access("seek in the memory file")(&e))?;
        for (addr, n) in self.guest_ranges(offset, len) {
            let n = usize::try_from(n).map_err(|e| access("length")(&e))?;
            // 1 MiB at a time: with one write(2) per extent (128 MiB in the benchmark),
            // the Fulls that follow a live snapshot there took 155-330 ms, and 37-175 ms
            // with 1 MiB writes of the same bytes (README, live snapshots).
            let slice = self
                .memory()
                .get_slice(addr, n)
                .map_err(|e| access("guest RAM")(&e))?;
            let mut done = 0;
            while done < n {
                let k = (n - done).min(1 << 20);
                let part = slice
                    .subslice(done, k)
                    .map_err(|e| access("guest RAM")(&e))?;
                file.write_all_volatile(&part)
                    .map_err(|e| access("write the memory file")(&e))?;
                done += k;
            }
        }
        Ok(())
    }

    /// Writes all of guest RAM to `file` (which the caller sized to `size()`): only
    /// the pages that hold data, so the rest stays holes. Returns the bytes written.
    pub fn save_full(&self, file: &mut File) -> Result<u64, RamError> {
        let mut written = 0;
        for (offset, len) in self.data_extents()? {
            self.write_range(file, offset, len)?;
            written += len;
        }
        Ok(written)
    }

    /// Writes every page of guest RAM to `file`, holes too, reading through the
    /// mapping (for RAM whose holes are pages an external handler has yet to serve).
    /// Returns the bytes written.
    pub fn save_all(&self, file: &mut File) -> Result<u64, RamError> {
        self.write_range(file, 0, self.size())?;
        Ok(self.size())
    }

    /// Writes the pages of `pages` (memfd page numbers) to `file` at their offsets.
    /// Returns the bytes written.
    pub fn save_pages(&self, file: &mut File, pages: &DirtyBitmap) -> Result<u64, RamError> {
        let mut written = 0;
        for (first, count) in pages.runs() {
            let (offset, len) = (first as u64 * PAGE_SIZE, count as u64 * PAGE_SIZE);
            self.write_range(file, offset, len)?;
            written += len;
        }
        Ok(written)
    }

    /// Fills guest RAM from a memory file of exactly `size()` bytes: only the file's
    /// data extents are read, so its holes cost nothing and stay unallocated here.
    /// Returns the bytes read.
    pub fn load_from(&self, file: &mut File) -> Result<u64, RamError> {
        let extents = sys::data_extents(file, self.size())
            .map_err(|e| access("SEEK_DATA on the memory file")(&e))?;
        let mut read = 0;
        for (offset, len) in extents {
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| access("seek in the memory file")(&e))?;
            for (addr, n) in self.guest_ranges(offset, len) {
                let n = usize::try_from(n).map_err(|e| access("length")(&e))?;
                let mut slice = self
                    .memory()
                    .get_slice(addr, n)
                    .map_err(|e| access("guest RAM")(&e))?;
                file.read_exact_volatile(&mut slice)
                    .map_err(|e| access("read the memory file")(&e))?;
            }
            read += len;
        }
        Ok(read)
    }
}
