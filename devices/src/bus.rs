//! The port-I/O bus: which device answers which port range.

use std::sync::{Arc, Mutex};

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
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap {
        /// Base port of the rejected range.
        base: u16,
        /// Its length.
        len: u16,
    },
    /// The range is empty or runs past port 0xffff.
    #[error("port range {base:#x}+{len} is empty or past the end of port space")]
    BadRange {
        /// Base port of the rejected range.
        base: u16,
        /// Its length.
        len: u16,
    },
}

struct Entry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port ranges mapped to devices. Ports nobody claims read as all ones and ignore writes,
/// as on a PC.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
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
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::BadRange { base, len });
        }
        let overlaps = self.entries.iter().any(|e| {
            u32::from(base) < u32::from(e.base) + u32::from(e.len) && u32::from(e.base) < end
        });
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Entry, u16)> {
        self.entries
            .iter()
            .find(|e| port >= e.base && u32::from(port) < u32::from(e.base) + u32::from(e.len))
            .map(|e| (e, port - e.base))
    }

    /// Dispatches an `in`. Returns false when no device claims the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((e, offset)) => {
                e.device.lock().expect("poisoned").read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches an `out`. Returns false when no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((e, offset)) => {
                e.device.lock().expect("poisoned").write(offset, data);
                true
            }
            None => false,
        }
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
