//! The HTTP server: one thread on a Unix socket (`http`), requests handled in order, at
//! most `http::MAX_CONNECTIONS` connections at once. It never touches VM state: each
//! request becomes a `VmmRequest` for the VMM thread, which it wakes through an eventfd,
//! and it waits a bounded time for the answer.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::action::VmmResult;
use crate::action::{ApiError, InstanceStatus, Reply, VmmData, VmmRequest};
use crate::http::{Answer, Response};
use crate::routes::{self, Parsed};

pub use crate::http::{max_body, set_max_body, MAX_BODY, MAX_CONNECTIONS};

/// The Firecracker API version whose dialect ferry speaks (`GET /version`'s
/// `firecracker_version`): its paths and fields, up to `PUT /serial`, which 1.14 added.
pub const FIRECRACKER_API_VERSION: &str = "1.14.0";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A live ferry already serves this socket.
    #[error("{0} is already served by a running process")]
    InUse(PathBuf),
    /// The path exists and is not a socket: it is not ours to delete.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Thread or eventfd setup failed.
    #[error("cannot start the API server: {0}")]
    Start(String),
}

/// Binds the API socket with mode 0600. A stale socket (nobody accepts on it) is
/// replaced; a live one is left alone.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServerError::NotASocket(path.to_owned()))
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    // The umask makes the socket 0600 from its creation, with no wider window. ferry
    // binds before it starts any other thread, so no other file creation races this.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// The API server's counts of answered requests, for the metrics. Written by the API
/// thread as each answer goes out, read by the VMM thread when it reports metrics; the
/// mutex is held only for an insert or a copy, so neither waits on the other.
#[derive(Default)]
pub struct RequestCounts {
    by_status: BTreeMap<u16, u64>,
    /// (Firecracker's group, name) to (answered, failed).
    by_route: BTreeMap<(&'static str, String), (u64, u64)>,
}

impl RequestCounts {
    fn count(&mut self, method: &str, path: &str, status: u16) {
        *self.by_status.entry(status).or_default() += 1;
        // Not a route (404, 405): not a name of its own, or any client could add keys.
        if status == 404 || status == 405 {
            return;
        }
        if let Some(key) = route_key(method, path) {
            let entry = self.by_route.entry(key).or_default();
            entry.0 += 1;
            if status >= 400 {
                entry.1 += 1;
            }
        }
    }

    /// Firecracker's `get_api_requests`, `put_api_requests` and `patch_api_requests`
    /// (`<name>_count`, `<name>_fails`), and ferry's `api_server.requests_by_status`.
    pub fn json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for group in ["get_api_requests", "put_api_requests", "patch_api_requests"] {
            out.insert(group.into(), serde_json::json!({}));
        }
        for ((group, name), (count, fails)) in &self.by_route {
            let g = &mut out[*group];
            g[format!("{name}_count")] = (*count).into();
            g[format!("{name}_fails")] = (*fails).into();
        }
        let by_status: serde_json::Map<String, serde_json::Value> = self
            .by_status
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        out.insert(
            "api_server".into(),
            serde_json::json!({
                "requests_by_status": by_status,
                "requests": self.by_status.values().sum::<u64>(),
            }),
        );
        out
    }
}

/// A request's metrics group and name: Firecracker's where it has the route
/// (`machine_cfg`, `drive`, `network`, `instance_info`, ...), else the path's
/// segments joined with `_` (`snapshot_create`, `migration_send`).
fn route_key(method: &str, path: &str) -> Option<(&'static str, String)> {
    let group = match method {
        "GET" => "get_api_requests",
        "PUT" => "put_api_requests",
        "PATCH" => "patch_api_requests",
        _ => return None,
    };
    let path = path.split('?').next().unwrap_or_default();
    let first = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    let name = match (method, first) {
        ("GET", "") => "instance_info".to_string(),
        ("GET", "version") => "vmm_version".to_string(),
        (_, "machine-config") => "machine_cfg".to_string(),
        (_, "cpu-config") => "cpu_cfg".to_string(),
        (_, "boot-source") => "boot_source".to_string(),
        (_, "drives") => "drive".to_string(),
        (_, "network-interfaces") => "network".to_string(),
        _ => {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            if segments.is_empty() || segments.len() > 2 || segments.iter().any(|s| s.len() > 32) {
                return None;
            }
            segments.join("_").replace('-', "_")
        }
    };
    Some((group, name))
}

