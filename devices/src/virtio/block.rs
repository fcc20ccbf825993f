//! virtio-blk backed by a raw file: read, write, flush and get-id, and read-only drives.
//!
//! Requests are done synchronously on the VMM thread, straight between the file and
//! guest memory (`pread`/`pwrite` into the guest's buffers, no bounce copy). A request
//! taken off the ring is complete before the device returns, so a paused device has
//! nothing half done, and its saved ring positions say exactly which requests remain.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, Bytes, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::chain::{Chain, ChainError, Desc};
use super::queue::for_each_chain;
use super::{DeviceError, DeviceState, Mem, Progress, VirtioDevice};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// The request header: type, reserved, sector.
const HEADER_LEN: u32 = 16;
const QUEUE_SIZES: &[u16] = &[256];

/// Why a drive could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file could not be opened.
    #[error("cannot open drive {id} backing file {}: {source}", path.display())]
    Open {
        /// Drive ID.
        id: String,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How to build a drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Drive ID (also what GET_ID returns, cut to 20 bytes).
    pub id: String,
    /// Backing file.
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// Flush requests reach the disk (`cache_type` "Writeback"); otherwise they return
    /// at once, as Firecracker's default "Unsafe".
    pub writeback: bool,
}

#[derive(Default)]
struct Counters {
    read_bytes: u64,
    write_bytes: u64,
    reads: u64,
    writes: u64,
    flushes: u64,
    io_errors: u64,
    unsupported: u64,
}

/// A virtio-blk device.
pub struct Block {
    state: BlockState,
    file: File,
    /// Size in sectors, fixed when the file is opened.
    capacity: u64,
    counters: Counters,
}

fn open(state: &BlockState) -> Result<(File, u64), BlockError> {
    let err = |source| BlockError::Open {
        id: state.id.clone(),
        path: state.path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!state.read_only)
        .open(&state.path)
        .map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    Ok((file, len / SECTOR_SIZE))
}

impl Block {
    /// Opens the backing file. The drive has `file size / 512` sectors; a partial last
    /// sector is not visible to the guest.
    pub fn new(state: BlockState) -> Result<Self, BlockError> {
        let (file, capacity) = open(&state)?;
        Ok(Block {
            state,
            file,
            capacity,
            counters: Counters::default(),
        })
    }

    /// The drive's ID.
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Swaps the backing file for another (`PATCH /drives`). The guest sees the new size
    /// after a config-change interrupt, which the caller raises.
    pub fn replace_file(&mut self, path: &Path) -> Result<(), BlockError> {
        let state = BlockState {
            path: path.to_path_buf(),
            ..self.state.clone()
        };
        let (file, capacity) = open(&state)?;
        self.file = file;
        self.capacity = capacity;
        self.state = state;
        Ok(())
    }

