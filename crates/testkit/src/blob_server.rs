//! A small HTTP server on loopback that serves one blob for any GET and misbehaves on purpose,
//! request by request: it ignores `Range`, cuts bodies short, flips a byte, or answers a range
//! with the wrong headers or bytes. For unit tests of the code that reads blobs (registry
//! streams, the transfer engine, lazy chunks) without a registry.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How the server answers one GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Honour `Range` (206) or send the whole blob (200).
    Honest,
    /// Always the whole blob with 200, whatever `Range` says.
    IgnoreRange,
    /// Honour `Range`, but close the connection after this many body bytes.
    CutAfter(usize),
    /// Honour `Range`, with the byte at this offset of the blob flipped (if sent).
    FlipAt(usize),
    /// Answer a `Range` with 206 for the range moved this many bytes (earlier when negative);
    /// `Content-Range` and `Content-Length` describe what is sent.
    Shift(i64),
    /// Answer a `Range` with 206 and the range asked, but no `Content-Range` header.
    NoContentRange,
    /// Answer a `Range` with 206, `Content-Range` naming the range asked, but `Content-Length`
    /// and the body running on this many bytes past it.
    LongerBody(usize),
    /// Answer a `Range` with 206 for the range extended this many bytes past its end, headers
    /// saying so.
    PastTheEnd(usize),
    /// 200 with this many bytes whatever `Range` says: the blob cut there, or padded with zeros.
    WholeOfLength(usize),
}

/// The server; stopped when dropped.
#[derive(Debug)]
pub struct BlobServer {
    /// Its port on loopback.
    pub port: u16,
    requests: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// One parsed request head: the byte range asked for, if any.
fn read_request(reader: &mut BufReader<TcpStream>, len: usize) -> Option<Option<(usize, usize)>> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            return Some(range);
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.split_once('-').unwrap_or((v, ""));
            let start: usize = a.parse().unwrap_or(0);
            let end: usize = b.parse::<usize>().map_or(len, |e| e + 1);
            range = Some((start.min(len), end.min(len)));
        }
    }
}

impl BlobServer {
    /// Serves `blob`; the n-th request is answered as `script[n]` (the last entry repeats; an
    /// empty script is always honest).
    pub fn start(blob: Arc<Vec<u8>>, script: Vec<Answer>) -> BlobServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = BlobServer {
            port,
            requests: Arc::new(AtomicUsize::new(0)),
            served: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (requests, served, stop) = (
            server.requests.clone(),
            server.served.clone(),
            server.stop.clone(),
        );
        let script = Arc::new(Mutex::new(script));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                let (blob, script, requests, served) = (
                    blob.clone(),
                    script.clone(),
                    requests.clone(),
                    served.clone(),
                );
                std::thread::spawn(move || {
                    serve(stream, &blob, &script, &requests, &served);
                });
            }
        });
        server
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A reference whose registry is this server (any repository and tag serve the blob).
    pub fn reference(&self) -> String {
        format!("{}/test/blob:v1", self.host())
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Body bytes sent so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

fn serve(
    mut stream: TcpStream,
    blob: &[u8],
    script: &Mutex<Vec<Answer>>,
    requests: &AtomicUsize,
    served: &AtomicUsize,
) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    while let Some(range) = read_request(&mut reader, blob.len()) {
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let answer = script
            .lock()
            .ok()
            .and_then(|s| s.get(n.min(s.len().saturating_sub(1))).copied())
            .unwrap_or(Answer::Honest);
        let len = blob.len();
        let ignore = matches!(answer, Answer::IgnoreRange | Answer::WholeOfLength(_));
        let (partial, mut start, mut end) = match range {
            Some((a, b)) if !ignore => (true, a, b.max(a)),
            _ => (false, 0, len),
        };
        let mut content_range = partial;
        let mut extra = 0;
        match answer {
            Answer::Shift(k) if partial => {
                let moved = |at: usize| (at as i64 + k).clamp(0, len as i64) as usize;
                (start, end) = (moved(start), moved(end));
            }
            Answer::NoContentRange => content_range = false,
            Answer::LongerBody(k) if partial => extra = k.min(len - end),
            Answer::PastTheEnd(k) if partial => end = (end + k).min(len),
            _ => {}
        }
        let mut body = blob[start..end + extra].to_vec();
        if let Answer::WholeOfLength(n) = answer {
            body.resize(n, 0);
        }
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n",
            if partial {
                "206 Partial Content"
            } else {
                "200 OK"
            },
            body.len()
        );
        if content_range {
            head.push_str(&format!(
                "Content-Range: bytes {start}-{}/{len}\r\n",
                end.saturating_sub(1),
            ));
        }
        head.push_str("\r\n");
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        match answer {
            Answer::CutAfter(k) => {
                let k = k.min(body.len());
                let _ = stream.write_all(&body[..k]);
                served.fetch_add(k, Ordering::SeqCst);
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            Answer::FlipAt(at) if (start..end).contains(&at) => body[at - start] ^= 0xff,
            _ => {}
        }
        if stream.write_all(&body).is_err() {
            return;
        }
        served.fetch_add(body.len(), Ordering::SeqCst);
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
