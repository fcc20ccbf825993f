//! What the API thread asks of the VMM thread, and what it gets back. The API thread
//! parses and validates a request into a `VmmAction`, sends it over a channel and wakes
//! the VMM thread through an eventfd; the VMM thread answers on the request's own channel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::migration::{Endpoint, MigrationReceiveParams, MigrationSendParams};
use crate::models::{
    BootSource, Drive, MachineConfig, MachineConfigUpdate, NetworkInterface, SerialConfig,
    SnapshotCreateParams, SnapshotLoadParams,
};

/// The lifecycle state, published by the VMM thread after every transition so that the
/// API thread answers `GET /` without a round trip to the VMM thread (a thread wake-up
/// costs tens of µs on these machines).
#[derive(Debug, Default)]
pub struct InstanceStatus(AtomicU8);

impl InstanceStatus {
    const NOT_STARTED: u8 = 0;
    const RUNNING: u8 = 1;
    const PAUSED: u8 = 2;

    /// Publishes a state: "Not started", "Running" or "Paused".
    pub fn set(&self, running: bool, paused: bool) {
        let v = match (running, paused) {
            (_, true) => Self::PAUSED,
            (true, false) => Self::RUNNING,
            (false, false) => Self::NOT_STARTED,
        };
        self.0.store(v, Ordering::Release);
    }

    /// The state as Firecracker names it.
    pub fn name(&self) -> &'static str {
        match self.0.load(Ordering::Acquire) {
            Self::RUNNING => "Running",
            Self::PAUSED => "Paused",
            _ => "Not started",
        }
    }

    /// The `GET /` body.
    pub fn instance_info(&self) -> serde_json::Value {
        serde_json::json!({
            "id": logger::instance_id(),
            "state": self.name(),
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "app_name": "ferry",
        })
    }
}

/// A request for the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
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
    /// `PUT /logger`.
    PutLogger(logger::Config),
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
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `PUT /migration/send`, with its parsed destination.
    MigrationSend(MigrationSendParams, Endpoint),
    /// `PUT /migration/receive`, with its parsed listen address.
    MigrationReceive(MigrationReceiveParams, Endpoint),
    /// `PUT /migration/cancel`.
    MigrationCancel,
    /// `GET /migration`.
    GetMigration,
    /// `GET /snapshot`.
    GetSnapshot,
    /// Every virtio device's state, as JSON (paused VMs only). No HTTP route: the
    /// migration engine and tests send it on the VMM channel.
    SaveDevices,
    /// Rebuilds every virtio device from saved state on the same guest memory (paused
    /// VMs only). No HTTP route, as `SaveDevices`.
    RestoreDevices(serde_json::Value),
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
    pub reply: Reply,
}

/// Where a request's result goes: a channel, and the eventfd that wakes the API
/// thread to look at it (without it, the API thread would find the answer only at its
/// next timed look).
#[derive(Clone)]
pub struct Reply {
    /// `None` only while it is dropped.
    tx: Option<Sender<VmmResult>>,
    answered: Option<Arc<EventFd>>,
}

impl Reply {
    /// Results go to `tx`; `answered`, if any, is written after each.
    pub fn new(tx: Sender<VmmResult>, answered: Option<Arc<EventFd>>) -> Reply {
        Reply {
            tx: Some(tx),
            answered,
        }
    }

    /// Sends `result`; false when nobody waits for it any more.
    pub fn send(&self, result: VmmResult) -> bool {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(result).is_ok());
        // After the send: the API thread reads the eventfd before it looks at answers,
        // so a wake-up never comes before the answer it announces.
        self.wake();
        sent
    }

    fn wake(&self) {
        if let Some(answered) = &self.answered {
            let _ = answered.write(1);
        }
    }
}

impl Drop for Reply {
    /// A request dropped unanswered (the VMM thread ending) is seen at once, as a
    /// disconnected channel, not at the API thread's next timed look.
    fn drop(&mut self) {
        // The channel first: woken before it closes, the API thread would find it
        // still open, and only its next timed look would see it closed.
        drop(self.tx.take());
        self.wake();
    }
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

/// `PUT /logger`, in Firecracker's fields. Each may be left out: the level then goes
/// back to Info, and the rest stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file or FIFO to log to (created if missing).
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off, in any case.
    #[serde(default)]
    pub level: Option<String>,
    /// Whether each line shows its level.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Whether each line shows the source file and line that logged it.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only log from modules whose path starts with this.
    #[serde(default)]
    pub module: Option<String>,
}

impl LoggerConfig {
    /// The logger's settings: what the request gives, with its level parsed.
    pub fn settings(&self) -> Result<logger::Config, logger::BadLevel> {
        Ok(logger::Config {
            log_path: self.log_path.clone(),
            level: self.level.as_deref().map(str::parse).transpose()?,
            show_level: self.show_level,
            show_log_origin: self.show_log_origin,
            module: self.module.clone(),
        })
    }
}

/// `PUT /metrics`: where `FlushMetrics` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (or named pipe) that receives one JSON line per flush.
    pub metrics_path: PathBuf,
}
