//! `modelpack mount` (serve a model from its registry as a lazy, read-only folder) and
//! `modelpack umount`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use modelpack_lazyfs::{MountOptions, STATUS_FILE, Verify};

use crate::args::GlobalArgs;
use crate::remote::ConnectionArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyArg {
    /// Verify every byte (per chunk with a chunk index, else the whole layer first)
    Full,
    /// Without a chunk index: serve at once, verify the whole layer behind the reads, fail every
    /// read of a layer that does not verify
    Background,
    /// Serve bytes unverified when there is no chunk index
    None,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The model, e.g. localhost:5000/models/llama:8b
    #[arg(required_unless_present = "status")]
    pub reference: Option<String>,
    /// Where to mount it (an existing folder)
    pub dir: Option<PathBuf>,
    /// Print the status of the mount at DIR as JSON and exit
    #[arg(long, value_name = "DIR", conflicts_with = "reference")]
    pub status: Option<PathBuf>,
    /// Chunk cache folder [default: STORE/cache]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Cap the chunk cache (e.g. 256MiB, 10GiB, or bytes): the least recently used chunks no
    /// open file is reading are evicted, and fetched again when read
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_max: Option<u64>,
    /// Verification without a chunk index
    #[arg(long, value_enum, default_value_t = VerifyArg::Full)]
    pub verify: VerifyArg,
    /// Fetch every layer in the background after mounting
    #[arg(long)]
    pub prefetch: bool,
    /// Fetch files of at most SIZE as soon as the model mounts, several at once (configs,
    /// tokenizers, trees of small files: what a loader reads first); 0: none
    #[arg(long, value_name = "SIZE", value_parser = parse_size_or_zero, default_value = "1MiB")]
    pub prefetch_small: u64,
    /// Let other users read the mount
    #[arg(long)]
    pub allow_other: bool,
    /// Serve in the background: return once the folder is mounted (stop it with `umount`)
    #[arg(long, conflicts_with = "status")]
    pub daemon: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mount point
    pub dir: PathBuf,
}

pub fn mount(global: &GlobalArgs, args: MountArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &args.status {
        let text = std::fs::read_to_string(dir.join(STATUS_FILE))
            .with_context(|| format!("{} is not a modelpack mount", dir.display()))?;
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(reference), Some(dir)) = (&args.reference, &args.dir) else {
        bail!("give REF and DIR");
    };
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let reference = super::parse_reference(reference)?;
    let store = super::open_store(global)?;
    let client = args.connection.client()?;
    if args.daemon {
        return daemonize(global, &reference.familiar(), dir, &store);
    }
    let cache_dir = args
        .cache
        .clone()
        .unwrap_or_else(|| store.root().join("cache"));
    let cache = match args.cache_max {
        Some(max) => Some(modelpack_lazyfs::CacheBudget::open(&cache_dir, Some(max))?),
        None => None,
    };
    let opts = MountOptions {
        repository: crate::remote::repository(&client, &reference),
        reference: reference.tag_or_digest(),
        cache_dir,
        cache,
        store,
        verify: match args.verify {
            VerifyArg::Full => Verify::Full,
            VerifyArg::Background => Verify::Background,
            VerifyArg::None => Verify::None,
        },
        allow_other: args.allow_other,
        prefetch: args.prefetch,
        prefetch_small: args.prefetch_small,
        layers: None,
        status_file: true,
        resolved: None,
        adopt: None,
        for_successor: false,
    };
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        // Both stop signals are taken before the folder is mounted: one that arrives the moment
        // the mount appears must unmount it, not kill the process and leave the folder dead.
        // Ctrl-C goes through the process's interrupt handler, which sets the cancel flag.
        let cancel = crate::display::cancel_flag();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut stopped = Box::pin(async move {
            let interrupted = async {
                while !cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                () = interrupted => {}
            }
        });
        // Setting up (resolving, planning tar layers) can take a while: a stop during it
        // abandons the setup, which unmounts whatever it had mounted.
        let mounted = tokio::select! {
            mounted = modelpack_lazyfs::mount(opts, dir) => mounted.with_context(|| {
                format!("cannot mount {} at {}", reference.familiar(), dir.display())
            })?,
            () = &mut stopped => anyhow::bail!("stopped before {} was mounted", dir.display()),
        };
        if !global.quiet {
            eprintln!(
                "Mounted {} at {} (Ctrl-C or `modelpack umount` to stop)",
                reference.familiar(),
                dir.display()
            );
        }
        mounted
            .serve_until(stopped)
            .await
            .with_context(|| format!("cannot unmount {}", dir.display()))?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// [`parse_size`], also taking `0` (for "none").
fn parse_size_or_zero(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_size(text)
}

/// A size: bytes, or a number with a unit (`KiB`, `MiB`, `GiB`, `TiB`, or `K`, `M`, `G`, `T`
/// for the same; `KB`, `MB`, `GB`, `TB` are powers of ten), e.g. `256MiB`, `10GiB`, `1.5G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim();
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = if number.contains('.') {
        let value: f64 = number
            .parse()
            .map_err(|_| format!("not a size: {text:?}"))?;
        value * scale as f64
    } else {
        let value: u64 = number
            .parse()
            .map_err(|_| format!("not a size: {text:?}"))?;
        return value
            .checked_mul(scale)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("size out of range: {text:?}"));
    };
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("size out of range: {text:?}"));
    }
    Ok(bytes as u64)
}

