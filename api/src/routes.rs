//! The API's routes: each request's method, path and body become a typed `VmmAction`, or
//! a 400, 404 or 405 with a message that names the problem. Pure functions, no I/O.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::action::{
    ApiError, DriveUpdate, LoggerConfig, MetricsConfig, NetworkInterfaceUpdate, VmmAction,
};
use crate::migration::{MigrationReceiveParams, MigrationSendParams};
use crate::models::{
    BootSource, ConfigError, Drive, MachineConfig, MachineConfigUpdate, NetworkInterface,
    SerialConfig, SnapshotCreateParams, SnapshotLoadParams,
};

/// Every route the server serves, as (method, OpenAPI path). `docs/openapi.json` must
/// list exactly these; a test checks both ways.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/vm/config"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/serial"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/metrics"),
    ("PUT", "/metrics"),
    ("PUT", "/logger"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("GET", "/migration"),
    ("GET", "/snapshot"),
    ("PUT", "/migration/send"),
    ("PUT", "/migration/receive"),
    ("PUT", "/migration/cancel"),
];

/// Firecracker's endpoints that ferry does not implement yet. They get a 400 that says
/// so, not a 404, so that Firecracker tooling learns why. Also in docs/openapi.json.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("GET", "/mmds"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("PUT", "/cpu-config"),
];

/// What a request turned into.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Work for the VMM thread.
    Vmm(VmmAction),
    /// `GET /version`, answered by the API thread itself.
    Version,
    /// `GET /`, answered by the API thread from the published `InstanceStatus`.
    InstanceInfo,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateValue,
}

#[derive(Deserialize)]
enum VmStateValue {
    Paused,
    Resumed,
}

fn config_error(e: ConfigError) -> ApiError {
    ApiError::bad_request(e.to_string())
}

/// Parses a JSON body, naming the field in every error (serde alone does not for
/// type errors).
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request needs a JSON body"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path == "?" {
            ApiError::bad_request(format!("invalid JSON body: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("invalid JSON body: {path}: {}", e.inner()))
        }
    })?;
    Ok(value)
}

fn same_id(kind: &str, in_body: &str, in_path: &str) -> Result<(), ApiError> {
    if in_body != in_path {
        return Err(ApiError::bad_request(format!(
            "the {kind} in the body (\"{in_body}\") differs from the one in the path (\"{in_path}\")"
        )));
    }
    Ok(())
}

/// The OpenAPI path a request path matches, and its `{id}` segment if any.
fn match_path(path: &str) -> Option<(&'static str, Option<&str>)> {
    let fixed = ROUTES
        .iter()
        .map(|(_, p)| *p)
        .find(|p| *p == path && !p.contains('{'));
    if let Some(p) = fixed {
        return Some((p, None));
    }
    for (prefix, route) in [
        ("/drives/", "/drives/{drive_id}"),
        ("/network-interfaces/", "/network-interfaces/{iface_id}"),
    ] {
        if let Some(id) = path.strip_prefix(prefix) {
            if !id.contains('/') {
                return Some((route, Some(id)));
            }
        }
    }
    None
}

