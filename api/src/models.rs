//! Firecracker's configuration objects, with the same field names, as read from a
//! `--config-file` and (later) from API bodies. Unknown fields are refused, never ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most vCPUs ferry runs.
pub const MAX_VCPUS: u64 = 32;

/// Why a configuration is refused. Each message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON does not parse or does not match the schema.
    #[error("invalid configuration: {0}")]
    Json(#[from] serde_json::Error),
    /// A value is out of range or inconsistent.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as `section.name`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A path names no file.
    #[error("{field}: {} does not exist", path.display())]
    MissingFile {
        /// The field.
        field: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A Firecracker feature ferry does not have yet.
    #[error("{0} is not supported by ferry yet")]
    Unsupported(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// `boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// vmlinux ELF or bzImage.
    pub kernel_image_path: PathBuf,
    /// Optional initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; Firecracker's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// How many drives and network interfaces fit (one IRQ each, 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// The command line used when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

impl BootSource {
    /// The command line the guest gets.
    pub fn boot_args(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }
}

/// `machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 32. Read wide so that 1000 gets a range error, not a type error.
    pub vcpu_count: u64,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Two threads per core.
    #[serde(default)]
    pub smt: bool,
    /// Dirty-page tracking for Diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// ferry's extension: the mechanism `track_dirty_pages` uses, "uffd-async" (the
    /// default), "uffd-sync" or "kvm-dirty-log".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_tracking: Option<String>,
    /// Firecracker CPU templates (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Firecracker huge pages ("None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            dirty_tracking: None,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

impl MachineConfig {
    /// Checks ranges and the features ferry has.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} is out of range: it must be 1 to {MAX_VCPUS}",
                    self.vcpu_count
                ),
            ));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} is odd, but smt needs an even number of vCPUs (or 1)",
                    self.vcpu_count
                ),
            ));
        }
        if self.mem_size_mib == 0 {
            return Err(invalid(
                "machine-config.mem_size_mib",
                "0 is out of range: a guest needs memory",
            ));
        }
        match self.dirty_tracking.as_deref() {
            None | Some("uffd-async" | "uffd-sync" | "kvm-dirty-log") => {}
            Some(t) => {
                return Err(invalid(
                    "machine-config.dirty_tracking",
                    format!(
                        "\"{t}\" is not a mechanism: use uffd-async, uffd-sync or kvm-dirty-log"
                    ),
                ))
            }
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => {}
            Some(t) => {
                return Err(ConfigError::Unsupported(format!(
                    "machine-config.cpu_template \"{t}\""
                )))
            }
        }
        match self.huge_pages.as_deref() {
            None | Some("None") => {}
            Some(h) => {
                return Err(ConfigError::Unsupported(format!(
                    "machine-config.huge_pages \"{h}\""
                )))
            }
        }
        Ok(())
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    #[serde(default)]
    pub vcpu_count: Option<u64>,
    /// New memory size.
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// New SMT setting.
    #[serde(default)]
    pub smt: Option<bool>,
    /// New dirty-tracking setting.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// New tracking mechanism.
    #[serde(default)]
    pub dirty_tracking: Option<String>,
    /// New CPU template.
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// New huge pages setting.
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl MachineConfig {
    /// This configuration with `update` applied, validated.
    pub fn updated(&self, update: &MachineConfigUpdate) -> Result<MachineConfig, ConfigError> {
        let mut next = self.clone();
        if let Some(v) = update.vcpu_count {
            next.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            next.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            next.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            next.track_dirty_pages = v;
        }
        if update.dirty_tracking.is_some() {
            next.dirty_tracking = update.dirty_tracking.clone();
        }
        if update.cpu_template.is_some() {
            next.cpu_template = update.cpu_template.clone();
        }
        if update.huge_pages.is_some() {
            next.huge_pages = update.huge_pages.clone();
        }
        next.validate()?;
        Ok(next)
    }
}