/// The VMM thread's end of the API: requests, and the eventfd that signals them.
pub struct ApiChannel {
    /// Incoming requests.
    pub requests: Receiver<VmmRequest>,
    /// Readable when requests are waiting.
    pub wake: EventFd,
    /// Where the VMM thread publishes its lifecycle state.
    pub status: Arc<InstanceStatus>,
    /// The API server's request counts, for the metrics.
    pub counts: Arc<Mutex<RequestCounts>>,
}

/// Starts the server thread on `listener`. Each request waits at most `timeout` for the
/// VMM thread.
pub fn start(
    listener: UnixListener,
    timeout: Duration,
) -> Result<(ApiChannel, JoinHandle<()>), ServerError> {
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ServerError::Start(e.to_string()))?;
    let thread_wake = wake
        .try_clone()
        .map_err(|e| ServerError::Start(e.to_string()))?;
    let status = Arc::new(InstanceStatus::default());
    let counts = Arc::new(Mutex::new(RequestCounts::default()));
    let (tx, rx) = mpsc::channel();
    let answered =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ServerError::Start(e.to_string()))?);
    let serving = Serving {
        vmm: tx,
        wake: thread_wake,
        answered,
        status: status.clone(),
        timeout,
        counts: counts.clone(),
    };
    let handle = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            seccomp::apply(seccomp::Thread::Api);
            serving.run(&listener)
        })
        .map_err(|e| ServerError::Start(e.to_string()))?;
    Ok((
        ApiChannel {
            requests: rx,
            wake,
            status,
            counts,
        },
        handle,
    ))
}

/// The API thread's state.
struct Serving {
    vmm: Sender<VmmRequest>,
    wake: EventFd,
    /// Written by the VMM thread after each answer.
    answered: Arc<EventFd>,
    status: Arc<InstanceStatus>,
    timeout: Duration,
    counts: Arc<Mutex<RequestCounts>>,
}

/// What `handle` makes of a request: answered on this thread, or sent to the VMM thread.
enum Handled {
    Now(Result<VmmData, ApiError>),
    /// The VMM thread's answer comes on `answer`; 503 after `deadline`, if any.
    Later {
        answer: Receiver<VmmResult>,
        deadline: Option<Instant>,
    },
}

fn response(result: Result<VmmData, ApiError>) -> Response {
    match result {
        Ok(VmmData::Empty) => Response {
            status: 204,
            body: None,
        },
        Ok(VmmData::Json(v)) => Response {
            status: 200,
            body: Some(v.to_string()),
        },
        Err(e) => Response {
            status: e.status,
            body: Some(serde_json::json!({ "fault_message": e.message }).to_string()),
        },
    }
}

fn stopped() -> ApiError {
    ApiError {
        status: 503,
        message: "the VMM has stopped".into(),
    }
}

impl Serving {
    fn run(self, listener: &UnixListener) {
        crate::http::serve(listener, Some(&self.answered), |request| {
            let start = Instant::now();
            let (method, url) = (request.method, request.path);
            let handled = self.handle(&method, &url, &request.body);
            let counts = self.counts.clone();
            // Counted and logged when the answer is out, however long it took.
            let done = move |result: Result<VmmData, ApiError>| {
                let response = response(result);
                let status = response.status;
                counts
                    .lock()
                    .expect("poisoned")
                    .count(&method, &url, status);
                let duration_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                tracing::info!(method, url, status, duration_us, "api request");
                response
            };
            match handled {
                Handled::Now(result) => Answer::Now(done(result)),
                Handled::Later { answer, deadline } => {
                    let timeout_ms = self.timeout.as_millis();
                    Answer::Later(
                        Box::new(move || {
                            let result = match answer.try_recv() {
                                Ok(result) => result,
                                Err(TryRecvError::Empty) => {
                                    if deadline.is_none_or(|d| Instant::now() < d) {
                                        return None;
                                    }
                                    Err(ApiError {
                                    status: 503,
                                    message: format!(
                                        "the VMM did not answer within {timeout_ms} ms; the request may still take effect"
                                    ),
                                })
                                }
                                Err(TryRecvError::Disconnected) => Err(stopped()),
                            };
                            Some(done(result))
                        }),
                        deadline,
                    )
                }
            }
        });
    }

