//! The port-I/O and MMIO buses: which device answers which address range.

use std::sync::{Arc, Mutex};

use crate::virtio::MmioTransport;

/// A device reachable through port I/O. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    /// Handles an `in`; `data` is the access width (1, 2 or 4 bytes).
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles an `out`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Why a device could not be placed on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already taken.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range is empty or runs past the end of the address space.
    #[error("range {base:#x}+{len:#x} is empty or past the end of the address space")]
    BadRange {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

/// Address ranges mapped to devices, below `limit`.
struct Ranges<D: ?Sized> {
    entries: Vec<Entry<D>>,
    limit: u64,
}

impl<D: ?Sized> Ranges<D> {
    fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|&end| len > 0 && end <= self.limit);
        let Some(end) = end else {
            return Err(BusError::BadRange { base, len });
        };
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    /// The device at `addr` and the offset into its range.
    fn find(&self, addr: u64) -> Option<(&Arc<Mutex<D>>, u64)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
            .map(|e| (&e.device, addr - e.base))
    }

    /// Hands a read to the device at `addr`; an unclaimed address reads as all ones.
    /// Returns false when no device claims it.
    fn read(&self, addr: u64, data: &mut [u8], read: impl FnOnce(&mut D, u64, &mut [u8])) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                read(&mut device.lock().expect("poisoned"), offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Hands a write to the device at `addr`. Returns false when no device claims it.
    fn write(&self, addr: u64, data: &[u8], write: impl FnOnce(&mut D, u64, &[u8])) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                write(&mut device.lock().expect("poisoned"), offset, data);
                true
            }
            None => false,
        }
    }
}

/// Port ranges mapped to devices. Ports nobody claims read as all ones and ignore writes,
/// as on a PC.
pub struct PioBus {
    ranges: Ranges<dyn PioDevice>,
}

impl Default for PioBus {
    fn default() -> Self {
        PioBus {
            ranges: Ranges {
                entries: Vec::new(),
                limit: 0x1_0000,
            },
        }
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        self.ranges.insert(u64::from(base), u64::from(len), device)
    }

    /// Dispatches an `in`. Returns false when no device claims the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        // Offsets within port space (below 0x10000) always fit u16.
        self.ranges.read(u64::from(port), data, |d, offset, data| {
            d.read(u16::try_from(offset).unwrap_or(u16::MAX), data)
        })
    }

    /// Dispatches an `out`. Returns false when no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        self.ranges.write(u64::from(port), data, |d, offset, data| {
            d.write(u16::try_from(offset).unwrap_or(u16::MAX), data)
        })
    }
}

/// Guest-physical MMIO ranges mapped to virtio-mmio devices. Unclaimed addresses read as
/// all ones and ignore writes.
pub struct MmioBus {
    ranges: Ranges<MmioTransport>,
}

impl Default for MmioBus {
    fn default() -> Self {
        MmioBus {
            ranges: Ranges {
                entries: Vec::new(),
                limit: u64::MAX,
            },
        }
    }
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<MmioTransport>>,
    ) -> Result<(), BusError> {
        self.ranges.insert(base, len, device)
    }

    /// Dispatches a read. Returns false when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.ranges.read(addr, data, MmioTransport::read)
    }

    /// Dispatches a write. Returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.ranges.write(addr, data, MmioTransport::write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u16, u8)>);

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn test_dispatches_by_offset_and_ignores_unclaimed_ports() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        assert!(bus.write(0x3fb, &[7]));
        assert!(!bus.write(0x400, &[1]));
        let mut b = [0u8];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b, [1]);
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().expect("poisoned").0, vec![(3, 7)]);
    }

    #[test]
    fn test_rejects_overlapping_and_empty_ranges() {
        let mut bus = PioBus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .expect("insert");
        let dev = Arc::new(Mutex::new(Recorder::default()));
        assert_eq!(
            bus.insert(0x64, 2, dev.clone()),
            Err(BusError::Overlap { base: 0x64, len: 2 })
        );
        assert_eq!(
            bus.insert(0x10, 0, dev.clone()),
            Err(BusError::BadRange { base: 0x10, len: 0 })
        );
        assert_eq!(
            bus.insert(0xfffe, 4, dev),
            Err(BusError::BadRange {
                base: 0xfffe,
                len: 4
            })
        );
    }
}
