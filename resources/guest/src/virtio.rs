//! A polling virtio-mmio driver (virtio 1.x), small enough to read in one sitting. It
//! takes no interrupts (this guest has none): it adds buffers, notifies, and watches
//! the used ring. Everything runs at CPL3; the device's registers are plain memory
//! accesses that the VMM traps.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// Feature bit 32: virtio 1.x.
const F_VERSION_1: u64 = 1 << 32;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Device status bit the VMM sets when it stopped the device on a guest error.
pub const STATUS_NEEDS_RESET: u32 = 64;

fn r32(addr: u64) -> u32 {
    // SAFETY: `addr` is a device register or driver memory that our page tables map.
    unsafe { read_volatile(addr as *const u32) }
}

fn w32(addr: u64, v: u32) {
    // SAFETY: as in `r32`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn r16(addr: u64) -> u16 {
    // SAFETY: as in `r32`.
    unsafe { read_volatile(addr as *const u16) }
}

fn w16(addr: u64, v: u16) {
    // SAFETY: as in `r32`.
    unsafe { write_volatile(addr as *mut u16, v) }
}

fn w64(addr: u64, v: u64) {
    // SAFETY: as in `r32`.
    unsafe { write_volatile(addr as *mut u64, v) }
}

/// Reads a byte of driver memory.
pub fn r8(addr: u64) -> u8 {
    // SAFETY: as in `r32`.
    unsafe { read_volatile(addr as *const u8) }
}

/// Writes a byte of driver memory.
pub fn w8(addr: u64, v: u8) {
    // SAFETY: as in `r32`.
    unsafe { write_volatile(addr as *mut u8, v) }
}

/// Each `virtio_mmio.device=4K@ADDR:IRQ` on the command line, as its base address.
pub fn devices(cmdline: &[u8]) -> impl Iterator<Item = u64> + '_ {
    cmdline.split(|b| *b == b' ').filter_map(|word| {
        let spec = word.strip_prefix(b"virtio_mmio.device=")?;
        let at = spec.iter().position(|b| *b == b'@')?;
        let rest = &spec[at + 1..];
        let colon = rest.iter().position(|b| *b == b':').unwrap_or(rest.len());
        crate::boot::parse_size(&rest[..colon])
    })
}

/// One virtio-mmio device.
pub struct Device {
    /// Register base.
    pub base: u64,
}

impl Device {
    /// The device at `base`, if it is a virtio-mmio v2 device of type `id`.
    pub fn probe(base: u64, id: u32) -> Option<Device> {
        (r32(base) == MAGIC && r32(base + 4) == 2 && r32(base + 8) == id).then_some(Device { base })
    }

    /// Status register.
    pub fn status(&self) -> u32 {
        r32(self.base + 0x70)
    }

    /// Resets the device, negotiates `VERSION_1` plus what `wanted` and the device share,
    /// and returns the agreed features, or `None` if the device refused them.
    pub fn negotiate(&self, wanted: u64) -> Option<u64> {
        w32(self.base + 0x70, 0);
        w32(self.base + 0x70, STATUS_ACK);
        w32(self.base + 0x70, STATUS_ACK | STATUS_DRIVER);
        w32(self.base + 0x14, 0);
        let low = r32(self.base + 0x10) as u64;
        w32(self.base + 0x14, 1);
        let offered = low | ((r32(self.base + 0x10) as u64) << 32);
        let features = offered & (wanted | F_VERSION_1);
        if features & F_VERSION_1 == 0 {
            return None;
        }
        w32(self.base + 0x24, 0);
        w32(self.base + 0x20, features as u32);
        w32(self.base + 0x24, 1);
        w32(self.base + 0x20, (features >> 32) as u32);
        w32(
            self.base + 0x70,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        (self.status() & STATUS_FEATURES_OK != 0).then_some(features)
    }

    /// Sets queue `index` up in the three pages at `mem` with `size` entries. Returns
    /// `None` if the device does not have that many.
    pub fn queue(&self, index: u32, size: u16, mem: u64) -> Option<Queue> {
        w32(self.base + 0x30, index);
        let max = r32(self.base + 0x34);
        if max == 0 || (size as u32) > max {
            return None;
        }
        // Zero the rings: they may hold a previous run's indexes.
        for off in (0..3 * 4096).step_by(8) {
            w64(mem + off, 0);
        }
        let q = Queue {
            notify: self.base + 0x50,
            index,
            size,
            desc: mem,
            avail: mem + 4096,
            used: mem + 2 * 4096,
            next_avail: 0,
            last_used: 0,
        };
        w32(self.base + 0x38, size as u32);
        for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
            w32(self.base + reg, addr as u32);
            w32(self.base + reg + 4, (addr >> 32) as u32);
        }
        // The driver polls; it never wants an interrupt.
        w16(q.avail, AVAIL_F_NO_INTERRUPT);
        w32(self.base + 0x44, 1);
        Some(q)
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) -> bool {
        w32(
            self.base + 0x70,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        self.status() & STATUS_NEEDS_RESET == 0
    }

    /// Reads a 32-bit config-space field.
    pub fn config32(&self, offset: u64) -> u32 {
        r32(self.base + 0x100 + offset)
    }

    /// Reads a config-space byte.
    pub fn config8(&self, offset: u64) -> u8 {
        r8(self.base + 0x100 + offset)
    }
}

/// A split virtqueue the driver owns.
pub struct Queue {
    notify: u64,
    index: u32,
    /// Entries.
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
}

impl Queue {
    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, writable: bool, next: Option<u16>) {
        let d = self.desc + 16 * i as u64;
        let mut flags = if writable { DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next.unwrap_or(0));
    }

    /// Offers the chain starting at descriptor `head`; the device sees it after `kick`.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * (self.next_avail % self.size) as u64;
        w16(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        w16(self.avail + 2, self.next_avail);
    }

    /// Notifies the device, unless it said it is already looking.
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        if r16(self.used) & USED_F_NO_NOTIFY == 0 {
            w32(self.notify, self.index);
        }
    }

    /// Notifies the device unconditionally.
    pub fn kick_always(&self) {
        fence(Ordering::SeqCst);
        w32(self.notify, self.index);
    }

    /// The next completed chain: its head and the length the device wrote.
    pub fn pop(&mut self) -> Option<(u16, u32)> {
        if r16(self.used + 2) == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let elem = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        self.last_used = self.last_used.wrapping_add(1);
        Some((r32(elem) as u16, r32(elem + 4)))
    }
}