/// Turns a request into an action. `path` may carry a query string, which is ignored.
pub fn parse(method: &str, path: &str, bytes: &[u8]) -> Result<Parsed, ApiError> {
    let path = path.split('?').next().unwrap_or(path);
    if UNSUPPORTED.iter().any(|(m, p)| *m == method && *p == path) {
        return Err(ApiError::bad_request(format!(
            "{method} {path} is not supported by ferry yet"
        )));
    }
    let Some((route, id)) = match_path(path) else {
        return Err(ApiError {
            status: 404,
            message: format!("no such resource: {path}"),
        });
    };
    if !ROUTES.iter().any(|(m, p)| *m == method && *p == route) {
        let allowed: Vec<&str> = ROUTES
            .iter()
            .filter(|(_, p)| *p == route)
            .map(|(m, _)| *m)
            .collect();
        return Err(ApiError {
            status: 405,
            message: format!(
                "method {method} is not allowed on {path}; allowed: {}",
                allowed.join(", ")
            ),
        });
    }
    if id == Some("") {
        return Err(ApiError::bad_request(format!(
            "the ID in the path {path} is empty"
        )));
    }
    let id = id.unwrap_or_default();
    let action = match (method, route) {
        ("GET", "/version") => return Ok(Parsed::Version),
        ("GET", "/") => return Ok(Parsed::InstanceInfo),
        ("GET", "/vm/config") => VmmAction::GetVmConfig,
        ("GET", "/machine-config") => VmmAction::GetMachineConfig,
        ("GET", "/metrics") => VmmAction::GetMetrics,
        ("PUT", "/machine-config") => {
            let config: MachineConfig = body(bytes)?;
            config.validate().map_err(config_error)?;
            VmmAction::PutMachineConfig(config)
        }
        ("PATCH", "/machine-config") => {
            VmmAction::PatchMachineConfig(body::<MachineConfigUpdate>(bytes)?)
        }
        ("PUT", "/boot-source") => {
            let source: BootSource = body(bytes)?;
            source.validate().map_err(config_error)?;
            VmmAction::PutBootSource(source)
        }
        ("PUT", "/drives/{drive_id}") => {
            let drive: Drive = body(bytes)?;
            same_id("drive_id", &drive.drive_id, id)?;
            drive.validate().map_err(config_error)?;
            VmmAction::PutDrive(drive)
        }
        ("PATCH", "/drives/{drive_id}") => {
            let update: DriveUpdate = body(bytes)?;
            same_id("drive_id", &update.drive_id, id)?;
            VmmAction::PatchDrive(update)
        }
        ("PUT", "/network-interfaces/{iface_id}") => {
            let iface: NetworkInterface = body(bytes)?;
            same_id("iface_id", &iface.iface_id, id)?;
            iface.validate().map_err(config_error)?;
            VmmAction::PutNetworkInterface(iface)
        }
        ("PATCH", "/network-interfaces/{iface_id}") => {
            let update: NetworkInterfaceUpdate = body(bytes)?;
            same_id("iface_id", &update.iface_id, id)?;
            VmmAction::PatchNetworkInterface(update)
        }
        ("PUT", "/serial") => VmmAction::PutSerial(body::<SerialConfig>(bytes)?),
        ("PUT", "/metrics") => VmmAction::PutMetrics(body::<MetricsConfig>(bytes)?),
        ("PUT", "/logger") => {
            let settings = body::<LoggerConfig>(bytes)?
                .settings()
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: level: {e}")))?;
            VmmAction::PutLogger(settings)
        }
        ("PUT", "/actions") => match body::<ActionBody>(bytes)?.action_type {
            ActionType::InstanceStart => VmmAction::StartInstance,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        ("PUT", "/snapshot/create") => {
            VmmAction::CreateSnapshot(body::<SnapshotCreateParams>(bytes)?)
        }
        ("PUT", "/snapshot/load") => {
            let params: SnapshotLoadParams = body(bytes)?;
            params.validate().map_err(config_error)?;
            VmmAction::LoadSnapshot(params)
        }
        ("GET", "/migration") => VmmAction::GetMigration,
        ("GET", "/snapshot") => VmmAction::GetSnapshot,
        ("PUT", "/migration/send") => {
            let params: MigrationSendParams = body(bytes)?;
            let endpoint = params.validate().map_err(config_error)?;
            VmmAction::MigrationSend(params, endpoint)
        }
        ("PUT", "/migration/receive") => {
            let params: MigrationReceiveParams = body(bytes)?;
            let endpoint = params.validate().map_err(config_error)?;
            VmmAction::MigrationReceive(params, endpoint)
        }
        ("PUT", "/migration/cancel") => VmmAction::MigrationCancel,
        ("PATCH", "/vm") => match body::<VmStateBody>(bytes)?.state {
            VmStateValue::Paused => VmmAction::Pause,
            VmStateValue::Resumed => VmmAction::Resume,
        },
        // ROUTES and this match list the same pairs; a test checks every route parses.
        _ => {
            return Err(ApiError {
                status: 500,
                message: format!("route {method} {route} has no handler"),
            })
        }
    };
    Ok(Parsed::Vmm(action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(method: &str, path: &str, body: &str) -> ApiError {
        parse(method, path, body.as_bytes()).expect_err("must be refused")
    }

    #[test]
    fn test_every_route_has_a_handler() {
        for (method, route) in ROUTES {
            let path = route
                .replace("{drive_id}", "d1")
                .replace("{iface_id}", "n1");
            let e = parse(method, &path, b"{}");
            assert!(
                !matches!(
                    e,
                    Err(ApiError {
                        status: 500 | 404 | 405,
                        ..
                    })
                ),
                "{method} {route}: {e:?}"
            );
        }
    }

    #[test]
    fn test_unknown_path_is_404_and_wrong_method_405() {
        assert_eq!(err("GET", "/nope", "").status, 404);
        assert_eq!(err("GET", "/drives/a/b", "").status, 404);
        let e = err("DELETE", "/machine-config", "");
        assert_eq!(e.status, 405);
        assert_eq!(
            e.message,
            "method DELETE is not allowed on /machine-config; allowed: GET, PUT, PATCH"
        );
        assert_eq!(err("POST", "/", "").status, 405);
    }

    #[test]
    fn test_bad_json_names_field_and_problem() {
        assert_eq!(
            err("PUT", "/machine-config", "{").message,
            "invalid JSON body: EOF while parsing an object at line 1 column 1"
        );
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 128}"#,
        );
        assert!(
            e.message.starts_with(
                "invalid JSON body: vcpu_count: invalid type: string \"two\", expected u64"
            ),
            "{}",
            e.message
        );
        let e = err("PUT", "/machine-config", r#"{"vcpu_count": 2}"#);
        assert!(
            e.message.contains("missing field `mem_size_mib`"),
            "{}",
            e.message
        );
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64, "turbo": 1}"#,
        );
        assert!(e.message.contains("unknown field `turbo`"), "{}", e.message);
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 64, "mem_size_mib": 64}"#,
        );
        assert_eq!(
            e.message,
            "machine-config.vcpu_count: 64 is out of range: it must be 1 to 32"
        );
        let e = err("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(
            e.message
                .starts_with("invalid JSON body: action_type: unknown variant `Reboot`"),
            "{}",
            e.message
        );
        assert_eq!(
            err("PUT", "/actions", "").message,
            "the request needs a JSON body"
        );
    }

    #[test]
    fn test_firecracker_endpoints_ferry_lacks_say_so() {
        let e = err("PUT", "/cpu-config", "{}");
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "PUT /cpu-config is not supported by ferry yet")
        );
        assert_eq!(err("GET", "/balloon", "").status, 400);
    }

    #[test]
    fn test_snapshot_bodies_are_firecracker_s() {
        let ok = parse(
            "PUT",
            "/snapshot/create",
            br#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        assert!(
            matches!(ok, Ok(Parsed::Vmm(VmmAction::CreateSnapshot(_)))),
            "{ok:?}"
        );
        let e = err(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Partial", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        assert!(
            e.message
                .contains("snapshot_type: unknown variant `Partial`"),
            "{}",
            e.message
        );
        let load = |b: &str| parse("PUT", "/snapshot/load", b.as_bytes());
        assert!(load(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}, "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}"#).is_ok());
        assert!(load(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#
        )
        .is_ok());
        let e = load(r#"{"snapshot_path": "/s"}"#).expect_err("no memory");
        assert!(e.message.contains("mem_backend"), "{}", e.message);
        let e = load(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#)
            .expect_err("two memory sources");
        assert!(e.message.contains("not both"), "{}", e.message);
    }

    #[test]
    fn test_migration_bodies_parse_and_name_their_fields() {
        let ok = parse(
            "PUT",
            "/migration/send",
            br#"{"destination": "tcp:127.0.0.1:7000", "tracking": "uffd-sync", "verify": true}"#,
        );
        assert!(
            matches!(ok, Ok(Parsed::Vmm(VmmAction::MigrationSend(_, _)))),
            "{ok:?}"
        );
        let e = err("PUT", "/migration/send", r#"{"destination": "ftp:x"}"#);
        assert!(e.message.starts_with("destination: "), "{}", e.message);
        let e = err(
            "PUT",
            "/migration/send",
            r#"{"destination": "unix:/m", "mode": "precopy-ish"}"#,
        );
        assert!(
            e.message.contains("mode: unknown variant `precopy-ish`"),
            "{}",
            e.message
        );
        let e = err(
            "PUT",
            "/migration/receive",
            r#"{"listen": "unix:/m", "port": 1}"#,
        );
        assert!(e.message.contains("unknown field `port`"), "{}", e.message);
        assert_eq!(
            parse("GET", "/migration", b""),
            Ok(Parsed::Vmm(VmmAction::GetMigration))
        );
        assert_eq!(
            parse("PUT", "/migration/cancel", b""),
            Ok(Parsed::Vmm(VmmAction::MigrationCancel))
        );
    }

    #[test]
    fn test_drive_id_must_match_path() {
        let e = err(
            "PUT",
            "/drives/root",
            r#"{"drive_id": "other", "path_on_host": "/proc/self/exe", "is_root_device": true}"#,
        );
        assert_eq!(
            e.message,
            "the drive_id in the body (\"other\") differs from the one in the path (\"root\")"
        );
    }

    #[test]
    fn test_missing_file_is_named() {
        let e = err(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/no/such/kernel"}"#,
        );
        assert_eq!(
            e.message,
            "boot-source.kernel_image_path: /no/such/kernel does not exist"
        );
    }

    #[test]
    fn test_valid_requests_parse() {
        assert_eq!(parse("GET", "/?x=1", b""), Ok(Parsed::InstanceInfo));
        assert_eq!(parse("GET", "/version", b""), Ok(Parsed::Version));
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(Parsed::Vmm(VmmAction::Pause))
        );
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Ok(Parsed::Vmm(VmmAction::StartInstance))
        );
    }
}

#[cfg(test)]
mod openapi_tests {
    use std::collections::BTreeSet;

    use super::{ROUTES, UNSUPPORTED};

    /// docs/openapi.json documents exactly the routes the server serves.
    #[test]
    fn test_openapi_document_matches_routes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read docs/openapi.json"))
                .expect("JSON");
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .chain(UNSUPPORTED)
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(missing.is_empty(), "served but not documented: {missing:?}");
        assert!(extra.is_empty(), "documented but not served: {extra:?}");
    }
}