/// `drives[]` entries, Firecracker's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Drive name.
    pub drive_id: String,
    /// Backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Root device.
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Partition UUID for root=PARTUUID=.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" or "Async".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Rate limiter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
    /// vhost-user socket (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `network-interfaces[]` entries, Firecracker's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Interface name.
    pub iface_id: String,
    /// Host tap device.
    pub host_dev_name: String,
    /// Guest MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive rate limiter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Transmit rate limiter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `serial`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// File that receives the guest console; ferry's stdout when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// The pages written since the previous snapshot.
    Diff,
    /// All of guest memory as at a brief pause, saved while the guest runs on (a ferry
    /// extension; see "Live snapshots" in the README).
    Live,
}

/// `GET /snapshot`: the live snapshot running or last run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SnapshotStatus {
    /// idle, active, completed or failed.
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// How long the guest was paused, in ms.
    pub pause_ms: f64,
    /// Pages saved so far.
    pub pages_saved: u64,
    /// Pages still to save.
    pub pages_left: u64,
    /// Writes that found their page not yet saved: saved first, then let through.
    pub copy_before_write_faults: u64,
    /// How long those took (µs), from the fault read to the write let through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_us: Option<crate::migration::FaultLatency>,
    /// From the request to both files complete, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
}

/// `PUT /snapshot/create`, Firecracker's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    /// Where the state file goes.
    pub snapshot_path: PathBuf,
    /// Where the memory file goes.
    pub mem_file_path: PathBuf,
    /// Firecracker's removed snapshot format version: accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `mem_backend.backend_type` of `PUT /snapshot/load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// A memory file written by `/snapshot/create`.
    File,
    /// A Unix socket where a userfaultfd page-fault handler listens.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file, or the handler's socket.
    pub backend_path: PathBuf,
}

/// One entry of `network_overrides`: the tap an interface uses on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as saved.
    pub iface_id: String,
    /// The tap to use instead of the saved one.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`, Firecracker's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated: a File backend at this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    /// Track dirty pages for Diff snapshots of the loaded VM.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Deprecated spelling of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Run the guest at once.
    #[serde(default)]
    pub resume_vm: bool,
    /// Taps to use in place of the saved ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
}

impl SnapshotLoadParams {
    /// Checks that exactly one memory source is given.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(invalid(
                "mem_backend",
                "give mem_backend or the deprecated mem_file_path, not both",
            )),
            (None, None) => Err(invalid(
                "mem_backend",
                "missing: give mem_backend (or the deprecated mem_file_path)",
            )),
            _ => Ok(()),
        }
    }

    /// The memory source (after `validate`).
    pub fn backend(&self) -> (MemBackendType, &std::path::Path) {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), _) => (b.backend_type, b.backend_path.as_path()),
            (None, Some(p)) => (MemBackendType::File, p.as_path()),
            (None, None) => (MemBackendType::File, std::path::Path::new("")),
        }
    }

    /// Whether the loaded VM tracks dirty pages.
    pub fn dirty_tracking_wanted(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }
}

/// A whole Firecracker configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network devices.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Console output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// Where and how ferry logs, as `PUT /logger`; applied at start.
    #[serde(default, skip_serializing)]
    pub logger: Option<crate::action::LoggerConfig>,
    /// Where metrics go, as `PUT /metrics`; applied at start.
    #[serde(default, skip_serializing)]
    pub metrics: Option<crate::action::MetricsConfig>,
    /// Firecracker sections that ferry parses but does not implement: present means refused.
    #[serde(default, skip_serializing)]
    balloon: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    vsock: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default, skip_serializing)]
    mmds_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    entropy: Option<serde_json::Value>,
    #[serde(rename = "cpu-config", default, skip_serializing)]
    cpu_config: Option<serde_json::Value>,
}

