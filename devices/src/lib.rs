//! ferry's emulated devices. Each device is a state machine driven by plain calls
//! (`read`, `write`) and handed its interrupt line and output sink, so it holds no fd
//! loops of its own and tests drive it with plain values.

pub mod bus;
pub mod legacy;

pub use bus::{BusError, MmioBus, PioBus, PioDevice};
pub mod virtio;
