//! A fault-injecting HTTP proxy in front of the real registry, scriptable per request: each rule
//! matches a method and a path fragment, applies to its next `times` requests, and then stops.
//! Each client connection carries one request (the proxy answers `Connection: close`), so a
//! fault hits exactly the request it was meant for.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a request or its response.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Send this many bytes of the response, then reset the connection.
    ResetAfter(usize),
    /// Wait this long, then answer normally.
    Stall(Duration),
    /// Keep the real `Content-Length` but send only this many body bytes, then close.
    Truncate(usize),
    /// Flip the body byte at this offset (if the body is that long).
    FlipByte(usize),
    /// Answer with this status and a registry-style error body.
    Status(u16),
    /// Answer 429 with `Retry-After` in seconds.
    TooMany(u64),
    /// Drop the `Range` header, so the registry sends the whole blob with 200.
    IgnoreRange,
    /// Send a `Content-Length` off by this much (the body unchanged), then close.
    WrongLength(i64),
    /// Answer 307 to the same path on the registry itself.
    Redirect,
    /// Close the connection without answering.
    Drop,
}

/// When a fault applies.
#[derive(Debug, Clone)]
pub struct Rule {
    /// HTTP method, or any.
    pub method: Option<&'static str>,
    /// A fragment the request path must contain.
    pub path: String,
    /// How many matching requests it still applies to.
    pub times: usize,
    /// What to do.
    pub fault: Fault,
}

impl Rule {
    /// A rule for the next `times` requests with `method` whose path contains `path`.
    pub fn new(method: Option<&'static str>, path: &str, times: usize, fault: Fault) -> Rule {
        Rule {
            method,
            path: path.to_owned(),
            times,
            fault,
        }
    }
}

