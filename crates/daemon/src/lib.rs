//! What the two daemons serving lazyfs mounts (the containerd snapshotter and the CSI plugin)
//! share around their services: the `fuse-holder` role of their binary and the holder they start
//! as it, logging, the flags both read the same way, the runtime, the socket they serve on, the
//! signals that stop them, and how they end when FUSE connections were left to the holder.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};

use modelpack_lazyfs::{Handover, HandoverError, HolderProcess};

/// The folder containerd reads registry hosts from (`config_path`), used when it exists.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// A `hosts_dir` that was given but is not a folder.
#[derive(Debug, thiserror::Error)]
#[error("hosts_dir {}: no such folder", .0.display())]
pub struct NoHostsDir(pub PathBuf);

/// Why the service socket could not be listened on.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Its folder could not be created.
    #[error("cannot create {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    /// A socket left by an earlier run could not be removed.
    #[error("cannot remove {}", .0.display())]
    RemoveStale(PathBuf, #[source] std::io::Error),
    /// Binding failed.
    #[error("cannot listen on {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` when set, else by `level` (the
/// daemon's `--log-level`); each event keeps the target of the code that logged it.
pub fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(log_in_colour())
        .init();
}

/// Whether log lines on stderr get colours: only on a terminal (journald and log files get
/// plain text), and never with `NO_COLOR` set to a non-empty value (<https://no-color.org>).
fn log_in_colour() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The flags of the `fuse-holder` subcommand of a daemon's binary.
#[derive(Debug, clap::Args)]
pub struct FuseHolderArgs {
    /// Socket to listen on
    #[arg(long, value_name = "SOCKET")]
    pub socket: PathBuf,
    /// Exit once nothing was held for SECONDS (0: never)
    #[arg(long, value_name = "SECONDS", default_value_t = modelpack_lazyfs::HOLDER_IDLE_EXIT.as_secs())]
    pub idle_exit: u64,
}

/// The `fuse-holder` subcommand of a daemon's binary `program`: [`modelpack_lazyfs::serve_holder`]
/// on the socket until nothing was held for `--idle-exit` seconds (0: never). A failure is printed
/// as `PROGRAM fuse-holder: ERROR` (exit status 1).
pub fn run_fuse_holder(program: &str, args: &FuseHolderArgs) -> ExitCode {
    let idle_exit = Some(Duration::from_secs(args.idle_exit)).filter(|d| !d.is_zero());
    match modelpack_lazyfs::serve_holder(&args.socket, idle_exit) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program} fuse-holder: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The holder at `socket`, started when none answers as the running binary's `fuse-holder
/// --socket SOCKET` (see [`run_fuse_holder`]); its PID file and log go under `dir`.
pub fn holder_process(socket: &Path, dir: &Path) -> HolderProcess {
    HolderProcess::new(
        socket,
        dir,
        "/proc/self/exe",
        [
            std::ffi::OsString::from("fuse-holder"),
            "--socket".into(),
            socket.into(),
        ],
    )
}

/// The holder's socket as configured: `given` (empty: no holder), else `DIR/fuse-holder.sock`.
pub fn holder_socket(given: Option<PathBuf>, dir: &Path) -> Option<PathBuf> {
    match given {
        Some(socket) if socket.as_os_str().is_empty() => None,
        Some(socket) => Some(socket),
        None => Some(dir.join("fuse-holder.sock")),
    }
}

/// containerd's registry hosts folder as configured: `given` (must be a folder; empty: none),
/// else [`DEFAULT_HOSTS_DIR`] when it exists.
pub fn hosts_dir(given: Option<PathBuf>) -> Result<Option<PathBuf>, NoHostsDir> {
    match given {
        Some(dir) if dir.as_os_str().is_empty() => Ok(None),
        Some(dir) if !dir.is_dir() => Err(NoHostsDir(dir)),
        Some(dir) => Ok(Some(dir)),
        None => Ok(Some(PathBuf::from(DEFAULT_HOSTS_DIR)).filter(|d| d.is_dir())),
    }
}

