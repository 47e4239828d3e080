//! FUSE connections that outlive the process serving them.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor open; the server
//! is whoever reads requests from it. When the server dies while a [`Holder`] keeps a duplicate
//! of the descriptor, the kernel keeps the connection: readers of the mount wait instead of
//! failing with ENOTCONN. A new server takes the descriptor back from the holder and adopts the
//! connection ([`crate::MountOptions::adopt`]): fuser gets the one INIT handshake it expects from
//! a socket pair (the kernel sends INIT only once per connection), the descriptor is then put
//! under fuser's own descriptor number, and the kernel is asked to send again every request the
//! dead server had read but not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9 and later).
//!
//! The holder is a tiny process ([`serve_holder`]) on a unix `SOCK_SEQPACKET` socket; each
//! descriptor travels with `SCM_RIGHTS` under a key (the mount point) and a [`SessionState`]
//! (what the first INIT negotiated and which mount the connection serves).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

/// The largest message: a command, a key (a path) and a state.
const MAX_MESSAGE: usize = 8192;
/// How long the holder waits for a client's next message, and a client for the holder's answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Protocol version, the first word of every request.
const PROTOCOL: &str = "modelpack-fuse-holder/1";

/// Errors of the handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The holder's socket could not be reached or answered wrongly.
    #[error("FUSE descriptor holder at {path}: {message}")]
    Holder {
        /// The holder's socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A recorded session state could not be read.
    #[error("bad FUSE session state {0:?}")]
    BadState(String),
}

/// What a FUSE connection's first INIT negotiated and which mount it serves: enough to adopt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionState {
    /// The mount's device number (`major:minor` in `/proc/self/mountinfo`): a connection is
    /// adopted only for the mount it serves.
    pub dev: (u32, u32),
    /// The kernel's FUSE ABI minor version (major 7).
    pub abi_minor: u32,
    /// The capability flags the kernel offered.
    pub capabilities: u64,
    /// The largest readahead the kernel offered.
    pub max_readahead: u32,
    /// The time given to entries that record none (nanoseconds since the epoch; 0: unknown),
    /// so that an adopted tree shows the same times.
    pub created_ns: u64,
    /// A fingerprint of the tree served (inode numbers, paths, kinds, sizes; 0: unknown): a
    /// successor adopts the connection only with the same tree, or the kernel's inode numbers
    /// would name other files.
    pub tree: u64,
}

impl SessionState {
    /// The one-line form the holder keeps.
    pub fn encode(&self) -> String {
        format!(
            "dev={}:{} abi=7.{} caps={:x} ra={} t={} tree={:x}",
            self.dev.0,
            self.dev.1,
            self.abi_minor,
            self.capabilities,
            self.max_readahead,
            self.created_ns,
            self.tree
        )
    }

    /// Reads [`SessionState::encode`]'s form.
    pub fn decode(text: &str) -> Result<SessionState, HandoverError> {
        let bad = || HandoverError::BadState(text.to_owned());
        let mut dev = None;
        let mut abi_minor = None;
        let mut capabilities = None;
        let mut max_readahead = None;
        let mut created_ns = 0;
        let mut tree = 0;
        for field in text.split_whitespace() {
            let (k, v) = field.split_once('=').ok_or_else(bad)?;
            match k {
                "dev" => {
                    let (a, b) = v.split_once(':').ok_or_else(bad)?;
                    dev = Some((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?));
                }
                "abi" => {
                    let minor = v.strip_prefix("7.").ok_or_else(bad)?;
                    abi_minor = Some(minor.parse().map_err(|_| bad())?);
                }
                "caps" => capabilities = Some(u64::from_str_radix(v, 16).map_err(|_| bad())?),
                "ra" => max_readahead = Some(v.parse().map_err(|_| bad())?),
                "t" => created_ns = v.parse().map_err(|_| bad())?,
                "tree" => tree = u64::from_str_radix(v, 16).map_err(|_| bad())?,
                _ => {}
            }
        }
        Ok(SessionState {
            dev: dev.ok_or_else(bad)?,
            abi_minor: abi_minor.ok_or_else(bad)?,
            capabilities: capabilities.ok_or_else(bad)?,
            max_readahead: max_readahead.ok_or_else(bad)?,
            created_ns,
            tree,
        })
    }
}