impl VmConfig {
    /// Puts each override's tap in place of its interface's (a snapshot load, an
    /// incoming migration). Fails with the `iface_id` of an override that names no
    /// interface of this configuration.
    pub fn override_taps(&mut self, overrides: &[NetworkOverride]) -> Result<(), String> {
        for o in overrides {
            let iface = self
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| o.iface_id.clone())?;
            iface.host_dev_name = o.host_dev_name.clone();
        }
        Ok(())
    }

    /// A configuration from its sections (as assembled through the API).
    pub fn new(
        boot_source: BootSource,
        machine_config: MachineConfig,
        drives: Vec<Drive>,
        network_interfaces: Vec<NetworkInterface>,
        serial: Option<SerialConfig>,
    ) -> Self {
        VmConfig {
            boot_source,
            machine_config,
            drives,
            network_interfaces,
            serial,
            logger: None,
            metrics: None,
            balloon: None,
            vsock: None,
            mmds_config: None,
            entropy: None,
            cpu_config: None,
        }
    }

    /// Parses and validates a configuration file's text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(level) = self.logger.as_ref().and_then(|l| l.level.as_deref()) {
            level
                .parse::<logger::Level>()
                .map_err(|e| invalid("logger.level", e.to_string()))?;
        }
        let unsupported = [
            ("balloon", self.balloon.is_some()),
            ("vsock", self.vsock.is_some()),
            ("mmds-config", self.mmds_config.is_some()),
            ("entropy", self.entropy.is_some()),
            ("cpu-config", self.cpu_config.is_some()),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, present)| *present) {
            return Err(ConfigError::Unsupported(format!("the \"{name}\" section")));
        }
        self.machine_config.validate()?;
        require_file(
            "boot-source.kernel_image_path",
            &self.boot_source.kernel_image_path,
        )?;
        if let Some(initrd) = &self.boot_source.initrd_path {
            require_file("boot-source.initrd_path", initrd)?;
        }
        for d in &self.drives {
            d.validate()?;
        }
        for n in &self.network_interfaces {
            n.validate()?;
        }
        let unique = |field: &'static str, values: Vec<&str>| {
            let mut seen = std::collections::HashSet::new();
            match values.into_iter().find(|v| !seen.insert(*v)) {
                Some(dup) => Err(invalid(field, format!("\"{dup}\" is used twice"))),
                None => Ok(()),
            }
        };
        unique(
            "drives.drive_id",
            self.drives.iter().map(|d| d.drive_id.as_str()).collect(),
        )?;
        unique(
            "network-interfaces.iface_id",
            self.network_interfaces
                .iter()
                .map(|n| n.iface_id.as_str())
                .collect(),
        )?;
        unique(
            "network-interfaces.host_dev_name",
            self.network_interfaces
                .iter()
                .map(|n| n.host_dev_name.as_str())
                .collect(),
        )?;
        unique(
            "network-interfaces.guest_mac",
            self.network_interfaces
                .iter()
                .filter_map(|n| n.guest_mac.as_deref())
                .collect(),
        )?;
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err(invalid(
                "drives.is_root_device",
                "only one drive can be the root device",
            ));
        }
        let devices = self.drives.len() + self.network_interfaces.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "drives",
                format!("{devices} drives and network interfaces are more than the {MAX_VIRTIO_DEVICES} ferry can attach"),
            ));
        }
        Ok(())
    }
}

impl BootSource {
    /// Checks that the files exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require_file("boot-source.kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            require_file("boot-source.initrd_path", initrd)?;
        }
        Ok(())
    }
}

