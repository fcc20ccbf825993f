//! What the API thread asks of the VMM thread, and what it gets back. The API thread
//! parses and validates a request into a `VmmAction`, sends it over a channel and wakes
//! the VMM thread through an eventfd; the VMM thread answers on the request's own channel.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

use crate::models::{
    BootSource, Drive, MachineConfig, MachineConfigUpdate, NetworkInterface, SerialConfig,
};

/// A request for the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(DriveUpdate),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /serial`.
    PutSerial(SerialConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `GET /metrics`.
    GetMetrics,
    /// `PUT /actions` InstanceStart.
    StartInstance,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
}

/// A successful answer: 204 with no body, or 200 with a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    /// 204 No Content.
    Empty,
    /// 200 with this body.
    Json(serde_json::Value),
}

/// A refused request: the status (400 unless said otherwise) and the fault message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The `fault_message`.
    pub message: String,
}

impl ApiError {
    /// A 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
}

/// The VMM thread's answer.
pub type VmmResult = Result<VmmData, ApiError>;

/// One request in flight: the action and where to answer it.
pub struct VmmRequest {
    /// What to do.
    pub action: VmmAction,
    /// Where the VMM thread sends the result.
    pub reply: Sender<VmmResult>,
}

/// `PATCH /drives/{id}`: what may change on a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// Drive name.
    pub drive_id: String,
    /// New backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Rate limiter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PATCH /network-interfaces/{id}`: what may change on a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// Interface name.
    pub iface_id: String,
    /// Receive rate limiter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Transmit rate limiter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /metrics`: where `FlushMetrics` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (or named pipe) that receives one JSON line per flush.
    pub metrics_path: PathBuf,
}
