//! HTTP/1.1 over a Unix socket, on one thread: at most `MAX_CONNECTIONS` keep-alive
//! connections, watched with `poll`, each request parsed with httparse and answered in
//! order. A web framework would bring a runtime and a thread per connection or a pool;
//! the API needs neither, and this bounds both threads and memory.
//!
//! Every length is bounded: a request head at most `MAX_HEAD` bytes, a body at most
//! `max_body()` (`--http-api-max-payload-size`, as `Content-Length`; chunked bodies are refused), an answer waiting for a
//! slow reader at most one response per connection (nothing more is read from it until
//! the answer is out). A connection that is closing shuts its sending side and discards
//! at most `MAX_LINGER` more bytes until the client closes, so a client refused while
//! still sending reads why.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::action::ApiError;

/// Largest request body accepted unless `set_max_body` says otherwise: Firecracker's
/// default for `--http-api-max-payload-size`.
pub const MAX_BODY: usize = 51_200;
/// The limit in force; set once at start, before the server thread runs.
static BODY_LIMIT: AtomicUsize = AtomicUsize::new(MAX_BODY);

/// Sets the largest request body accepted (`--http-api-max-payload-size`).
pub fn set_max_body(bytes: usize) {
    BODY_LIMIT.store(bytes, Ordering::Relaxed);
}

/// The largest request body accepted.
pub fn max_body() -> usize {
    BODY_LIMIT.load(Ordering::Relaxed)
}
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once. One more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// Bytes discarded from a connection after its last answer, before it is closed.
const MAX_LINGER: usize = 1024 * 1024;

/// A complete request.
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, with any query string.
    pub path: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// What the handler gives back for a request.
pub enum Answer {
    /// The response, now.
    Now(Response),
    /// Asked again, without blocking, until it gives the response; meanwhile the server
    /// serves its other connections (this one takes nothing more until answered). It is
    /// asked again by the deadline, if one is given, however quiet the server is.
    Later(Box<dyn FnMut() -> Option<Response>>, Option<Instant>),
}

/// An answer: the status and a JSON body, if any.
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// JSON text, absent for 204.
    pub body: Option<String>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn encode(response: &Response, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    if close {
        out.push_str("Connection: close\r\n");
    }
    match &response.body {
        Some(body) => {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        }
        None => out.push_str("\r\n"),
    }
    out.into_bytes()
}

fn fault(status: u16, message: impl Into<String>) -> Response {
    Response {
        status,
        body: Some(serde_json::json!({ "fault_message": message.into() }).to_string()),
    }
}

/// What the bytes read so far hold.
enum Parse {
    /// Not a whole request yet; `continue_` when the client waits for `100 Continue`.
    Partial { continue_: bool },
    /// A request, the bytes it took, and whether the client keeps the connection.
    Done(Request, usize, bool),
    /// A request that is refused without reading it all; the connection then closes.
    Refuse(ApiError),
}

fn parse(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parse::Refuse(ApiError::bad_request(format!(
                "the request head is over {MAX_HEAD} bytes"
            )))
        }
        Ok(httparse::Status::Partial) => return Parse::Partial { continue_: false },
        Err(e) => {
            return Parse::Refuse(ApiError::bad_request(format!(
                "malformed HTTP request: {e}"
            )))
        }
    };
    let mut length = 0usize;
    let mut expect_continue = false;
    let mut keep_alive = req.version == Some(1);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => length = n,
                Err(_) => {
                    return Parse::Refuse(ApiError::bad_request(format!(
                        "Content-Length \"{value}\" is not a number"
                    )))
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Refuse(ApiError::bad_request(
                "chunked request bodies are not supported: send Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if h.name.eq_ignore_ascii_case("connection") {
            keep_alive = if value.eq_ignore_ascii_case("close") {
                false
            } else {
                keep_alive || value.eq_ignore_ascii_case("keep-alive")
            };
        }
    }
    let limit = max_body();
    if length > limit {
        return Parse::Refuse(ApiError::bad_request(format!(
            "the body is {length} bytes; the limit is {limit}"
        )));
    }
    if buf.len() < head_len + length {
        return Parse::Partial {
            continue_: expect_continue,
        };
    }
    let request = Request {
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        body: buf[head_len..head_len + length].to_vec(),
    };
    Parse::Done(request, head_len + length, keep_alive)
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// `100 Continue` was sent for the request being read.
    continued: bool,
    /// Close once `output` is written.
    closing: bool,
    /// Bytes discarded since the last answer was written and our side shut down.
    /// `None` until then.
    lingering: Option<usize>,
    /// The answer to the request being served, when it comes later.
    later: Option<Box<dyn FnMut() -> Option<Response>>>,
    /// When `later` must be asked again at the latest.
    later_by: Option<Instant>,
}

