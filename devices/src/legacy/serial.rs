//! The 8250 UART, on vm-superio's state machine. Its output goes to any `Write`; its
//! interrupt is an irqfd.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::IrqLine;
use crate::bus::PioDevice;

/// Where the guest's console output goes; counts the bytes it passes on.
pub struct SerialOutput {
    sink: Box<dyn Write + Send>,
    bytes: Arc<AtomicU64>,
}

impl SerialOutput {
    /// Wraps `sink`; `bytes` counts what the guest writes.
    pub fn new(sink: Box<dyn Write + Send>, bytes: Arc<AtomicU64>) -> Self {
        SerialOutput { sink, bytes }
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sink.write(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
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

    /// The guest writes byte by byte; flushing at line ends keeps a buffered sink
    /// (a file, a pipe) readable line by line without a syscall per byte.
    fn flush_on_newline(&mut self, value: u8) {
        if value == b'\n' {
            // A console that cannot be flushed is not the guest's problem.
            let _ = self.inner.writer_mut().flush();
        }
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
        if off == 0 {
            self.flush_on_newline(*value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
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

    #[test]
    fn test_output_reaches_sink_and_is_counted() {
        let sink = Shared::default();
        let count = Arc::new(AtomicU64::new(0));
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut s = Serial::new(
            irq,
            SerialOutput::new(Box::new(sink.clone()), count.clone()),
        );
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        s.write(0, b"xy"); // a 2-byte access to the data port is ignored
        s.write(9, b"z"); // past the UART's 8 registers
        assert_eq!(&*sink.0.lock().expect("poisoned"), b"hi\n");
        assert_eq!(count.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn test_input_is_readable_and_raises_irq() {
        let irq_fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let irq = IrqLine(irq_fd.try_clone().expect("clone"));
        let mut s = Serial::new(irq, SerialOutput::new(Box::new(io::sink()), Arc::default()));
        s.write(1, &[0x01]); // IER: interrupt on received data
        assert_eq!(s.enqueue(b"ok"), 2);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
        assert!(irq_fd.read().expect("irq raised") >= 1);
    }
}