/// Runs `main` to its end on a new multi-threaded tokio runtime. A runtime that cannot start is
/// printed as `PROGRAM: cannot start the runtime: ERROR` (exit status 1).
pub fn block_on(program: &str, main: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `result` as the exit status: 0, or 1 once the error is printed as `PROGRAM: ERROR` (with its
/// causes).
pub fn exit_code<E: Display>(program: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Listens on the Unix socket `socket` (within a tokio runtime): creates its folder, and removes
/// a socket an earlier run left there, calling `on_stale` then.
pub fn bind_socket(socket: &Path, on_stale: impl FnOnce()) -> Result<UnixListener, SocketError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SocketError::CreateDir(dir.to_owned(), e))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => on_stale(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SocketError::RemoveStale(socket.to_owned(), e)),
    }
    UnixListener::bind(socket).map_err(|e| SocketError::Bind(socket.to_owned(), e))
}

/// Resolves on SIGINT or SIGTERM, a daemon's cue to stop; never when no SIGTERM handler can be
/// installed.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Accepts connections on `listener` for as long as the process runs (in a background task),
/// each handled by `handle` in a task of its own.
pub fn serve_connections<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(handle(stream));
        }
    });
}

/// The connections a predecessor left with `holder` (none without one; see
/// [`HolderProcess::take`]) that `keep` accepts, by mount point; the holder is told to let go of
/// the others.
pub async fn take_held(
    holder: Option<&HolderProcess>,
    mut keep: impl FnMut(&Path, &Handover) -> bool,
) -> Result<HashMap<PathBuf, Arc<Handover>>, HandoverError> {
    let Some(holder) = holder else {
        return Ok(HashMap::new());
    };
    let mut held = holder.take().await?;
    let mut stale = Vec::new();
    held.retain(|dir, handover| {
        let kept = keep(dir, handover);
        if !kept {
            stale.push(dir.clone());
        }
        kept
    });
    for dir in &stale {
        holder.release(dir).await;
    }
    Ok(held)
}

/// Ends a daemon once its service shut down with `left` FUSE connections given to the holder
/// for the next start: removes its `socket`, and with any left, calls `log_left(left)` and exits
/// at once (status 0, or 1 once `result`'s error is printed as `PROGRAM: ERROR`), since dropping
/// anything more would cut their readers off. Otherwise it gives `result` back.
pub fn finish<E: Display>(
    program: &str,
    socket: &Path,
    result: Result<(), E>,
    left: usize,
    log_left: impl FnOnce(usize),
) -> Result<(), E> {
    let _ = std::fs::remove_file(socket);
    if left > 0 {
        log_left(left);
        if let Err(e) = &result {
            eprintln!("{program}: {e:#}");
        }
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_holder_socket_means_none_and_none_given_the_default() {
        let dir = Path::new("/var/lib/d");
        assert_eq!(holder_socket(Some(PathBuf::new()), dir), None);
        assert_eq!(
            holder_socket(Some(PathBuf::from("/run/h.sock")), dir),
            Some(PathBuf::from("/run/h.sock"))
        );
        assert_eq!(
            holder_socket(None, dir),
            Some(PathBuf::from("/var/lib/d/fuse-holder.sock"))
        );
    }

    #[test]
    fn a_given_hosts_dir_must_exist_and_empty_means_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(hosts_dir(Some(PathBuf::new())).expect("empty"), None);
        assert_eq!(
            hosts_dir(Some(dir.path().to_owned())).expect("exists"),
            Some(dir.path().to_owned())
        );
        let missing = dir.path().join("absent");
        let e = hosts_dir(Some(missing.clone())).expect_err("absent");
        assert_eq!(
            e.to_string(),
            format!("hosts_dir {}: no such folder", missing.display())
        );
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sub/d.sock");
        let mut stale = false;
        drop(bind_socket(&socket, || stale = true).expect("first"));
        assert!(!stale);
        let _listener = bind_socket(&socket, || stale = true).expect("second");
        assert!(stale);
    }
}