impl Conn {
    /// Reads what the socket has; false when the client has gone.
    fn read(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    // Never more than one request's worth: the rest waits in the socket.
                    if self.input.len() > MAX_HEAD + max_body() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Writes what it can; false when the client has gone.
    fn write(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// After the last answer: shuts our side and discards what the client still sends,
    /// so that a client still sending a refused body reads its answer rather than a
    /// reset (a Unix socket closed with unread data resets its peer). False once the
    /// client has closed too, or sent more than `MAX_LINGER`.
    fn linger(&mut self) -> bool {
        let Some(discarded) = self.lingering.as_mut() else {
            self.lingering = Some(0);
            return self.stream.shutdown(std::net::Shutdown::Write).is_ok();
        };
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    *discarded += n;
                    if *discarded > MAX_LINGER {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Takes the answer that was to come later, if it has.
    fn poll_later(&mut self) {
        if self.later_by.is_some_and(|by| Instant::now() >= by) {
            // Asked at its deadline: from now on only a wake-up or the timed look
            // asks again, so that one that never answers cannot spin the loop.
            self.later_by = None;
        }
        if let Some(response) = self.later.as_mut().and_then(|f| f()) {
            self.later = None;
            self.output = encode(&response, self.closing);
        }
    }

    /// Answers every complete request in `input`, in order, with `handle`.
    fn serve(&mut self, handle: &mut impl FnMut(Request) -> Answer) {
        while self.output.is_empty() && !self.closing && self.later.is_none() {
            match parse(&self.input) {
                Parse::Partial { continue_ } => {
                    if continue_ && !self.continued {
                        self.continued = true;
                        self.output
                            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    return;
                }
                Parse::Done(request, used, keep_alive) => {
                    self.input.drain(..used);
                    self.continued = false;
                    self.closing = !keep_alive;
                    match handle(request) {
                        Answer::Now(response) => self.output = encode(&response, self.closing),
                        Answer::Later(f, by) => {
                            self.later = Some(f);
                            self.later_by = by;
                            self.poll_later();
                        }
                    }
                }
                Parse::Refuse(e) => {
                    self.closing = true;
                    self.output = encode(&fault(e.status, e.message), true);
                }
            }
        }
    }
}

/// How often answers that come later are looked for, when nothing says they came.
const LATER_POLL_MS: libc::c_int = 2;
/// How often they are looked for, at most, when `answered` says they came: a deadline
/// that falls sooner is looked at when it is due.
const LATER_DEADLINE_POLL_MS: libc::c_int = 50;

/// Serves `listener` forever on this thread, answering each request with `handle`.
/// `answered`, if given, becomes readable when an answer that comes later is there; it
/// must be non-blocking (the loop reads it whether or not it was written).
pub fn serve(
    listener: &UnixListener,
    answered: Option<&EventFd>,
    mut handle: impl FnMut(Request) -> Answer,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!("API socket: cannot make it non-blocking: {e}");
        return;
    }
    let mut conns: Vec<Conn> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .chain(conns.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: if c.later.is_some() {
                0
            } else if c.output.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLOUT
            },
            revents: 0,
        }))
        .chain(answered.map(|a| libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }))
        .collect();
        // At most MAX_CONNECTIONS + 2 entries.
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        let timeout = match (conns.iter().any(|c| c.later.is_some()), answered) {
            (false, _) => -1,
            (true, None) => LATER_POLL_MS,
            (true, Some(_)) => conns
                .iter()
                .filter(|c| c.later.is_some())
                .filter_map(|c| c.later_by)
                .min()
                .map_or(LATER_DEADLINE_POLL_MS, |by| {
                    let us = by.saturating_duration_since(Instant::now()).as_micros();
                    libc::c_int::try_from(us.div_ceil(1000))
                        .unwrap_or(LATER_DEADLINE_POLL_MS)
                        .min(LATER_DEADLINE_POLL_MS)
                }),
        };
        // SAFETY: `fds` is a valid array of `nfds` pollfds that lives across the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("API socket: poll failed: {e}");
                return;
            }
            continue;
        }
        // Before answers are looked at, so that one sent after this read wakes the
        // next poll.
        if let Some(a) = answered {
            let _ = a.read();
        }
        // Connections first: `fds[i + 1]` is `conns[i]`, and accepting appends.
        let mut keep = Vec::with_capacity(conns.len());
        for (conn, fd) in conns.iter_mut().zip(&fds[1..]) {
            if conn.lingering.is_some() {
                keep.push(fd.revents == 0 || conn.linger());
                continue;
            }
            let mut alive = true;
            if conn.later.is_some() {
                conn.poll_later();
                // A client that left drops its answer.
                alive = fd.revents & (libc::POLLHUP | libc::POLLERR) == 0;
            } else if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && conn.output.is_empty()
            {
                alive = conn.read();
                if alive {
                    conn.serve(&mut handle);
                }
            }
            if alive && !conn.output.is_empty() {
                alive = conn.write();
                if alive && conn.output.is_empty() {
                    // A slow reader may have held back requests it already sent.
                    conn.serve(&mut handle);
                    alive = conn.write();
                }
            }
            if alive && conn.closing && conn.output.is_empty() && conn.later.is_none() {
                alive = conn.linger();
            }
            keep.push(alive);
        }
        let mut i = 0;
        conns.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        if fds[0].revents & libc::POLLIN != 0 {
            accept(listener, &mut conns);
        }
    }
}