impl Drive {
    /// Checks the fields ferry can check before the device exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require_id("drives.drive_id", &self.drive_id)?;
        match &self.path_on_host {
            Some(path) => require_file("drives.path_on_host", path)?,
            None if self.socket.is_none() => {
                return Err(invalid(
                    "drives.path_on_host",
                    "is required for a block device",
                ));
            }
            None => {}
        }
        if self.socket.is_some() {
            return Err(ConfigError::Unsupported(
                "drives.socket (vhost-user block)".into(),
            ));
        }
        if self.rate_limiter.is_some() {
            return Err(ConfigError::Unsupported("drives.rate_limiter".into()));
        }
        if let Some(uuid) = self.partuuid.as_deref() {
            if !is_partuuid(uuid) {
                return Err(invalid(
                    "drives.partuuid",
                    format!(
                        "\"{uuid}\" is not a partition UUID (GPT: 8-4-4-4-12 hex digits; MBR: 8-2)"
                    ),
                ));
            }
        }
        if let Some(c) = self.cache_type.as_deref() {
            if c != "Unsafe" && c != "Writeback" {
                return Err(invalid(
                    "drives.cache_type",
                    format!("\"{c}\" is not Unsafe or Writeback"),
                ));
            }
        }
        if let Some(e) = self.io_engine.as_deref() {
            if e != "Sync" && e != "Async" {
                return Err(invalid(
                    "drives.io_engine",
                    format!("\"{e}\" is not Sync or Async"),
                ));
            }
        }
        Ok(())
    }
}

impl NetworkInterface {
    /// Checks the fields ferry can check before the device exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require_id("network-interfaces.iface_id", &self.iface_id)?;
        if self.host_dev_name.is_empty() || self.host_dev_name.len() > 15 {
            return Err(invalid(
                "network-interfaces.host_dev_name",
                format!(
                    "\"{}\" is not a tap device name (1 to 15 bytes)",
                    self.host_dev_name
                ),
            ));
        }
        if let Some(mac) = &self.guest_mac {
            let ok = mac.split(':').count() == 6
                && mac
                    .split(':')
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(invalid(
                    "network-interfaces.guest_mac",
                    format!("\"{mac}\" is not a MAC address"),
                ));
            }
        }
        if self.rx_rate_limiter.is_some() || self.tx_rate_limiter.is_some() {
            return Err(ConfigError::Unsupported(
                "network-interfaces rate limiters".into(),
            ));
        }
        Ok(())
    }
}

/// A partition UUID as Linux's `root=PARTUUID=` takes it: a GPT UUID
/// (`8-4-4-4-12` hex digits) or an MBR disk signature and partition (`8-2`). It goes on
/// the kernel command line, so nothing else may pass.
fn is_partuuid(uuid: &str) -> bool {
    let groups: Vec<usize> = uuid.split('-').map(str::len).collect();
    let hex = uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    hex && (groups == [8, 4, 4, 4, 12] || groups == [8, 2])
}

/// IDs are used in paths: non-empty, at most 64 bytes, letters, digits and `_`.
fn require_id(field: &'static str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(invalid(
            field,
            format!("\"{id}\" must be 1 to 64 letters, digits or underscores"),
        ));
    }
    Ok(())
}

