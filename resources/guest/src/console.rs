//! Output on the 8250 UART at 0x3f8, straight from CPL3 (IOPL=3). ferry's UART is always
//! ready, so there is no status polling: each byte is one port write.

use core::fmt;

const COM1: u16 = 0x3f8;

/// Writes one byte to a port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; IOPL=3 allows it at CPL3.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// The serial console as a `fmt::Write`.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Prints one formatted line to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}
