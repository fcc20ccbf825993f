//! ferry's API surface: the Firecracker-compatible request and configuration types, and
//! their validation. The HTTP server and `ferryctl` build on these.

pub mod models;

pub use models::{
    BootSource, ConfigError, Drive, MachineConfig, NetworkInterface, SerialConfig, VmConfig,
};
