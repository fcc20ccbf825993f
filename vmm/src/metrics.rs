//! Metrics as Firecracker writes them: `PUT /metrics` (or `--metrics-path`) names a
//! file or FIFO, and each flush (`FlushMetrics`, and every 60 s) writes one JSON object
//! on one line.
//!
//! `GET /metrics` shows totals since start. The file, like Firecracker's, carries
//! counters as what changed since the previous line, for Firecracker's groups (`vcpu`,
//! `uart`, `block`, `net`, `logger`, the `*_api_requests`): a tool that sums
//! Firecracker's lines sums ferry's the same way. Values that are not counters
//! (`utc_timestamp_ms`, the startup times, `seccomp.num_faults`) and ferry's own
//! groups (`virtio`, `migration`, `api_server.requests_by_status`) are written as they
//! are.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

/// How often the file gets a line unasked, as Firecracker's.
pub const PERIOD: Duration = Duration::from_secs(60);

/// Firecracker's groups whose numbers are counters, written as deltas.
fn is_counter_group(key: &str) -> bool {
    matches!(
        key,
        "vcpu"
            | "uart"
            | "vmm"
            | "logger"
            | "block"
            | "net"
            | "get_api_requests"
            | "put_api_requests"
            | "patch_api_requests"
    ) || key.starts_with("block_")
        || key.starts_with("net_")
}

/// How long ferry took to start, as Firecracker's `api_server.process_startup_time_us`
/// and `process_startup_time_cpu_us`: from the launcher's `--start-time-us` (and
/// `--start-time-cpu-us`, `--parent-cpu-time-us`) to the API being ready.
#[derive(Debug, Clone, Copy, Default)]
pub struct Startup {
    us: Option<u64>,
    cpu_us: Option<u64>,
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1000
}

impl Startup {
    /// Measures now against what the launcher passed (nothing when it passed nothing).
    pub fn measure(
        start_us: Option<u64>,
        start_cpu_us: Option<u64>,
        parent_cpu_us: Option<u64>,
    ) -> Startup {
        Startup {
            us: start_us.map(|t| clock_us(libc::CLOCK_MONOTONIC).saturating_sub(t)),
            cpu_us: start_cpu_us.map(|t| {
                clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(t)
                    + parent_cpu_us.unwrap_or(0)
            }),
        }
    }

    fn insert(&self, api_server: &mut Value) {
        if let Some(us) = self.us {
            api_server["process_startup_time_us"] = us.into();
        }
        if let Some(us) = self.cpu_us {
            api_server["process_startup_time_cpu_us"] = us.into();
        }
    }
}

/// Adds Firecracker's shapes to ferry's metrics: `block_<id>` and `net_<id>` per device
/// and `block`, `net` summed over devices, with Firecracker's names for the counters
/// that mean the same; the startup times; `logger` and `seccomp`.
pub fn add_firecracker_groups(m: &mut Value, startup: &Startup, missed_metrics: u64) {
    const BLOCK: &[(&str, &str)] = &[
        ("read_bytes", "read_bytes"),
        ("write_bytes", "write_bytes"),
        ("read_count", "read_count"),
        ("write_count", "write_count"),
        ("flush_count", "flush_count"),
        ("io_errors", "execute_fails"),
        ("unsupported", "invalid_reqs_count"),
    ];
    const NET: &[(&str, &str)] = &[
        ("rx_bytes", "rx_bytes_count"),
        ("rx_frames", "rx_packets_count"),
        ("tx_bytes", "tx_bytes_count"),
        ("tx_frames", "tx_packets_count"),
    ];
    for (kind, names) in [("block", BLOCK), ("net", NET)] {
        let mut total = Map::new();
        for &(_, fc) in names {
            total.insert(fc.into(), 0u64.into());
        }
        let devices = m["virtio"][kind].as_object().cloned().unwrap_or_default();
        for (id, counters) in devices {
            let mut one = Map::new();
            for &(ours, fc) in names {
                let n = counters[ours].as_u64().unwrap_or(0);
                one.insert(fc.into(), n.into());
                let sum = total[fc].as_u64().unwrap_or(0).saturating_add(n);
                total.insert(fc.into(), sum.into());
            }
            m[format!("{kind}_{id}")] = Value::Object(one);
        }
        m[kind] = Value::Object(total);
    }
    if m.get("api_server").is_none() {
        m["api_server"] = serde_json::json!({});
    }
    startup.insert(&mut m["api_server"]);
    m["logger"] = serde_json::json!({
        "missed_log_count": logger::missed_log_count(),
        "missed_metrics_count": missed_metrics,
        "metrics_fails": missed_metrics,
        "log_fails": 0,
    });
    // A forbidden syscall ends ferry before any line could carry a count.
    m["seccomp"] = serde_json::json!({ "num_faults": 0 });
}

