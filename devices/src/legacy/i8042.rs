//! A minimal i8042 keyboard controller: enough for a guest to reboot the machine (command
//! 0xfe pulses the reset line) and for the VMM to send Ctrl-Alt-Del as key presses.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::bus::PioDevice;

/// Ports 0x60 (data) and 0x64 (status/command), so the device spans 5 ports from 0x60.
const DATA: u16 = 0;
const COMMAND: u16 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_RESET_CPU: u8 = 0xfe;

const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_CMD: u8 = 0x08;

const CTR_KBD_INT: u8 = 0x01;

/// Set 2 scan codes for pressing Ctrl, Alt and Delete.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
const BUFFER_LIMIT: usize = 16;

/// The controller's registers and output buffer, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// The next data byte is a new configuration byte.
    pub expect_control: bool,
    /// Bytes waiting for the guest to read.
    pub out: Vec<u8>,
}

/// The controller.
pub struct I8042 {
    reset: EventFd,
    kbd_irq: IrqLine,
    status: u8,
    control: u8,
    expect_control: bool,
    out: VecDeque<u8>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest asks for a CPU reset and raises
    /// `kbd_irq` (IRQ 1) when a key byte is waiting.
    pub fn new(reset: EventFd, kbd_irq: IrqLine) -> Self {
        I8042 {
            reset,
            kbd_irq,
            status: STATUS_SYSTEM,
            control: CTR_KBD_INT,
            expect_control: false,
            out: VecDeque::new(),
        }
    }

    /// The registers and output buffer.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            expect_control: self.expect_control,
            out: self.out.iter().copied().collect(),
        }
    }

    /// Sets the registers and output buffer from saved state; a buffer longer than the
    /// controller's is refused.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), String> {
        if state.out.len() > BUFFER_LIMIT {
            return Err(format!(
                "i8042 state: {} buffered bytes, the controller holds {BUFFER_LIMIT}",
                state.out.len()
            ));
        }
        self.status = state.status;
        self.control = state.control;
        self.expect_control = state.expect_control;
        self.out = state.out.iter().copied().collect();
        Ok(())
    }

    /// Presses Ctrl-Alt-Del. A Linux guest answers by rebooting.
    pub fn send_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        for &b in &CTRL_ALT_DEL {
            self.push(b);
        }
        if self.control & CTR_KBD_INT != 0 {
            self.kbd_irq.raise()?;
        }
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < BUFFER_LIMIT {
            self.out.push_back(byte);
        }
        self.status |= STATUS_OUT_FULL;
    }

    fn pop(&mut self) -> u8 {
        let b = self.out.pop_front().unwrap_or(0);
        if self.out.is_empty() {
            self.status &= !STATUS_OUT_FULL;
        }
        b
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            DATA => self.pop(),
            COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            COMMAND => {
                self.status |= STATUS_LAST_WAS_CMD;
                match value {
                    CMD_RESET_CPU => {
                        if let Err(e) = self.reset.write(1) {
                            tracing::error!("i8042: cannot signal reset: {e}");
                        }
                    }
                    CMD_READ_CTR => {
                        let c = self.control;
                        self.push(c);
                    }
                    CMD_WRITE_CTR => self.expect_control = true,
                    _ => {}
                }
            }
            DATA => {
                self.status &= !STATUS_LAST_WAS_CMD;
                if self.expect_control {
                    self.control = value;
                    self.expect_control = false;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dev = I8042::new(
            reset.try_clone().expect("clone"),
            IrqLine(irq.try_clone().expect("clone")),
        );
        (dev, reset, irq)
    }

    #[test]
    fn test_reset_command_signals_reset() {
        let (mut dev, reset, _) = device();
        assert!(reset.read().is_err(), "no reset before the command");
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().expect("reset signalled"), 1);
    }

    #[test]
    fn test_ctrl_alt_del_queues_keys_and_raises_irq() {
        let (mut dev, _, irq) = device();
        dev.send_ctrl_alt_del().expect("send");
        assert_eq!(irq.read().expect("irq"), 1);
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(COMMAND, &mut b);
            if b[0] & STATUS_OUT_FULL == 0 {
                break;
            }
            dev.read(DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn test_state_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x45]);
        dev.send_ctrl_alt_del().expect("send");
        let state = dev.state();
        let (mut other, _, _) = device();
        other.restore(&state).expect("restore");
        assert_eq!(other.state(), state);
        let mut b = [0u8];
        other.read(DATA, &mut b);
        assert_eq!(b[0], CTRL_ALT_DEL[0]);
        let too_long = I8042State {
            out: vec![0; BUFFER_LIMIT + 1],
            ..state
        };
        assert!(other.restore(&too_long).is_err());
    }

    #[test]
    fn test_control_byte_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        let mut b = [0u8];
        dev.read(DATA, &mut b);
        assert_eq!(b[0], 0x47);
    }
}