/// A FUSE connection to adopt: its `/dev/fuse` descriptor and how it was negotiated.
#[derive(Debug)]
pub struct Handover {
    /// The `/dev/fuse` descriptor.
    pub fd: OwnedFd,
    /// What its first INIT negotiated.
    pub state: SessionState,
}

/// One descriptor the holder keeps.
#[derive(Debug)]
pub struct Held {
    /// Its key (the daemon's mount point).
    pub key: String,
    /// Its state, as given.
    pub state: String,
    /// The descriptor.
    pub fd: OwnedFd,
}

/// A client of the descriptor holder at a socket.
#[derive(Debug, Clone)]
pub struct Holder {
    socket: PathBuf,
}

impl Holder {
    /// The holder listening at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Holder {
        Holder {
            socket: socket.into(),
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn error(&self, message: impl std::fmt::Display) -> HandoverError {
        HandoverError::Holder {
            path: self.socket.clone(),
            message: message.to_string(),
        }
    }

    fn connect(&self) -> Result<OwnedFd, HandoverError> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| self.error(e))?;
        let addr = SocketAddrUnix::new(&self.socket).map_err(|e| self.error(e))?;
        rustix::net::connect(&fd, &addr).map_err(|e| self.error(format!("cannot connect: {e}")))?;
        set_timeouts(&fd).map_err(|e| self.error(e))?;
        Ok(fd)
    }

    /// True when a holder answers at the socket.
    pub fn is_up(&self) -> bool {
        self.request(&["ping"], None).is_ok()
    }

    fn request(
        &self,
        words: &[&str],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<OwnedFd, HandoverError> {
        let conn = self.connect()?;
        send(&conn, &message(words), fd).map_err(|e| self.error(e))?;
        let (reply, _) = receive(&conn).map_err(|e| self.error(e))?;
        if reply != "ok" {
            return Err(self.error(format!("answered {reply:?}")));
        }
        Ok(conn)
    }

    /// Keeps a duplicate of `fd` under `key` (replacing one kept under it before).
    pub fn put(
        &self,
        key: &str,
        state: &SessionState,
        fd: BorrowedFd<'_>,
    ) -> Result<(), HandoverError> {
        self.request(&["put", key, &state.encode()], Some(fd))
            .map(drop)
    }

    /// Forgets (closes) the descriptor kept under `key`, if any.
    pub fn remove(&self, key: &str) -> Result<(), HandoverError> {
        self.request(&["remove", key], None).map(drop)
    }

    /// Duplicates of every descriptor kept (the holder keeps its own).
    pub fn list(&self) -> Result<Vec<Held>, HandoverError> {
        let conn = self.request(&["list"], None)?;
        let mut out = Vec::new();
        loop {
            let (text, fd) = receive(&conn).map_err(|e| self.error(e))?;
            let mut words = text.split('\n');
            match (words.next(), words.next(), words.next(), fd) {
                (Some("end"), ..) => return Ok(out),
                (Some("fd"), Some(key), Some(state), Some(fd)) => out.push(Held {
                    key: key.to_owned(),
                    state: state.to_owned(),
                    fd,
                }),
                _ => return Err(self.error(format!("sent {text:?}"))),
            }
        }
    }
}

fn message(words: &[&str]) -> String {
    let mut text = String::from(PROTOCOL);
    for w in words {
        text.push('\n');
        text.push_str(w);
    }
    text
}

fn set_timeouts(fd: &OwnedFd) -> std::io::Result<()> {
    rustix::net::sockopt::set_socket_timeout(
        fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(IO_TIMEOUT),
    )?;
    rustix::net::sockopt::set_socket_timeout(
        fd,
        rustix::net::sockopt::Timeout::Send,
        Some(IO_TIMEOUT),
    )?;
    Ok(())
}