/// Counters as what changed since `last`: numbers under `now` minus the same path in
/// `last` (0 where `last` has none); everything else as in `now`.
fn delta(now: &Value, last: &Value) -> Value {
    match now {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), delta(v, last.get(k).unwrap_or(&Value::Null))))
                .collect(),
        ),
        // A total below the last one started again (a device rebuilt from saved
        // state): all of it is new.
        Value::Number(n) => match (n.as_u64(), last.as_u64()) {
            (Some(n), Some(before)) if n >= before => (n - before).into(),
            _ => now.clone(),
        },
        other => other.clone(),
    }
}

/// The metrics destination, and the totals its last line was counted from.
pub struct MetricsFile {
    file: File,
    last: Value,
    /// The end of a line a FIFO took only in part (lines are longer than `PIPE_BUF`):
    /// it goes out before anything else, so a reader never sees two lines spliced.
    rest: Vec<u8>,
    /// Lines the destination did not take (a full FIFO, a failing disk).
    pub missed: u64,
}

impl MetricsFile {
    /// Opens `path` as Firecracker does: created if missing, non-blocking.
    pub fn open(path: &Path) -> std::io::Result<MetricsFile> {
        Ok(MetricsFile {
            file: logger::open_sink(path)?,
            last: Value::Null,
            rest: Vec::new(),
            missed: 0,
        })
    }

    /// Writes what it can of `bytes`; the remainder stays in `rest`. False when not
    /// a byte went (the destination takes nothing now).
    fn send(&mut self, bytes: &[u8]) -> bool {
        match (&self.file).write(bytes) {
            Ok(n) if n > 0 => {
                self.rest = bytes[n..].to_vec();
                true
            }
            _ => false,
        }
    }

    /// Writes one line from the totals `now`; false (and counted) when the destination
    /// did not take it whole. The next line then counts from the same totals again.
    pub fn write(&mut self, now: &Value) -> bool {
        let Value::Object(groups) = now else {
            return false;
        };
        let line: Map<String, Value> = groups
            .iter()
            .map(|(k, v)| {
                let v = if is_counter_group(k) {
                    delta(v, self.last.get(k).unwrap_or(&Value::Null))
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        // The end of an earlier line first; this line is dropped if that cannot finish.
        if !self.rest.is_empty() {
            let rest = std::mem::take(&mut self.rest);
            if !self.send(&rest) || !self.rest.is_empty() {
                if self.rest.is_empty() {
                    self.rest = rest;
                }
                self.missed += 1;
                return false;
            }
        }
        let text = format!("{}\n", Value::Object(line));
        if self.send(text.as_bytes()) {
            // Taken, or begun: the rest follows before the next line.
            self.last = now.clone();
            true
        } else {
            self.missed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_gets_firecrackers_deltas_and_ferrys_totals() {
        let dir = std::env::temp_dir().join(format!("ferry-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("m.json");
        let mut file = MetricsFile::open(&path).expect("open");
        let first = serde_json::json!({
            "utc_timestamp_ms": 10, "vcpu": { "exit_io_out": 5 },
            "virtio": { "block": { "root": { "read_count": 3 } } },
        });
        let second = serde_json::json!({
            "utc_timestamp_ms": 20, "vcpu": { "exit_io_out": 12 },
            "virtio": { "block": { "root": { "read_count": 4 } } },
        });
        assert!(file.write(&first) && file.write(&second));
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["vcpu"]["exit_io_out"], 5);
        assert_eq!(lines[1]["vcpu"]["exit_io_out"], 7);
        assert_eq!(lines[1]["utc_timestamp_ms"], 20);
        assert_eq!(lines[1]["virtio"]["block"]["root"]["read_count"], 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn devices_appear_under_firecrackers_names_and_sums() {
        let mut m = serde_json::json!({ "virtio": {
            "block": { "root": { "read_bytes": 10, "io_errors": 1 }, "data": { "read_bytes": 5 } },
            "net": { "eth0": { "tx_frames": 2, "rx_bytes": 64 } },
        }});
        add_firecracker_groups(&mut m, &Startup::default(), 0);
        assert_eq!(m["block_root"]["read_bytes"], 10);
        assert_eq!(m["block_root"]["execute_fails"], 1);
        assert_eq!(m["block"]["read_bytes"], 15);
        assert_eq!(m["net_eth0"]["tx_packets_count"], 2);
        assert_eq!(m["net"]["rx_bytes_count"], 64);
        assert_eq!(m["logger"]["missed_metrics_count"], 0);
    }
}