/// The proxy; stopped when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    /// The port it listens on (loopback).
    pub port: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    applied: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    upstream: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    applied: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    /// Starts a proxy to the registry on `upstream` (loopback).
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let rules = Arc::new(Mutex::new(Vec::new()));
        let applied = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            upstream,
            rules: rules.clone(),
            applied: applied.clone(),
            requests: requests.clone(),
        });
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, &shared);
                });
            }
        });
        FaultProxy {
            port,
            rules,
            applied,
            requests,
            stop,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Adds a rule (rules are tried in the order added).
    pub fn add(&self, rule: Rule) {
        self.rules.lock().expect("rules").push(rule);
    }

    /// Removes every rule: the proxy passes everything through.
    pub fn clear(&self) {
        self.rules.lock().expect("rules").clear();
    }

    /// How many faults were applied so far.
    pub fn applied(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    /// Rules with uses left.
    pub fn pending(&self) -> Vec<Rule> {
        self.rules
            .lock()
            .expect("rules")
            .iter()
            .filter(|r| r.times > 0)
            .cloned()
            .collect()
    }

    /// Every request seen, as "METHOD PATH".
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A parsed HTTP head.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn set(&mut self, name: &str, value: String) {
        self.remove(name);
        self.headers.push((name.to_owned(), value));
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if reader.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some(Head {
        first: first.trim_end().to_owned(),
        headers,
    }))
}

/// Reads a body framed by `Content-Length` or chunked encoding; returns it de-chunked.
fn read_body(reader: &mut BufReader<TcpStream>, head: &Head) -> std::io::Result<Vec<u8>> {
    if head
        .get("Transfer-Encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if size == 0 {
                let mut trailer = String::new();
                while reader.read_line(&mut trailer)? > 2 {
                    trailer.clear();
                }
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    }
    let len: usize = head
        .get("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn take_rule(shared: &Shared, method: &str, path: &str) -> Option<Fault> {
    let mut rules = shared.rules.lock().ok()?;
    let rule = rules
        .iter_mut()
        .find(|r| r.times > 0 && r.method.is_none_or(|m| m == method) && path.contains(&r.path))?;
    rule.times -= 1;
    shared.applied.fetch_add(1, Ordering::SeqCst);
    Some(rule.fault.clone())
}

/// Resets the connection (SO_LINGER 0, then close).
fn reset(stream: TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
    drop(stream);
}

fn respond(mut client: TcpStream, status: u16, extra: &[(&str, String)], body: &[u8]) {
    let mut head = Head {
        first: format!("HTTP/1.1 {status} Fault"),
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            ("Content-Length".into(), body.len().to_string()),
            ("Connection".into(), "close".into()),
        ],
    };
    for (k, v) in extra {
        head.set(k, v.clone());
    }
    let _ = client.write_all(&head.bytes());
    let _ = client.write_all(body);
    let _ = client.shutdown(Shutdown::Both);
}

fn serve(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let Some(mut request) = read_head(&mut reader)? else {
        return Ok(());
    };
    let body = read_body(&mut reader, &request)?;
    let mut parts = request.first.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    if let Ok(mut log) = shared.requests.lock() {
        log.push(format!("{method} {path}"));
    }
    let fault = take_rule(shared, &method, &path);
    match &fault {
        Some(Fault::Drop) => {
            drop(client);
            return Ok(());
        }
        Some(Fault::Status(code)) => {
            let body = br#"{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}"#;
            respond(client, *code, &[], body);
            return Ok(());
        }
        Some(Fault::TooMany(secs)) => {
            let body = br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"injected fault"}]}"#;
            respond(client, 429, &[("Retry-After", secs.to_string())], body);
            return Ok(());
        }
        Some(Fault::Redirect) => {
            let location = format!("http://127.0.0.1:{}{path}", shared.upstream);
            respond(client, 307, &[("Location", location)], b"");
            return Ok(());
        }
        Some(Fault::Stall(t)) => std::thread::sleep(*t),
        Some(Fault::IgnoreRange) => request.remove("Range"),
        _ => {}
    }
    // Forward, one request per upstream connection.
    let mut upstream = TcpStream::connect(("127.0.0.1", shared.upstream))?;
    request.remove("Transfer-Encoding");
    request.set("Content-Length", body.len().to_string());
    request.set("Connection", "close".into());
    if (method == "GET" || method == "HEAD" || method == "DELETE") && body.is_empty() {
        request.remove("Content-Length");
    }
    upstream.write_all(&request.bytes())?;
    upstream.write_all(&body)?;
    let mut up_reader = BufReader::new(upstream);
    let Some(mut response) = read_head(&mut up_reader)? else {
        return Ok(());
    };
    let mut response_body = if method == "HEAD" {
        Vec::new()
    } else if response.get("Content-Length").is_some()
        || response
            .get("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        read_body(&mut up_reader, &response)?
    } else {
        let mut rest = Vec::new();
        up_reader.read_to_end(&mut rest)?;
        rest
    };
    response.remove("Transfer-Encoding");
    if method != "HEAD" {
        response.set("Content-Length", response_body.len().to_string());
    }
    response.set("Connection", "close".into());
    let mut client = client;
    match fault {
        Some(Fault::FlipByte(at)) => {
            if let Some(b) = response_body.get_mut(at) {
                *b ^= 0xff;
            }
        }
        Some(Fault::WrongLength(delta)) => {
            let wrong = (response_body.len() as i64 + delta).max(0);
            response.set("Content-Length", wrong.to_string());
        }
        Some(Fault::Truncate(keep)) => {
            client.write_all(&response.bytes())?;
            client.write_all(&response_body[..keep.min(response_body.len())])?;
            client.shutdown(Shutdown::Both)?;
            return Ok(());
        }
        Some(Fault::ResetAfter(n)) => {
            let mut all = response.bytes();
            all.extend_from_slice(&response_body);
            client.write_all(&all[..n.min(all.len())])?;
            client.flush()?;
            reset(client);
            return Ok(());
        }
        _ => {}
    }
    client.write_all(&response.bytes())?;
    client.write_all(&response_body)?;
    client.flush()?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}