    /// Does one request; returns the bytes written into the guest's buffers.
    fn execute(&mut self, chain: &Chain, mem: &Mem) -> Result<u32, ChainError> {
        let head = chain.head;
        let layout = |reason| ChainError::Layout { head, reason };
        let (header, rest) = chain
            .descs
            .split_first()
            .ok_or(layout("no request header"))?;
        let (status, data) = rest.split_last().ok_or(layout("no status byte"))?;
        if header.writable || header.len < HEADER_LEN {
            return Err(layout(
                "the header must be a 16-byte device-readable buffer",
            ));
        }
        if !status.writable || status.len < 1 {
            return Err(layout("the status must be a device-writable byte"));
        }
        // Both reads lie in RAM: `Chain::read` checked the header buffer.
        let kind: u32 = mem
            .read_obj(header.addr)
            .map_err(|_| layout("unreadable header"))?;
        let sector: u64 = mem
            .read_obj(header.addr.unchecked_add(8))
            .map_err(|_| layout("unreadable header"))?;
        let want_writable = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        if matches!(
            kind,
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID
        ) && data.iter().any(|d| d.writable != want_writable)
        {
            return Err(layout("a data buffer has the wrong direction"));
        }
        let (code, written) = match kind {
            VIRTIO_BLK_T_IN => self.transfer(sector, data, mem, true),
            VIRTIO_BLK_T_OUT => self.transfer(sector, data, mem, false),
            VIRTIO_BLK_T_FLUSH => {
                self.counters.flushes += 1;
                let ok = !self.state.writeback || self.file.sync_data().is_ok();
                (
                    if ok {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    },
                    0,
                )
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(data, mem),
            _ => {
                self.counters.unsupported += 1;
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        };
        if code == VIRTIO_BLK_S_IOERR {
            self.counters.io_errors += 1;
        }
        // `code` is 0..=2.
        mem.write_obj(u8::try_from(code).unwrap_or(u8::MAX), status.addr)
            .map_err(|_| layout("unwritable status byte"))?;
        Ok(written.saturating_add(1))
    }

    /// Reads (`to_guest`) or writes the data buffers at `sector`. Returns the status and
    /// the bytes written into guest memory.
    fn transfer(&mut self, sector: u64, data: &[Desc], mem: &Mem, to_guest: bool) -> (u32, u32) {
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let in_range = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(total).map(|end| (start, end)))
            .filter(|&(_, end)| {
                end <= self.capacity * SECTOR_SIZE && total.is_multiple_of(SECTOR_SIZE)
            });
        let Some((mut offset, _)) = in_range else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        if !to_guest && self.state.read_only {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        for d in data {
            let len = d.len as usize;
            let mut at = FileAt {
                file: &self.file,
                offset,
            };
            let done = if to_guest {
                mem.read_exact_volatile_from(d.addr, &mut at, len)
            } else {
                mem.write_all_volatile_to(d.addr, &mut at, len)
            };
            if let Err(e) = done {
                tracing::warn!("drive {}: I/O at byte {offset}: {e}", self.state.id);
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            offset += u64::from(d.len);
        }
        if to_guest {
            self.counters.reads += 1;
            self.counters.read_bytes += total;
            // At most a chain's 4 GiB limit, which `Chain::read` enforces.
            (VIRTIO_BLK_S_OK, u32::try_from(total).unwrap_or(u32::MAX))
        } else {
            self.counters.writes += 1;
            self.counters.write_bytes += total;
            (VIRTIO_BLK_S_OK, 0)
        }
    }

    fn get_id(&mut self, data: &[Desc], mem: &Mem) -> (u32, u32) {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = self.state.id.as_bytes();
        let n = bytes.len().min(id.len());
        id[..n].copy_from_slice(&bytes[..n]);
        let mut written = 0usize;
        for d in data {
            if written == id.len() {
                break;
            }
            let n = (d.len as usize).min(id.len() - written);
            if mem.write_slice(&id[written..written + n], d.addr).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            written += n;
        }
        // At most 20.
        (VIRTIO_BLK_S_OK, u32::try_from(written).unwrap_or(0))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let ro = if self.state.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        // As Firecracker: FLUSH only where a flush reaches the disk. With "Unsafe" a
        // driver that sees no FLUSH knows its writes are not made durable.
        let flush = if self.state.writeback {
            1 << VIRTIO_BLK_F_FLUSH
        } else {
            0
        };
        flush | (1 << VIRTIO_RING_F_EVENT_IDX) | ro
    }

    fn config_space(&self) -> Vec<u8> {
        // Only `capacity`: every other field depends on a feature ferry does not offer.
        self.capacity.to_le_bytes().to_vec()
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &Mem,
        budget: usize,
    ) -> Result<Progress, DeviceError> {
        for_each_chain(index, queues, mem, budget, |chain| self.execute(chain, mem))
    }

    fn state(&self) -> DeviceState {
        DeviceState::Block(self.state.clone())
    }

    fn metrics(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "read_bytes": c.read_bytes,
            "write_bytes": c.write_bytes,
            "read_count": c.reads,
            "write_count": c.writes,
            "flush_count": c.flushes,
            "io_errors": c.io_errors,
            "unsupported": c.unsupported,
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The backing file at a byte offset, for vm-memory's volatile copies: `pread` and
/// `pwrite` straight into and out of guest memory. vm-memory's own `File` support uses
/// `read`/`write` at the file position, which would need a seek per buffer.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

fn io_result(n: isize) -> Result<usize, VolatileMemoryError> {
    usize::try_from(n).map_err(|_| VolatileMemoryError::IOError(std::io::Error::last_os_error()))
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let offset = libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: the guard keeps `buf.len()` bytes of guest memory at its pointer mapped
        // and writable for the call; pread writes at most that many.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let n = io_result(n)?;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let offset = libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: the guard keeps `buf.len()` bytes of guest memory at its pointer mapped
        // for the call; pwrite only reads them.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let n = io_result(n)?;
        self.offset += n as u64;
        Ok(n)
    }
}
