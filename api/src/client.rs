//! A small HTTP/1.1 client over a Unix socket, for `ferryctl`, tests and benchmarks.
//! Responses are parsed with httparse; the connection is kept alive between requests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Why a request failed (as opposed to being answered with an error status).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or broke.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server's answer is not HTTP ferry understands.
    #[error("bad response: {0}")]
    BadResponse(String),
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A keep-alive connection to the API socket.
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

const MAX_RESPONSE: usize = 16 << 20;

impl Client {
    /// Connects to the socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, ClientError> {
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes())?;
        self.stream.write_all(body.as_bytes())?;
        self.read_response()
    }

    fn read_response(&mut self) -> Result<Response, ClientError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed
                .parse(&self.buf)
                .map_err(|e| ClientError::BadResponse(e.to_string()))?
            {
                httparse::Status::Complete(head_len) => {
                    let status = parsed
                        .code
                        .ok_or_else(|| ClientError::BadResponse("no status".into()))?;
                    let mut length = 0usize;
                    for h in parsed.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .ok_or_else(|| {
                                    ClientError::BadResponse("bad Content-Length".into())
                                })?;
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(ClientError::BadResponse(
                                "chunked responses are not supported".into(),
                            ));
                        }
                    }
                    if length > MAX_RESPONSE {
                        return Err(ClientError::BadResponse(format!(
                            "a {length}-byte body is too large"
                        )));
                    }
                    self.fill(head_len + length)?;
                    let body = self.buf[head_len..head_len + length].to_vec();
                    self.buf.drain(..head_len + length);
                    return Ok(Response { status, body });
                }
                httparse::Status::Partial => {
                    let want = self.buf.len() + 1;
                    if want > MAX_RESPONSE {
                        return Err(ClientError::BadResponse(
                            "the response head is too large".into(),
                        ));
                    }
                    self.fill(want)?;
                }
            }
        }
    }

    /// Reads until the buffer holds at least `len` bytes.
    fn fill(&mut self, len: usize) -> Result<(), ClientError> {
        let mut chunk = [0u8; 8192];
        while self.buf.len() < len {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::BadResponse(
                    "the server closed the connection".into(),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}
