//! The migration endpoints' bodies: `PUT /migration/send`, `PUT /migration/receive`, and
//! the progress that `GET /migration` reports. ferry's own extension: Firecracker has no
//! live migration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::models::{ConfigError, NetworkOverride};

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Where a migration connects or listens: `tcp:ADDR:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address, as `ADDR:PORT` (a name, IPv4, or `[IPv6]`).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `tcp:ADDR:PORT` or `unix:PATH`; `field` names the field in errors.
    pub fn parse(field: &'static str, s: &str) -> Result<Endpoint, ConfigError> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            let port = addr.rsplit_once(':').map(|(_, p)| p);
            match port.map(str::parse::<u16>) {
                Some(Ok(_)) if !addr.starts_with(':') => Ok(Endpoint::Tcp(addr.to_string())),
                _ => Err(invalid(
                    field,
                    format!("{s:?} is not tcp:ADDR:PORT with a port of 0 to 65535"),
                )),
            }
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid(field, "unix: needs a socket path"));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else {
            Err(invalid(
                field,
                format!("{s:?} must start with tcp: or unix:"),
            ))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Rounds of dirty pages while the guest runs, then a short stop.
    Precopy,
    /// The guest runs on the destination at once; its memory follows, each page it
    /// touches first fetched on demand.
    Postcopy,
    /// `precopy_rounds` pre-copy rounds, then post-copy for the rest.
    Hybrid,
}

impl MigrationMode {
    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        }
    }
}

/// The dirty-page tracking a pre-copy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationTracking {
    /// userfaultfd write-protect, asynchronous (PAGEMAP_SCAN).
    #[serde(rename = "uffd-async")]
    UffdAsync,
    /// userfaultfd write-protect with a fault-handling thread.
    #[serde(rename = "uffd-sync")]
    UffdSync,
    /// KVM's dirty log.
    #[serde(rename = "kvm-dirty-log")]
    KvmDirtyLog,
}

impl MigrationTracking {
    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            MigrationTracking::UffdAsync => "uffd-async",
            MigrationTracking::UffdSync => "uffd-sync",
            MigrationTracking::KvmDirtyLog => "kvm-dirty-log",
        }
    }
}

/// Most pre-copy rounds a request may ask for.
pub const MAX_ROUNDS: u32 = 1000;

/// `PUT /migration/send`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSendParams {
    /// `tcp:ADDR:PORT` or `unix:PATH`.
    pub destination: String,
    /// `precopy` (the default), `postcopy` or `hybrid`.
    #[serde(default = "default_mode")]
    pub mode: MigrationMode,
    /// Hybrid: the pre-copy rounds before the switch to post-copy, the first pass over
    /// memory included (default 1: one pass, then post-copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_rounds: Option<u32>,
    /// Pre-copy: switch to post-copy instead of stopping the guest for long when
    /// rounds stop converging or `max_rounds` is reached.
    #[serde(default)]
    pub postcopy_fallback: bool,
    /// The longest the guest may stop at switch-over, by estimate.
    #[serde(default = "default_downtime")]
    pub downtime_limit_ms: u64,
    /// A cap on the sending rate; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Rounds after the first full pass before switching over anyway.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// How dirty pages are tracked.
    #[serde(default = "default_tracking")]
    pub tracking: MigrationTracking,
    /// Hand guest RAM's memfd to a ferry on this host (Unix socket only): no memory is
    /// copied.
    #[serde(default)]
    pub local: bool,
    /// Hash every page on both sides at switch-over and compare before resuming.
    #[serde(default)]
    pub verify: bool,
}

fn default_mode() -> MigrationMode {
    MigrationMode::Precopy
}
fn default_downtime() -> u64 {
    50
}
fn default_rounds() -> u32 {
    30
}
fn default_tracking() -> MigrationTracking {
    MigrationTracking::UffdAsync
}

impl MigrationSendParams {
    /// Checks the fields against each other; returns the parsed destination.
    pub fn validate(&self) -> Result<Endpoint, ConfigError> {
        let endpoint = Endpoint::parse("destination", &self.destination)?;
        if self.local && !matches!(endpoint, Endpoint::Unix(_)) {
            return Err(invalid(
                "local",
                "a local migration hands over guest memory's fd, which needs a unix: destination",
            ));
        }
        let postcopy = self.mode != MigrationMode::Precopy || self.postcopy_fallback;
        if self.local && postcopy {
            return Err(invalid(
                "mode",
                "a local migration hands over all of guest memory at once: post-copy has nothing to move",
            ));
        }
        if self.verify && postcopy {
            return Err(invalid(
                "verify",
                "verify compares memory at the switch-over, and post-copy moves memory after it",
            ));
        }
        match (self.mode, self.precopy_rounds) {
            (MigrationMode::Hybrid, Some(n)) if n == 0 || n > MAX_ROUNDS => {
                return Err(invalid(
                    "precopy_rounds",
                    format!("{n} is out of range: it must be 1 to {MAX_ROUNDS}"),
                ))
            }
            (MigrationMode::Precopy | MigrationMode::Postcopy, Some(_)) => {
                return Err(invalid(
                    "precopy_rounds",
                    "only a hybrid migration has them",
                ))
            }
            _ => {}
        }
        if self.postcopy_fallback && self.mode != MigrationMode::Precopy {
            return Err(invalid(
                "postcopy_fallback",
                "only a pre-copy migration falls back to post-copy",
            ));
        }
        if self.max_rounds == 0 || self.max_rounds > MAX_ROUNDS {
            return Err(invalid(
                "max_rounds",
                format!(
                    "{} is out of range: it must be 1 to {MAX_ROUNDS}",
                    self.max_rounds
                ),
            ));
        }
        if self.max_bandwidth_mib_s == Some(0) {
            return Err(invalid(
                "max_bandwidth_mib_s",
                "0 would never send anything: give null for no limit",
            ));
        }
        if self.downtime_limit_ms > 60_000 {
            return Err(invalid(
                "downtime_limit_ms",
                format!("{} is out of range: at most 60000", self.downtime_limit_ms),
            ));
        }
        Ok(endpoint)
    }
}

/// One entry of `drive_overrides`: the file a drive uses on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive, as the source names it.
    pub drive_id: String,
    /// The file to use instead of the source's.
    pub path_on_host: PathBuf,
}

/// `PUT /migration/receive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReceiveParams {
    /// `tcp:ADDR:PORT` or `unix:PATH`.
    pub listen: String,
    /// Drive files to use in place of the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drive_overrides: Option<Vec<DriveOverride>>,
    /// Taps to use in place of the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
}