fn send(conn: &OwnedFd, text: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    if text.len() > MAX_MESSAGE {
        return Err(std::io::Error::other("message too long"));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    rustix::net::sendmsg(
        conn,
        &[IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

fn receive(conn: &OwnedFd) -> std::io::Result<(String, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            // Keep the first; any other is closed as it drops.
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    if got.bytes == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let text = std::str::from_utf8(&buf[..got.bytes.min(buf.len())])
        .map_err(|_| std::io::Error::other("message is not UTF-8"))?;
    Ok((text.to_owned(), fd))
}

/// Serves as the descriptor holder at `socket`. Descriptors are kept in memory only: a holder
/// that dies takes its connections with it (as the server's death did before). Requests are
/// served one at a time; each client has [`IO_TIMEOUT`] per message. Connections that end (the
/// mount is gone) are dropped; with `idle_exit`, the holder removes its socket and returns once
/// it has held nothing for that long, so it never outlives the mounts it exists for. Fails
/// (`AddrInUse`) when another holder answers at `socket`: its connections stay reachable.
pub fn serve_holder(socket: &Path, idle_exit: Option<Duration>) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // One holder per socket, for its whole life: the lock is taken before the socket is
    // touched and held until the socket is gone, so two holders started at once never unlink
    // each other's socket (which would strand the connections one of them keeps).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(socket))?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("a FUSE holder already runs at {}", socket.display()),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&listener, &SocketAddrUnix::new(socket)?)?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    rustix::net::listen(&listener, 16)?;
    // accept wakes up every second to drop ended connections and to notice idleness.
    rustix::net::sockopt::set_socket_timeout(
        &listener,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(1)),
    )?;
    tracing::info!(socket = %socket.display(), "holding FUSE descriptors");
    let held: Arc<Mutex<HeldMap>> = Arc::default();
    // Clients are answered on threads of their own: one that never sends delays nobody else.
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut busy_at = std::time::Instant::now();
    loop {
        let conn = match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                let mut map = held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                map.retain(|key, (_, fd)| {
                    let alive = !connection_ended(fd.as_fd());
                    if !alive {
                        tracing::info!(key, "the FUSE connection ended; released");
                    }
                    alive
                });
                let idle = map.is_empty() && clients.load(Ordering::SeqCst) == 0;
                drop(map);
                if !idle {
                    busy_at = std::time::Instant::now();
                } else if idle_exit.is_some_and(|idle| busy_at.elapsed() >= idle) {
                    tracing::info!("nothing to hold; exiting");
                    let _ = std::fs::remove_file(socket);
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        busy_at = std::time::Instant::now();
        clients.fetch_add(1, Ordering::SeqCst);
        let (held, clients) = (held.clone(), clients.clone());
        std::thread::spawn(move || {
            if let Err(e) = set_timeouts(&conn).and_then(|()| answer(&conn, &held)) {
                tracing::warn!(error = %e, "a holder client failed");
            }
            clients.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// What the holder keeps: by key, the state and the descriptor.
type HeldMap = std::collections::BTreeMap<String, (String, OwnedFd)>;

/// The lock file of the holder at `socket`.
fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// True when the FUSE connection behind `fd` is gone (unmounted or aborted): the device then
/// polls as an error.
fn connection_ended(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(&fd, PollFlags::empty())];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
        Err(_) => false,
    }
}

/// Answers one request on `conn`.
fn answer(conn: &OwnedFd, held: &Mutex<HeldMap>) -> std::io::Result<()> {
    let (text, fd) = receive(conn)?;
    let held = || {
        held.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut words = text.split('\n');
    if words.next() != Some(PROTOCOL) {
        return send(conn, "unknown protocol", None);
    }
    match (words.next(), words.next(), words.next(), fd) {
        (Some("ping"), ..) => send(conn, "ok", None),
        (Some("put"), Some(key), Some(state), Some(fd)) => {
            tracing::info!(key, state, "holding a FUSE descriptor");
            held().insert(key.to_owned(), (state.to_owned(), fd));
            send(conn, "ok", None)
        }
        (Some("remove"), Some(key), ..) => {
            if held().remove(key).is_some() {
                tracing::info!(key, "released a FUSE descriptor");
            }
            send(conn, "ok", None)
        }
        (Some("list"), ..) => {
            // Duplicates, so nothing is locked while the client reads.
            let entries = held()
                .iter()
                .map(|(key, (state, fd))| Ok((key.clone(), state.clone(), fd.try_clone()?)))
                .collect::<std::io::Result<Vec<_>>>()?;
            send(conn, "ok", None)?;
            for (key, state, fd) in entries {
                send(conn, &format!("fd\n{key}\n{state}"), Some(fd.as_fd()))?;
            }
            send(conn, "end", None)
        }
        _ => send(conn, "bad request", None),
    }
}

/// How long a holder started by [`HolderProcess`] may hold nothing before it exits (the
/// default of the daemons' `fuse-holder --idle-exit`).
pub const HOLDER_IDLE_EXIT: Duration = Duration::from_secs(5);
/// How long a new holder has to answer.
const HOLDER_START_TIMEOUT: Duration = Duration::from_secs(5);

/// A daemon's side of its holder: a [`Holder`] client that starts the holder process when none
/// answers (in its own process group, so a signal to the daemon's group does not reach it; its
/// PID goes to `DIR/fuse-holder.pid`, its log to `DIR/fuse-holder.log`).
#[derive(Debug, Clone)]
pub struct HolderProcess {
    holder: Holder,
    dir: PathBuf,
    /// `None`: the holder runs elsewhere and is never started here.
    program: Option<PathBuf>,
    args: Vec<std::ffi::OsString>,
}

impl HolderProcess {
    /// The holder at `socket`, started when needed as `program args` (e.g. `/proc/self/exe
    /// fuse-holder --socket SOCKET`: the running binary, also when an upgrade replaced the
    /// file); its PID file and log go under `dir`.
    pub fn new(
        socket: &Path,
        dir: &Path,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString>>,
    ) -> HolderProcess {
        HolderProcess {
            holder: Holder::new(socket),
            dir: dir.to_owned(),
            program: Some(program.into()),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The holder at `socket`, run by someone else (e.g. a sidecar container): never started
    /// here, and a mount is not kept while it does not answer.
    pub fn external(socket: &Path) -> HolderProcess {
        HolderProcess {
            holder: Holder::new(socket),
            dir: PathBuf::new(),
            program: None,
            args: Vec::new(),
        }
    }

    /// The client.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Starts a holder unless one answers (one that runs elsewhere, e.g. in a sidecar
    /// container, is used as it is).
    pub fn ensure_up(&self) -> Result<(), HandoverError> {
        /// One start at a time in this process (parallel Prepares or publishes).
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = STARTING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.holder.is_up() {
            return Ok(());
        }
        let Some(program) = &self.program else {
            return Err(self
                .holder
                .error("no holder answers (it is not started here)"));
        };
        let deadline = std::time::Instant::now() + HOLDER_START_TIMEOUT;
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("fuse-holder.log"))
                .map_err(|e| {
                    self.holder
                        .error(format!("cannot open the holder's log: {e}"))
                })?;
            let mut child = std::process::Command::new(program);
            child
                .args(&self.args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log);
            std::os::unix::process::CommandExt::process_group(&mut child, 0);
            let mut child = child
                .spawn()
                .map_err(|e| self.holder.error(format!("cannot start the holder: {e}")))?;
            let pid = child.id();
            // Until it answers; or it exits at once (a holder on its way out still held the
            // socket's lock), and then another is started. A new holder answers within a few
            // milliseconds, and the mount that needs it waits: look often at first.
            let mut pause = Duration::from_micros(500);
            let exited = loop {
                if self.holder.is_up() {
                    break false;
                }
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break true;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self
                        .holder
                        .error(format!("the holder (pid {pid}) did not answer")));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            };
            if exited {
                if std::time::Instant::now() > deadline {
                    return Err(self.holder.error(format!(
                        "the holder exited at once (its log: {})",
                        self.dir.join("fuse-holder.log").display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let _ = std::fs::write(self.dir.join("fuse-holder.pid"), format!("{pid}\n"));
            // Reaped when it exits while this process lives.
            std::thread::spawn(move || child.wait());
            tracing::info!(pid, socket = %self.holder.socket().display(), "started the FUSE holder");
            return Ok(());
        }
    }

    /// Starts the holder, if this process starts it and none answers, off the async workers;
    /// a failure is only logged here ([`HolderProcess::hold`] tries again and reports). Run it
    /// beside a mount, so that the mount does not wait for the holder's start afterwards.
    pub async fn warm_up(&self) {
        if self.program.is_none() {
            return;
        }
        let this = self.clone();
        let started = tokio::task::spawn_blocking(move || this.ensure_up()).await;
        if let Ok(Err(e)) = started {
            tracing::debug!(error = %e, "the FUSE holder did not start yet");
        }
    }

    /// Gives the holder `fd`, the connection mounted at `mountpoint` (started if needed); false
    /// (logged) when it cannot: the mount then does not survive a restart.
    pub async fn hold(&self, mountpoint: &Path, fd: OwnedFd, state: SessionState) -> bool {
        let this = self.clone();
        let key = mountpoint.to_string_lossy().into_owned();
        let held = tokio::task::spawn_blocking(move || {
            this.holder.put(&key, &state, fd.as_fd()).or_else(|_| {
                this.ensure_up()?;
                this.holder.put(&key, &state, fd.as_fd())
            })
        })
        .await
        .unwrap_or_else(|e| Err(HandoverError::BadState(e.to_string())));
        if let Err(e) = &held {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "this mount will not survive a restart");
        }
        held.is_ok()
    }

    /// Gives the holder a copy of `connection` (a mount's, see
    /// [`crate::MountedModel::connection`]), mounted at `mountpoint`, as [`HolderProcess::hold`]
    /// does; false when the mount has none to give or it cannot be kept.
    pub async fn hold_connection(
        &self,
        mountpoint: &Path,
        connection: Option<(BorrowedFd<'_>, SessionState)>,
    ) -> bool {
        let Some((fd, state)) = connection else {
            return false;
        };
        match fd.try_clone_to_owned() {
            Ok(fd) => self.hold(mountpoint, fd, state).await,
            Err(e) => {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "this mount will not survive a restart");
                false
            }
        }
    }

    /// Tells the holder to let go of the connection at `mountpoint` (before it is unmounted).
    pub async fn release(&self, mountpoint: &Path) {
        let holder = self.holder.clone();
        let key = mountpoint.to_string_lossy().into_owned();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = holder.remove(&key) {
                tracing::debug!(key, error = %e, "the holder did not release");
            }
        })
        .await;
    }

    /// What a predecessor left with the holder, by mount point (none when no holder answers).
    /// A holder that answers but cannot list is an error: the caller must not treat the mounts
    /// it keeps as dead (detached, their readers would wait for ever), but fail and retry.
    pub async fn take(
        &self,
    ) -> Result<std::collections::HashMap<PathBuf, std::sync::Arc<Handover>>, HandoverError> {
        let holder = self.holder.clone();
        let held = tokio::task::spawn_blocking(move || {
            if !holder.is_up() {
                return Ok(Vec::new());
            }
            holder.list()
        })
        .await
        .unwrap_or_else(|e| Err(HandoverError::BadState(e.to_string())))?;
        let mut out = std::collections::HashMap::new();
        for h in held {
            match SessionState::decode(&h.state) {
                Ok(state) => {
                    out.insert(
                        PathBuf::from(&h.key),
                        std::sync::Arc::new(Handover { fd: h.fd, state }),
                    );
                }
                Err(e) => {
                    tracing::warn!(key = %h.key, error = %e, "cannot adopt a held connection")
                }
            }
        }
        Ok(out)
    }
}

/// FUSE_INIT's opcode.
const FUSE_INIT: u32 = 26;
/// The notification that asks the kernel to send unanswered requests again (Linux 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// INIT flag: the flags go on in `flags2`.
const FUSE_INIT_EXT: u64 = 1 << 30;

/// The INIT request the kernel sent when the connection was new, as `state` recorded it.
fn init_request(state: &SessionState) -> Vec<u8> {
    let mut flags = state.capabilities;
    if flags >> 32 != 0 {
        flags |= FUSE_INIT_EXT;
    }
    let mut msg = Vec::with_capacity(104);
    msg.extend_from_slice(&104u32.to_le_bytes()); // len
    msg.extend_from_slice(&FUSE_INIT.to_le_bytes()); // opcode
    msg.extend_from_slice(&1u64.to_le_bytes()); // unique
    msg.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    msg.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    msg.extend_from_slice(&7u32.to_le_bytes()); // major
    msg.extend_from_slice(&state.abi_minor.to_le_bytes());
    msg.extend_from_slice(&state.max_readahead.to_le_bytes());
    msg.extend_from_slice(&(flags as u32).to_le_bytes());
    msg.extend_from_slice(&((flags >> 32) as u32).to_le_bytes());
    msg.extend_from_slice(&[0u8; 44]); // unused
    msg
}

/// A fuser session for `fs` on the adopted connection `handover`. fuser insists on an INIT
/// handshake, which the kernel sends once per connection: the session is made on one end of a
/// socket pair that carries the recorded INIT (its answer is dropped: the kernel keeps what it
/// negotiated the first time), and the session's descriptor then becomes the connection.
pub(crate) fn adopt<FS: fuser::Filesystem>(
    fs: FS,
    handover: &Handover,
    config: fuser::Config,
) -> std::io::Result<fuser::Session<FS>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::write(&ours, &init_request(&handover.state))?;
    let session = fuser::Session::from_fd(fs, theirs, config.acl, config)?;
    let raw = session.as_fd().as_raw_fd();
    // SAFETY: `raw` is the session's own open descriptor, and stays owned by the session
    // (ManuallyDrop never closes it); dup2 only changes, atomically, what that number refers to.
    #[allow(unsafe_code)]
    let mut slot = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(raw) });
    // dup3 with CLOEXEC: dup2 would clear the flag, and every child process spawned later (a
    // credential helper, a holder) would inherit the connection and keep it alive.
    rustix::io::dup3(&handover.fd, &mut slot, rustix::io::DupFlags::CLOEXEC)?;
    drop(ours);
    Ok(session)
}

/// Asks the kernel to queue again every request of the connection that a server read and never
/// answered (the dead predecessor's): they reach the new server as new requests. Kernels before
/// 6.9 refuse (EINVAL); such requests then wait until the mount is gone.
pub(crate) fn resend_unanswered(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_le_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    rustix::io::write(fd, &msg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of a connection on device `0:1` whose time and tree are unknown.
    fn session_state(abi_minor: u32, capabilities: u64, max_readahead: u32) -> SessionState {
        SessionState {
            dev: (0, 1),
            abi_minor,
            capabilities,
            max_readahead,
            created_ns: 0,
            tree: 0,
        }
    }

    #[test]
    fn the_recorded_init_is_a_well_formed_request() {
        let msg = init_request(&session_state(44, (1 << 37) | 1, 131072));
        assert_eq!(msg.len(), 104);
        assert_eq!(u32::from_le_bytes(msg[0..4].try_into().expect("test")), 104);
        assert_eq!(
            u32::from_le_bytes(msg[4..8].try_into().expect("test")),
            FUSE_INIT
        );
        let flags = u32::from_le_bytes(msg[52..56].try_into().expect("test"));
        assert_eq!(u64::from(flags), 1 | FUSE_INIT_EXT);
        assert_eq!(
            u32::from_le_bytes(msg[56..60].try_into().expect("test")),
            1 << 5
        );
    }

    #[test]
    fn session_state_round_trips() {
        let s = SessionState {
            dev: (0, 61),
            abi_minor: 44,
            capabilities: 0x2_0000_1234,
            max_readahead: 131072,
            created_ns: 1_700_000_000_123_456_789,
            tree: 0xdead_beef_0000_0001,
        };
        assert_eq!(SessionState::decode(&s.encode()).expect("test"), s);
        assert!(SessionState::decode("dev=0:1 abi=8.1 caps=0 ra=1").is_err());
        assert!(SessionState::decode("abi=7.1 caps=0 ra=1").is_err());
    }

    #[test]
    fn the_holder_keeps_descriptors_until_removed() {
        let dir = tempfile::tempdir().expect("test");
        let socket = dir.path().join("holder.sock");
        let serving = socket.clone();
        std::thread::spawn(move || serve_holder(&serving, None));
        let holder = Holder::new(&socket);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !holder.is_up() {
            assert!(
                std::time::Instant::now() < deadline,
                "holder never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = session_state(40, 1, 4096);
        // A pipe stands in for /dev/fuse: what is written into the kept write end arrives.
        let (read, write) = rustix::pipe::pipe().expect("test");
        holder.put("/mnt/a", &state, write.as_fd()).expect("test");
        drop(write);
        let held = holder.list().expect("test");
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].key, "/mnt/a");
        assert_eq!(SessionState::decode(&held[0].state).expect("test"), state);
        rustix::io::write(&held[0].fd, b"kept").expect("test");
        let mut buf = [0u8; 4];
        rustix::io::read(&read, &mut buf).expect("test");
        assert_eq!(&buf, b"kept");
        holder.remove("/mnt/a").expect("test");
        assert!(holder.list().expect("test").is_empty());

        // A client that connects and never sends delays nobody else.
        let silent = holder.connect().expect("test");
        let asked = std::time::Instant::now();
        assert!(holder.is_up());
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
        drop(silent);

        // One holder per socket: a second one refuses to start.
        let second = serve_holder(&socket, None).expect_err("a second holder");
        assert_eq!(second.kind(), std::io::ErrorKind::AddrInUse);
        assert!(holder.is_up());
    }
}
