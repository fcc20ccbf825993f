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

/// Reads one byte from a port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effects; IOPL=3 allows it at CPL3.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const I8042_OUTPUT_FULL: u8 = 0x01;
/// Set 2 make codes of Ctrl, Alt and (extended) Delete.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Polls the i8042 for Ctrl-Alt-Del. The guest takes no interrupts (see entry.rs), so
/// it drains the controller's buffer instead, as a polling driver would.
pub fn ctrl_alt_del_pressed() -> bool {
    let mut matched = 0;
    let mut seen = false;
    for _ in 0..16 {
        if inb(I8042_STATUS) & I8042_OUTPUT_FULL == 0 {
            break;
        }
        let b = inb(I8042_DATA);
        matched = if b == CTRL_ALT_DEL[matched] {
            matched + 1
        } else {
            usize::from(b == CTRL_ALT_DEL[0])
        };
        if matched == CTRL_ALT_DEL.len() {
            seen = true;
            matched = 0;
        }
    }
    seen
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
