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
use crate::action::{ApiError, InstanceStatus, VmmData, VmmRequest};
use crate::http::{Answer, Response};
use crate::routes::{self, Parsed};

pub use crate::http::{MAX_BODY, MAX_CONNECTIONS};

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

/// Counts answered requests by status code.
#[derive(Default)]
struct StatusCounts(BTreeMap<u16, u64>);

impl StatusCounts {
    fn json(&self) -> serde_json::Value {
        let by_status: serde_json::Map<String, serde_json::Value> = self
            .0
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        serde_json::json!({ "requests_by_status": by_status, "requests": self.0.values().sum::<u64>() })
    }
}

/// The VMM thread's end of the API: requests, and the eventfd that signals them.
pub struct ApiChannel {
    /// Incoming requests.
    pub requests: Receiver<VmmRequest>,
    /// Readable when requests are waiting.
    pub wake: EventFd,
    /// Where the VMM thread publishes its lifecycle state.
    pub status: Arc<InstanceStatus>,
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
    let (tx, rx) = mpsc::channel();
    let serving = Serving {
        vmm: tx,
        wake: thread_wake,
        status: status.clone(),
        timeout,
        counts: Arc::default(),
    };
    let handle = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || serving.run(&listener))
        .map_err(|e| ServerError::Start(e.to_string()))?;
    Ok((
        ApiChannel {
            requests: rx,
            wake,
            status,
        },
        handle,
    ))
}

/// The API thread's state.
struct Serving {
    vmm: Sender<VmmRequest>,
    wake: EventFd,
    status: Arc<InstanceStatus>,
    timeout: Duration,
    counts: Arc<Mutex<StatusCounts>>,
}

/// What `handle` makes of a request: answered on this thread, or sent to the VMM thread.
enum Handled {
    Now(Result<VmmData, ApiError>),
    /// The VMM thread's answer comes on `answer`; 503 after `deadline`, if any.
    Later {
        answer: Receiver<VmmResult>,
        deadline: Option<Instant>,
        is_metrics: bool,
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
        crate::http::serve(listener, |request| {
            let start = Instant::now();
            let (method, url) = (request.method, request.path);
            let handled = self.handle(&method, &url, &request.body);
            let counts = self.counts.clone();
            // Counted and logged when the answer is out, however long it took.
            let done = move |result: Result<VmmData, ApiError>| {
                let response = response(result);
                let status = response.status;
                *counts
                    .lock()
                    .expect("poisoned")
                    .0
                    .entry(status)
                    .or_default() += 1;
                let duration_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                tracing::info!(method, url, status, duration_us, "api request");
                response
            };
            match handled {
                Handled::Now(result) => Answer::Now(done(result)),
                Handled::Later {
                    answer,
                    deadline,
                    is_metrics,
                } => {
                    let timeout_ms = self.timeout.as_millis();
                    let counts = self.counts.clone();
                    Answer::Later(Box::new(move || {
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
                        Some(done(match result {
                            // The API server's own counts belong in the metrics the VMM
                            // reports.
                            Ok(VmmData::Json(mut v)) if is_metrics => {
                                v["api_server"] = counts.lock().expect("poisoned").json();
                                Ok(VmmData::Json(v))
                            }
                            other => other,
                        }))
                    }))
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
                    "firecracker_version": env!("CARGO_PKG_VERSION"),
                    "ferry_version": env!("CARGO_PKG_VERSION"),
                }))))
            }
            Parsed::InstanceInfo => {
                return Handled::Now(Ok(VmmData::Json(self.status.instance_info())))
            }
            Parsed::Vmm(action) => action,
        };
        let is_metrics = action == crate::action::VmmAction::GetMetrics;
        // A live snapshot answers when its files are complete, however long that takes;
        // GET /snapshot reports its progress meanwhile.
        let live = matches!(
            &action,
            crate::action::VmmAction::CreateSnapshot(p)
                if p.snapshot_type == Some(crate::models::SnapshotType::Live)
        );
        let (reply, answer) = mpsc::channel();
        if self.vmm.send(VmmRequest { action, reply }).is_err() || self.wake.write(1).is_err() {
            return Handled::Now(Err(stopped()));
        }
        Handled::Later {
            answer,
            deadline: (!live).then(|| Instant::now() + self.timeout),
            is_metrics,
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
