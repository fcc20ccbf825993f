//! PC legacy devices: the 8250 UART and the i8042 keyboard controller.

mod console;
mod i8042;
mod serial;

pub use console::{Console, SerialOutput, CONSOLE_BUFFER};
pub use i8042::{I8042State, I8042};
pub use serial::{Serial, SerialInput, SerialSnapshot};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd that KVM watches (irqfd).
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl IrqLine {
    /// Raises the interrupt.
    pub fn raise(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