impl MigrationReceiveParams {
    /// Checks the fields; returns the parsed listen address.
    pub fn validate(&self) -> Result<Endpoint, ConfigError> {
        Endpoint::parse("listen", &self.listen)
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// None has run.
    #[default]
    Idle,
    /// Running.
    Active,
    /// Done: the guest runs on the destination.
    Completed,
    /// Ended with an error (see `error`).
    Failed,
    /// Ended by `PUT /migration/cancel`.
    Cancelled,
}

/// `GET /migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MigrationStatus {
    /// idle, active, completed, failed or cancelled.
    pub state: MigrationState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// "send" or "receive"; absent while idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    /// The tracking mechanism (pre-copy over a socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<MigrationTracking>,
    /// Whether guest RAM's memfd was handed over instead of copied.
    #[serde(default)]
    pub local: bool,
    /// The current round: 0 is the first pass over all of memory.
    pub round: u32,
    /// Bytes of guest memory sent or received so far.
    pub transferred_bytes: u64,
    /// Pages dirty at the last collect, still to send.
    pub remaining_dirty_pages: u64,
    /// The rate of the last round.
    pub throughput_mib_s: f64,
    /// The downtime the remaining pages would cost at that rate.
    pub expected_downtime_ms: f64,
    /// From the source's pause to the destination's resume, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// From the request to completion (or to now).
    pub total_ms: f64,
    /// Whether the guest runs on the destination while its memory still moves.
    #[serde(default)]
    pub postcopy: bool,
    /// Post-copy: guest accesses (vCPUs and devices) to pages not yet here (destination),
    /// or page requests answered (source).
    #[serde(default)]
    pub postcopy_faults: u64,
    /// Post-copy: from a fault to its page in place, on the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_us: Option<FaultLatency>,
    /// Post-copy: pages sent (source) or received (destination) because a fault asked.
    #[serde(default)]
    pub pages_requested: u64,
    /// Post-copy: pages sent or received in the background.
    #[serde(default)]
    pub pages_pushed: u64,
    /// Post-copy: pages the destination still lacks.
    #[serde(default)]
    pub remaining_pages: u64,
}