/// `mount --daemon`: runs this same command without `--daemon` as a background process (its own
/// process group, output to a log file under the store), waits until the folder serves, and
/// returns; if the mount fails first, its error becomes ours.
fn daemonize(
    global: &GlobalArgs,
    reference: &str,
    dir: &std::path::Path,
    store: &modelpack_store::Store,
) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt as _;
    let logs = store.root().join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let log_path = logs.join(format!(
        "mount-{}.log",
        &modelpack_spec::Digest::sha256_of(dir.as_os_str().as_encoded_bytes()).encoded()[..16]
    ));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let original = crate::hide_args::original_args();
    let exe = std::env::current_exe().context("cannot find the modelpack executable")?;
    let mut child = std::process::Command::new(exe)
        .args(original.iter().skip(1).filter(|a| *a != "--daemon"))
        .env("MODELPACK_STORE", store.root())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the background mount")?;
    let status_file = dir.join(STATUS_FILE);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let line = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .map_or_else(
                    || format!("the background mount exited ({status})"),
                    str::to_owned,
                );
            bail!("{line}");
        }
        if status_file.exists() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{reference} was not mounted at {} within 120 s",
                dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if global.quiet {
        println!("{}", child.id());
    } else {
        eprintln!(
            "Mounted {reference} at {} in the background (pid {}, log {}; `modelpack umount {}` to stop)",
            dir.display(),
            child.id(),
            log_path.display(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn umount(_global: &GlobalArgs, args: UmountArgs) -> anyhow::Result<ExitCode> {
    // fusermount3's own message becomes part of our one error line.
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&args.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("cannot run fusermount3 (Debian package fuse3)")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        match stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
            Some(why) => bail!("{} is not mounted, or is busy ({why})", args.dir.display()),
            None => bail!("{} is not mounted, or is busy", args.dir.display()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The model to index, e.g. localhost:5000/models/llama:8b
    pub reference: String,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// `modelpack index REF`: a chunk-digest index for an artifact built elsewhere, attached as a
/// referrer so `mount` can verify it chunk by chunk.
pub fn index(global: &GlobalArgs, args: IndexArgs) -> anyhow::Result<ExitCode> {
    let (reference, repo) = args.connection.open(&args.reference)?;
    let rt = crate::remote::runtime()?;
    let digest = rt
        .block_on(modelpack_lazyfs::create_index(
            &repo,
            &reference.tag_or_digest(),
        ))
        .with_context(|| format!("cannot index {}", reference.familiar()))?;
    if global.quiet {
        println!("{digest}");
    } else {
        println!(
            "Indexed {}: chunk index attached as referrer {digest}",
            reference.familiar()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, parse_size_or_zero};

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        for (text, bytes) in [
            ("268435456", 256u64 << 20),
            ("256MiB", 256 << 20),
            ("256M", 256 << 20),
            ("10GiB", 10 << 30),
            ("10 gib", 10 << 30),
            ("1.5G", 3 << 29),
            ("2GB", 2_000_000_000),
            ("4096b", 4096),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "MiB", "0", "12XB", "-1G", "1.2.3M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("1MiB"), Ok(1 << 20));
        assert!(parse_size_or_zero("-0").is_err());
    }
}
