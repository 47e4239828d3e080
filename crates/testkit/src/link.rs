//! A streaming TCP proxy in front of a loopback server: it counts the bytes the server sends,
//! and on demand caps each connection's server-to-client rate, delays every chunk each way,
//! corrupts large reads, or goes down (drops new connections and cuts open ones).

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The proxy; stopped when dropped.
#[derive(Debug)]
pub struct Link {
    /// The port it listens on (loopback).
    pub port: u16,
    /// Bytes the server sent through it.
    pub served: Arc<AtomicU64>,
    /// When set, one byte in the middle of every server-to-client read of 32 KiB or more is
    /// flipped (past any response header, inside blob bodies).
    pub corrupt: Arc<AtomicBool>,
    /// When set, new connections are dropped at once and open ones are cut.
    pub down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// How one direction of a connection is shaped.
#[derive(Clone)]
struct Shape {
    latency: Duration,
    rate: Option<u64>,
    served: Option<Arc<AtomicU64>>,
    corrupt: Option<Arc<AtomicBool>>,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Shape {
    fn cut(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.down.load(Ordering::Relaxed)
    }
}

/// Copies `from` to `to` through a bounded queue: a full queue stops the reader, as a full TCP
/// window would. Each chunk leaves `latency` after it arrived, no faster than `rate`.
fn pipe(mut from: TcpStream, mut to: TcpStream, shape: Shape) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(256);
    let reader_shape = shape.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while !reader_shape.cut() {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut chunk = buf[..n].to_vec();
                    if n >= 32 * 1024
                        && reader_shape
                            .corrupt
                            .as_ref()
                            .is_some_and(|c| c.load(Ordering::Relaxed))
                    {
                        chunk[n / 2] ^= 0xff;
                    }
                    if tx
                        .send((Instant::now() + reader_shape.latency, chunk))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut sent = 0u64;
        for (due, chunk) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if let Some(rate) = shape.rate {
                let allowed_at = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = allowed_at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            if shape.cut() || to.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
            if let Some(served) = &shape.served {
                served.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        // A cut closes both ways; a normal end passes the half-close on.
        let how = if shape.cut() {
            Shutdown::Both
        } else {
            Shutdown::Write
        };
        let _ = to.shutdown(how);
    });
}

impl Link {
    /// A proxy to loopback `upstream_port`; `bytes_per_sec` caps each connection when given.
    pub fn start(upstream_port: u16, bytes_per_sec: Option<u64>) -> Link {
        Link::slow(upstream_port, Duration::ZERO, bytes_per_sec)
    }

    /// Like [`Link::start`], every chunk also delayed by `latency` in each direction.
    pub fn slow(upstream_port: u16, latency: Duration, bytes_per_sec: Option<u64>) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let link = Link {
            port,
            served: Arc::new(AtomicU64::new(0)),
            corrupt: Arc::new(AtomicBool::new(false)),
            down: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let up = Shape {
            latency,
            rate: None,
            served: None,
            corrupt: None,
            down: link.down.clone(),
            stop: link.stop.clone(),
        };
        let back = Shape {
            rate: bytes_per_sec,
            served: Some(link.served.clone()),
            corrupt: Some(link.corrupt.clone()),
            ..up.clone()
        };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if up.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                if up.down.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                pipe(client, upstream, up.clone());
                pipe(u2, c2, back.clone());
            }
        });
        link
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes the server sent through the link so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