fn require_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(field, "the path is empty"));
    }
    if !path.exists() {
        return Err(ConfigError::MissingFile {
            field,
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_machine(machine: &str) -> String {
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "/proc/self/exe"}}, "machine-config": {machine}}}"#
        )
    }

    #[test]
    fn test_accepts_firecracker_config() {
        let c = VmConfig::from_json(&with_machine(
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#,
        ))
        .expect("valid");
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.boot_source.boot_args(), DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn test_rejects_unknown_field_by_name() {
        let err = VmConfig::from_json(&with_machine(
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "turbo": true}"#,
        ))
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `turbo`"), "{err}");
    }

    #[test]
    fn test_rejects_vcpu_counts_out_of_range() {
        for n in [0, 1000] {
            let err = VmConfig::from_json(&with_machine(&format!(
                r#"{{"vcpu_count": {n}, "mem_size_mib": 64}}"#
            )))
            .expect_err("out of range");
            assert_eq!(
                err.to_string(),
                format!("machine-config.vcpu_count: {n} is out of range: it must be 1 to 32")
            );
        }
    }

    #[test]
    fn test_rejects_zero_memory() {
        let err = VmConfig::from_json(&with_machine(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#))
            .expect_err("zero");
        assert!(
            err.to_string()
                .starts_with("machine-config.mem_size_mib: 0 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn test_rejects_missing_kernel_file() {
        let err =
            VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/no/such/vmlinux"}}"#)
                .expect_err("missing");
        assert_eq!(
            err.to_string(),
            "boot-source.kernel_image_path: /no/such/vmlinux does not exist"
        );
    }

    #[test]
    fn test_partuuid_must_be_a_uuid() {
        let drive = |uuid: &str| Drive {
            drive_id: "root".into(),
            path_on_host: Some("/proc/self/exe".into()),
            is_root_device: true,
            is_read_only: None,
            partuuid: Some(uuid.into()),
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
        for ok in ["0eaa91a0-01", "6a7b3e2c-1d4f-4a9b-8c0e-0123456789ab"] {
            drive(ok).validate().expect(ok);
        }
        for bad in [
            "",
            "0eaa91a0-01 init=/bin/sh",
            "6a7b3e2c-1d4f-4a9b-8c0e-0123456789ag",
            "6a7b3e2c1d4f4a9b8c0e0123456789ab",
            "0eaa91a0-01-",
        ] {
            let err = drive(bad).validate().expect_err(bad).to_string();
            assert!(err.starts_with("drives.partuuid: "), "{err}");
        }
    }

    #[test]
    fn test_refuses_unsupported_sections() {
        let text = r#"{"boot-source": {"kernel_image_path": "/proc/self/exe"}, "vsock": {"guest_cid": 3}}"#;
        let err = VmConfig::from_json(text).expect_err("unsupported");
        assert_eq!(
            err.to_string(),
            "the \"vsock\" section is not supported by ferry yet"
        );
    }

    #[test]
    fn test_checks_drives_and_interfaces_together() {
        let with = |devices: &str| {
            VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "/proc/self/exe"}}, {devices}}}"#
            ))
        };
        let drive = |id: &str, root: bool| {
            format!(
                r#"{{"drive_id": "{id}", "path_on_host": "/proc/self/exe", "is_root_device": {root}}}"#
            )
        };
        let net = |id: &str, tap: &str, mac: &str| {
            format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}", "guest_mac": "{mac}"}}"#)
        };
        let ok = with(&format!(
            r#""drives": [{}, {}], "network-interfaces": [{}]"#,
            drive("root", true),
            drive("data", false),
            net("eth0", "tap0", "06:00:00:00:00:01")
        ));
        assert!(ok.is_ok(), "{ok:?}");
        for (devices, message) in [
            (
                format!(
                    r#""drives": [{}, {}]"#,
                    drive("a", false),
                    drive("a", false)
                ),
                "drives.drive_id: \"a\" is used twice",
            ),
            (
                format!(r#""drives": [{}, {}]"#, drive("a", true), drive("b", true)),
                "drives.is_root_device: only one drive can be the root device",
            ),
            (
                format!(
                    r#""network-interfaces": [{}, {}]"#,
                    net("a", "tap0", "06:00:00:00:00:01"),
                    net("b", "tap0", "06:00:00:00:00:02")
                ),
                "network-interfaces.host_dev_name: \"tap0\" is used twice",
            ),
            (
                format!(
                    r#""network-interfaces": [{}, {}]"#,
                    net("a", "tap0", "06:00:00:00:00:01"),
                    net("b", "tap1", "06:00:00:00:00:01")
                ),
                "network-interfaces.guest_mac: \"06:00:00:00:00:01\" is used twice",
            ),
            (
                format!(
                    r#""drives": [{}]"#,
                    (0..20)
                        .map(|i| drive(&format!("d{i}"), false))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "20 drives and network interfaces are more than the 19 ferry can attach",
            ),
        ] {
            let err = with(&devices).expect_err(message).to_string();
            assert!(err.contains(message), "{err}");
        }
    }
}
