//! ferry's HTTP API, in Firecracker's dialect: the configuration and request types and
//! their validation (`models`, `action`), the routes (`routes`), the server on a Unix
//! socket (`server`), and the client that `ferryctl` uses (`client`).

pub mod action;
pub mod client;
mod http;
pub mod migration;
pub mod models;
pub mod routes;
pub mod server;

pub use action::{ApiError, Reply, VmmAction, VmmData, VmmRequest, VmmResult};
pub use models::{
    BootSource, ConfigError, Drive, MachineConfig, NetworkInterface, SerialConfig, VmConfig,
};