/// Fault latencies in µs, over every fault served by a page request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct FaultLatency {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The longest.
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_endpoints_parse_and_bad_ones_are_named() {
        assert_eq!(
            Endpoint::parse("destination", "tcp:10.0.0.2:7000").expect("tcp"),
            Endpoint::Tcp("10.0.0.2:7000".into())
        );
        assert_eq!(
            Endpoint::parse("destination", "tcp:[::1]:7000").expect("v6"),
            Endpoint::Tcp("[::1]:7000".into())
        );
        assert_eq!(
            Endpoint::parse("listen", "unix:/run/m.sock").expect("unix"),
            Endpoint::Unix("/run/m.sock".into())
        );
        for bad in [
            "tcp:10.0.0.2",
            "tcp:host:99999",
            "tcp::7000",
            "unix:",
            "udp:1.2.3.4:5",
            "",
        ] {
            let e = Endpoint::parse("destination", bad)
                .expect_err(bad)
                .to_string();
            assert!(e.starts_with("destination: "), "{bad}: {e}");
        }
    }

    #[test]
    fn test_send_params_default_and_check_each_other() {
        let p: MigrationSendParams =
            serde_json::from_str(r#"{"destination": "unix:/m"}"#).expect("parse");
        assert_eq!(p.mode, MigrationMode::Precopy);
        assert_eq!(p.downtime_limit_ms, 50);
        assert_eq!(p.max_rounds, 30);
        assert_eq!(p.tracking, MigrationTracking::UffdAsync);
        assert!(!p.local && !p.verify && p.max_bandwidth_mib_s.is_none());
        let with = |json: &str| serde_json::from_str::<MigrationSendParams>(json).expect(json);
        let e = with(r#"{"destination": "tcp:h:1", "local": true}"#)
            .validate()
            .expect_err("local over tcp")
            .to_string();
        assert!(e.starts_with("local: "), "{e}");
        for (json, field) in [
            (
                r#"{"destination": "unix:/m", "max_rounds": 0}"#,
                "max_rounds",
            ),
            (
                r#"{"destination": "unix:/m", "max_rounds": 1001}"#,
                "max_rounds",
            ),
            (
                r#"{"destination": "unix:/m", "max_bandwidth_mib_s": 0}"#,
                "max_bandwidth_mib_s",
            ),
            (
                r#"{"destination": "unix:/m", "downtime_limit_ms": 60001}"#,
                "downtime_limit_ms",
            ),
            (
                r#"{"destination": "unix:/m", "mode": "postcopy", "local": true}"#,
                "mode",
            ),
            (
                r#"{"destination": "tcp:h:1", "mode": "hybrid", "verify": true}"#,
                "verify",
            ),
            (
                r#"{"destination": "tcp:h:1", "postcopy_fallback": true, "verify": true}"#,
                "verify",
            ),
            (
                r#"{"destination": "tcp:h:1", "precopy_rounds": 2}"#,
                "precopy_rounds",
            ),
            (
                r#"{"destination": "tcp:h:1", "mode": "hybrid", "precopy_rounds": 0}"#,
                "precopy_rounds",
            ),
            (
                r#"{"destination": "tcp:h:1", "mode": "postcopy", "postcopy_fallback": true}"#,
                "postcopy_fallback",
            ),
        ] {
            let e = with(json).validate().expect_err(json).to_string();
            assert!(e.starts_with(&format!("{field}: ")), "{json}: {e}");
        }
        assert!(serde_json::from_str::<MigrationSendParams>(
            r#"{"destination": "unix:/m", "tracking": "kvm-dirty-log-hot"}"#
        )
        .is_err());
    }
}