    fn handle(&self, method: &str, url: &str, body: &[u8]) -> Handled {
        let parsed = match routes::parse(method, url, body) {
            Ok(p) => p,
            Err(e) => return Handled::Now(Err(e)),
        };
        let action = match parsed {
            Parsed::Version => {
                return Handled::Now(Ok(VmmData::Json(serde_json::json!({
                    "firecracker_version": FIRECRACKER_API_VERSION,
                    "ferry_version": env!("CARGO_PKG_VERSION"),
                }))))
            }
            Parsed::InstanceInfo => {
                return Handled::Now(Ok(VmmData::Json(self.status.instance_info())))
            }
            Parsed::Vmm(action) => action,
        };
        // A live snapshot answers when its files are complete, however long that takes;
        // GET /snapshot reports its progress meanwhile.
        let live = matches!(
            &action,
            crate::action::VmmAction::CreateSnapshot(p)
                if p.snapshot_type == Some(crate::models::SnapshotType::Live)
        );
        let (tx, answer) = mpsc::channel();
        let reply = Reply::new(tx, Some(self.answered.clone()));
        if self.vmm.send(VmmRequest { action, reply }).is_err() || self.wake.write(1).is_err() {
            return Handled::Now(Err(stopped()));
        }
        Handled::Later {
            answer,
            deadline: (!live).then(|| Instant::now() + self.timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ferry-api-{}-{name}", std::process::id()))
    }

    #[test]
    fn test_socket_is_0600_and_stale_socket_is_replaced() {
        let path = temp_path("stale.sock");
        let _ = std::fs::remove_file(&path);
        drop(bind(&path).expect("first bind"));
        // The listener is gone but the file stays: a stale socket.
        let listener = bind(&path).expect("stale socket replaced");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live socket is not taken over.
        let err = bind(&path).expect_err("live socket");
        assert!(matches!(err, ServerError::InUse(_)), "{err}");
        drop(listener);
        std::fs::remove_file(&path).ok();
    }

    /// 32 connections are served at once; one more is told why it is refused and
    /// closed, and a slot freed by a client that leaves is taken by the next.
    #[test]
    fn test_connections_are_bounded() {
        use std::io::Read;
        let path = temp_path("bound.sock");
        let _ = std::fs::remove_file(&path);
        let listener = bind(&path).expect("bind");
        let (_channel, _thread) = start(listener, Duration::from_secs(1)).expect("start");
        let mut clients: Vec<crate::client::Client> = (0..MAX_CONNECTIONS)
            .map(|_| crate::client::Client::connect(&path).expect("connect"))
            .collect();
        for round in 0..3 {
            for c in &mut clients {
                let r = c.request("GET", "/", None).expect("answered");
                assert_eq!(r.status, 200, "round {round}: {}", r.text());
            }
        }
        let mut refused = String::new();
        UnixStream::connect(&path)
            .expect("connect")
            .read_to_string(&mut refused)
            .expect("read the refusal");
        assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
        assert!(
            refused.ends_with(r#"{"fault_message":"too many connections: 32 are open"}"#),
            "{refused}"
        );
        drop(clients.pop());
        let mut next = crate::client::Client::connect(&path).expect("connect");
        assert_eq!(
            next.request("GET", "/", None).expect("answered").status,
            200
        );
        for c in &mut clients {
            assert_eq!(c.request("GET", "/", None).expect("answered").status, 200);
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn test_regular_file_is_not_deleted() {
        let path = temp_path("file");
        std::fs::write(&path, b"precious").expect("write");
        assert!(matches!(bind(&path), Err(ServerError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
        std::fs::remove_file(&path).ok();
    }
}