fn accept(listener: &UnixListener, conns: &mut Vec<Conn>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if conns.len() >= MAX_CONNECTIONS {
                    // Told why, then closed; best effort, the socket buffer is empty.
                    let refusal = fault(
                        503,
                        format!("too many connections: {MAX_CONNECTIONS} are open"),
                    );
                    let _ = (&stream).write(&encode(&refusal, true));
                    // Back to poll before accepting more: clients that left meanwhile
                    // are noticed first, and their places given to the next ones.
                    return;
                }
                conns.push(Conn {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    continued: false,
                    closing: false,
                    lingering: None,
                    later: None,
                    later_by: None,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Parse {
        parse(text.as_bytes())
    }

    #[test]
    fn test_parses_a_request_with_a_body_and_keep_alive() {
        let Parse::Done(r, used, keep) =
            parsed("PUT /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET")
        else {
            panic!("complete")
        };
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), &r.body[..]),
            ("PUT", "/vm", &b"{}"[..])
        );
        assert_eq!(used, 41);
        assert!(keep);
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Parse::Done(_, _, false)
        ));
        assert!(matches!(
            parsed("GET / HTTP/1.0\r\n\r\n"),
            Parse::Done(_, _, false)
        ));
    }

    #[test]
    fn test_partial_and_continue() {
        assert!(matches!(
            parsed("PUT / HTTP/1.1\r\nContent-Len"),
            Parse::Partial { continue_: false }
        ));
        assert!(matches!(
            parsed("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
            Parse::Partial { continue_: true }
        ));
    }

    #[test]
    fn test_refuses_what_it_will_not_read() {
        let refused = |text: &str| match parsed(text) {
            Parse::Refuse(e) => e.message,
            _ => panic!("{text:?} must be refused"),
        };
        assert_eq!(
            refused("PUT / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n"),
            "the body is 70000 bytes; the limit is 51200"
        );
        assert!(
            refused("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .starts_with("chunked request bodies are not supported")
        );
        assert!(refused("PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n").contains("not a number"));
        assert!(refused("\x01\x02 garbage\r\n\r\n").starts_with("malformed HTTP request"));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 1));
        assert!(refused(&long).contains("over 16384 bytes"));
    }

    /// A client still sending a body too large to take reads the refusal, not a reset.
    #[test]
    fn test_a_refused_body_still_being_sent_gets_its_answer() {
        let dir = std::env::temp_dir().join(format!("ferry-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            serve(&listener, None, |_| {
                Answer::Now(Response {
                    status: 204,
                    body: None,
                })
            })
        });
        let mut client = UnixStream::connect(&path).expect("connect");
        let body = vec![b'x'; MAX_BODY + 4096];
        write!(
            client,
            "PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .expect("head");
        // The server refuses on the head and answers; the client is still sending.
        std::thread::sleep(std::time::Duration::from_millis(100));
        client
            .write_all(&body)
            .expect("the body is taken, then discarded");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut answer = String::new();
        client.read_to_string(&mut answer).expect("the answer");
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("the limit is 51200"), "{answer}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An answer that comes later reaches a client that asked to close after it, and
    /// one that keeps its connection alive, in order.
    #[test]
    fn test_a_later_answer_reaches_closing_and_keep_alive_clients() {
        let dir = std::env::temp_dir().join(format!("ferry-http-later-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            serve(&listener, None, |request| {
                let started = std::time::Instant::now();
                let path = request.path;
                Answer::Later(
                    Box::new(move || {
                        (started.elapsed() > std::time::Duration::from_millis(20)).then(|| {
                            Response {
                                status: 200,
                                body: Some(format!("\"{path}\"")),
                            }
                        })
                    }),
                    None,
                )
            })
        });
        let mut closing = UnixStream::connect(&path).expect("connect");
        closing
            .write_all(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut answer = String::new();
        closing.read_to_string(&mut answer).expect("the answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("\"/a\""), "{answer:?}");
        // Two pipelined requests on a keep-alive connection, answered in order.
        let mut alive = UnixStream::connect(&path).expect("connect");
        alive
            .write_all(b"GET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut answer = String::new();
        alive.read_to_string(&mut answer).expect("the answers");
        let (b, c) = (answer.find("\"/b\""), answer.find("\"/c\""));
        assert!(b.is_some() && c.is_some() && b < c, "{answer:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An answer that comes later goes out when `answered` says it is there, not at
    /// the next timed look (every `LATER_DEADLINE_POLL_MS`).
    #[test]
    fn test_a_later_answer_goes_out_when_announced() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        let dir = std::env::temp_dir().join(format!("ferry-http-wake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let answered = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let ready = Arc::new(AtomicBool::new(false));
        let (server_answered, server_ready) = (answered.clone(), ready.clone());
        std::thread::spawn(move || {
            serve(&listener, Some(&server_answered), |_| {
                let ready = server_ready.clone();
                Answer::Later(
                    Box::new(move || {
                        ready.swap(false, Ordering::AcqRel).then_some(Response {
                            status: 204,
                            body: None,
                        })
                    }),
                    None,
                )
            })
        });
        let mut client = UnixStream::connect(&path).expect("connect");
        let rounds = 5;
        let started = Instant::now();
        for _ in 0..rounds {
            client
                .write_all(b"PATCH /vm HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .expect("send");
            // The server is waiting on its answer by now, or takes it at once.
            std::thread::sleep(Duration::from_millis(1));
            ready.store(true, Ordering::Release);
            answered.write(1).expect("announce");
            let mut head = [0u8; 64];
            let n = client.read(&mut head).expect("the answer");
            assert!(head[..n].starts_with(b"HTTP/1.1 204"), "{:?}", &head[..n]);
        }
        // Without the announcement each answer waits for a timed look: at least
        // `rounds` x 50 ms.
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(LATER_DEADLINE_POLL_MS as u64 * rounds as u64 * 4 / 5),
            "{rounds} announced answers took {took:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
