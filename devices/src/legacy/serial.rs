//! The 8250 UART, on vm-superio's state machine. Its output goes to any `Write`; its
//! interrupt is an irqfd.

use serde::{Deserialize, Serialize};

use super::console::SerialOutput;
use super::IrqLine;
use crate::bus::PioDevice;

/// The UART's registers and receive FIFO, for snapshots (vm-superio's `SerialState`,
/// with serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// An 8250 UART at a port base (0x3f8 for COM1).
pub struct Serial {
    inner: vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, SerialOutput>,
}

/// Input towards the guest, for the VMM's stdin handler.
pub trait SerialInput {
    /// Queues bytes for the guest to read; returns how many fit in the FIFO.
    fn enqueue(&mut self, bytes: &[u8]) -> usize;
}

impl Serial {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: IrqLine, out: SerialOutput) -> Self {
        Serial {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// The registers and receive FIFO.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state. A receive FIFO longer than the UART's is refused.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: IrqLine,
        out: SerialOutput,
    ) -> Result<Self, String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let inner = vm_superio::Serial::from_state(&s, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Serial { inner })
    }
}

impl SerialInput for Serial {
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        let n = room.min(bytes.len());
        if n > 0 {
            if let Err(e) = self.inner.enqueue_raw_bytes(&bytes[..n]) {
                tracing::warn!("serial input dropped: {e:?}");
                return 0;
            }
        }
        n
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.inner.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if off >= 8 {
            return;
        }
        if let Err(e) = self.inner.write(off, *value) {
            tracing::warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::console::Console;
    use super::*;
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn irq() -> (IrqLine, EventFd) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        (IrqLine(fd.try_clone().expect("clone")), fd)
    }

    #[test]
    fn test_output_reaches_sink_and_is_counted() {
        let sink = Shared::default();
        let mut console = Console::spawn(Box::new(sink.clone()), 4096).expect("console");
        let mut s = Serial::new(irq().0, console.output());
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        s.write(0, b"xy"); // a 2-byte access to the data port is ignored
        s.write(9, b"z"); // past the UART's 8 registers
        console.finish();
        assert_eq!(&*sink.0.lock().expect("poisoned"), b"hi\n");
        assert_eq!(console.written(), 3);
    }

    #[test]
    fn test_input_is_readable_and_raises_irq() {
        let (line, irq_fd) = irq();
        let console = Console::spawn(Box::new(io::sink()), 4096).expect("console");
        let mut s = Serial::new(line, console.output());
        s.write(1, &[0x01]); // IER: interrupt on received data
        assert_eq!(s.enqueue(b"ok"), 2);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
        assert!(irq_fd.read().expect("irq raised") >= 1);
    }

    #[test]
    fn test_state_round_trips_registers_and_pending_input() {
        let console = Console::spawn(Box::new(io::sink()), 4096).expect("console");
        let mut s = Serial::new(irq().0, console.output());
        s.write(3, &[0x83]); // DLAB on
        s.write(0, &[0x0c]); // divisor 12: 9600 baud
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x01]);
        s.enqueue(b"ab");
        let state = s.state();
        let json = serde_json::to_string(&state).expect("serialize");
        let back: SerialSnapshot = serde_json::from_str(&json).expect("deserialize");
        let (line, irq_fd) = irq();
        let mut r = Serial::from_state(&back, line, console.output()).expect("restore");
        assert_eq!(r.state(), state);
        assert!(
            irq_fd.read().is_ok(),
            "pending input raises the interrupt again"
        );
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let mut too_long = state;
        too_long.in_buffer = vec![0; 65];
        assert!(Serial::from_state(&too_long, irq().0, console.output()).is_err());
    }
}
