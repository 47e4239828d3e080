//! `modelpack mount` against a real `docker-registry` and a real FUSE mount: every file's bytes
//! and metadata, read-only, concurrent random reads, corruption, and a registry that goes away.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use modelpack_testkit::process::{Signal, signal_pid};

use crate::util::{self, Mount, Proxy, Registry, Scratch};

fn model(s: &Scratch, weight: usize) -> PathBuf {
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    let dir = util::model_with_weight(
        s,
        weight,
        SEED,
        &[
            // The weight's first third (the same pseudo-random stream, cut shorter).
            ("second.bin", &util::pseudo_random(weight / 3, SEED)),
            ("config.json", br#"{"model_type":"m"}"#),
            ("empty.bin", b""),
            ("nested/deeper/notes.md", b"deep\n"),
        ],
    );
    std::os::unix::fs::symlink("../config.json", dir.join("nested/link.json")).expect("symlink");
    dir
}

/// When this machine can mount FUSE and a registry runs: [`model`] with a `weight`-byte weight,
/// built and pushed as `HOST/REPO:TAG`.
fn pushed_model_to_mount(
    repo_and_tag: &str,
    weight: usize,
) -> Option<util::ModelOnRegistry<PathBuf>> {
    util::pushed_model_to_mount(repo_and_tag, |s| model(s, weight))
}

/// When this machine can mount FUSE and a registry runs: [`model`] pushed as `HOST/REPO:TAG`, a
/// counting [`Proxy`] in front of the registry, and the model mounted through that proxy.
fn mounted_through_proxy(
    repo_and_tag: &str,
    weight: usize,
) -> Option<(util::ModelOnRegistry<PathBuf>, Proxy, Mount)> {
    util::mounted_through_proxy(repo_and_tag, |s| model(s, weight), &[])
}

/// Asserts that `bytes` read through a mount are the bytes of the source file `file`.
fn assert_bytes_of(bytes: &[u8], file: &Path) {
    assert_eq!(
        util::sha256_hex(bytes),
        util::sha256_file(file),
        "{}",
        file.display()
    );
}

#[test]
fn mounted_files_match_for_every_layer_encoding() {
    if !util::can_fuse() {
        return;
    }
    let Some(m) = util::registry_and_model("mnt/raw:v1", |s| model(s, 9 << 20)) else {
        return;
    };
    let (registry, s, dir, _) = m.parts();
    for (tag, extra) in [
        ("raw", vec![]),
        ("tar", vec!["--layer-format", "tar"]),
        ("gzip", vec!["--layer-format", "tar", "--compress", "gzip"]),
        ("zstd", vec!["--layer-format", "tar", "--compress", "zstd"]),
    ] {
        let reference = format!("{}/mnt/{tag}:v1", registry.host());
        s.build_and_push_with(dir, &reference, &extra);
        let reader = Scratch::new();
        let cache = reader.path("private-cache");
        let cache_arg = cache.to_str().expect("utf8").to_owned();
        let mount = Mount::start(
            &reader,
            &reference,
            &reader.path("mnt"),
            &["--cache", &cache_arg],
        );
        if tag == "raw" {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&cache).expect("cache").permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "the cache is not private: {mode:o}");
            // Without --allow-other, another user cannot even list the mount.
            if util::is_root() {
                let other = std::process::Command::new("runuser")
                    .args(["-u", "nobody", "--", "ls"])
                    .arg(&mount.dir)
                    .output()
                    .expect("runuser");
                assert!(
                    !other.status.success(),
                    "another user listed the mount: {}",
                    String::from_utf8_lossy(&other.stdout)
                );
            }
            let fetched = mount.status()["fetchedBytes"]
                .as_u64()
                .expect("fetchedBytes");
            assert!(fetched < 64 * 1024, "mounting fetched {fetched} bytes");
        }
        assert_eq!(
            util::tree(&mount.dir),
            util::tree(dir),
            "{tag}: contents or modes differ"
        );
        assert_eq!(
            util::mtimes(&mount.dir),
            util::mtimes(dir),
            "{tag}: mtimes differ"
        );
        let err = fs::write(mount.dir.join("new.txt"), b"x").expect_err("writable");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{tag}: {err}");
        let err = fs::OpenOptions::new()
            .append(true)
            .open(mount.dir.join("config.json"))
            .expect_err("writable");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{tag}: {err}");
        let err = fs::create_dir(mount.dir.join("d")).expect_err("writable");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{tag}: {err}");
        drop(mount);
        assert!(
            !util::listing(&reader.path("mnt"))
                .iter()
                .any(|p| p.contains("model")),
            "still mounted"
        );
    }
}

#[test]
fn sixteen_threads_reading_random_ranges_get_the_right_bytes() {
    let Some(m) = pushed_model_to_mount("mnt/random:v1", 24 << 20) else {
        return;
    };
    let mount = Mount::in_fresh_store(&m.reference, &[]);
    let source = std::sync::Arc::new(fs::read(m.dir.join("model.safetensors")).expect("read"));
    let handles: Vec<_> = (0..16u64)
        .map(|t| {
            let source = source.clone();
            let path = mount.dir.join("model.safetensors");
            std::thread::spawn(move || {
                let mut file = fs::File::open(&path).expect("open");
                let mut state = t * 7919 + 1;
                for _ in 0..40 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let offset = (state >> 16) % source.len() as u64;
                    let len = (((state >> 40) % (600 * 1024)) as usize)
                        .min(source.len() - offset as usize);
                    let mut buf = vec![0u8; len];
                    file.seek(SeekFrom::Start(offset)).expect("seek");
                    file.read_exact(&mut buf).expect("read");
                    assert!(
                        buf == source[offset as usize..offset as usize + len],
                        "wrong bytes at {offset}+{len}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("reader thread");
    }
}

#[test]
fn corrupt_chunk_is_never_served_and_a_clean_retry_succeeds() {
    let Some((m, proxy, mount)) = mounted_through_proxy("mnt/corrupt:v1", 12 << 20) else {
        return;
    };
    // Every response from now on has one byte flipped, inside the body of a 4 MiB chunk.
    proxy.corrupt.store(true, Ordering::SeqCst);
    let path = mount.dir.join("model.safetensors");
    let err = fs::read(&path).expect_err("corrupt bytes were served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mount.status()["verifyFailures"].as_u64().expect("count") >= 1);
    proxy.corrupt.store(false, Ordering::SeqCst);
    let bytes = fs::read(&path).expect("read after the fault cleared");
    assert_bytes_of(&bytes, &m.dir.join("model.safetensors"));
}

#[test]
fn registry_down_cached_files_still_read_and_the_mount_recovers() {
    let Some((m, proxy, mount)) = mounted_through_proxy("mnt/down:v1", 6 << 20) else {
        return;
    };
    let first = fs::read(mount.dir.join("model.safetensors")).expect("read");
    proxy.down.store(true, Ordering::SeqCst);
    // Fully read: served from the cache (the kernel's, then ours) with the registry gone.
    assert_eq!(
        fs::read(mount.dir.join("model.safetensors")).expect("cached read"),
        first
    );
    let started = Instant::now();
    let err = fs::read(mount.dir.join("second.bin")).expect_err("unread file served offline");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "EIO came too late"
    );
    assert!(mount.is_mounted(), "the mount went away");
    proxy.down.store(false, Ordering::SeqCst);
    let second = fs::read(mount.dir.join("second.bin")).expect("read after the registry returned");
    assert_bytes_of(&second, &m.dir.join("second.bin"));
}

#[test]
fn foreign_artifact_without_index_is_verified_whole_then_lazily_after_modelpack_index() {
    let Some(m) = pushed_model_to_mount("mnt/foreign:ours", 10 << 20) else {
        return;
    };
    let (registry, s, dir, ours) = m.parts();
    // The same artifact as another tool would write it: no chunk-index annotation.
    let manifest_file = s.path("manifest.json");
    s.fetch_manifest_to(ours, &manifest_file);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_file).expect("read")).expect("json");
    manifest
        .as_object_mut()
        .expect("object")
        .remove("annotations");
    fs::write(&manifest_file, serde_json::to_vec(&manifest).expect("json")).expect("write");
    let foreign = format!("{}/mnt/foreign:theirs", registry.host());
    s.push_manifest_from(&foreign, &manifest_file);
    let weight_size = fs::metadata(dir.join("model.safetensors"))
        .expect("stat")
        .len();

    // Without an index the safe default fetches and verifies the whole layer first.
    let mount = Mount::in_fresh_store(&foreign, &[]);
    let mut head = [0u8; 4096];
    let mut weight = fs::File::open(mount.dir.join("model.safetensors")).expect("open");
    weight.read_exact(&mut head).expect("read");
    let fetched = mount.status()["fetchedBytes"].as_u64().expect("fetched");
    assert!(
        fetched >= weight_size,
        "only {fetched} bytes fetched before serving unindexed bytes"
    );
    // The same handle reads on in order, as a loader does.
    let mut rest = Vec::new();
    weight.read_to_end(&mut rest).expect("read on");
    assert_bytes_of(
        &[&head[..], &rest[..]].concat(),
        &dir.join("model.safetensors"),
    );
    drop(weight);
    assert_eq!(util::tree(&mount.dir), util::tree(dir));
    // No byte fetched twice: readahead and the small-file prefetch have nothing to add to
    // layers fetched whole.
    let layers = util::layer_bytes(&manifest);
    let fetched = mount.status()["fetchedBytes"].as_u64().expect("fetched");
    assert!(
        fetched <= layers,
        "{fetched} bytes fetched for {layers} bytes of layers: {}",
        mount.status()
    );
    drop(mount);

    // --verify background: served at once; the whole layer is fetched and verified behind the
    // reads, into the store.
    let weight_hex = util::sha256_file(&dir.join("model.safetensors"));
    let mount = Mount::in_fresh_store(&foreign, &["--verify", "background"]);
    assert_eq!(util::tree(&mount.dir), util::tree(dir));
    let verified = mount.store().join("blobs/sha256").join(&weight_hex);
    util::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || verified.exists(),
        || "the weight was never verified whole".to_owned(),
    );
    drop(mount);

    // ... and when the registry corrupts the layer, the background check fails and every later
    // read of it fails.
    let proxy = Proxy::start(registry.port, None);
    proxy.corrupt.store(true, Ordering::SeqCst);
    let via = format!("{}/mnt/foreign:theirs", proxy.host());
    let mount = Mount::in_fresh_store(&via, &["--verify", "background"]);
    let weight = mount.dir.join("model.safetensors");
    // Unverified bytes, as asked; the read starts the background check and leaves the pages in
    // the page cache. The handle stays open across the failure.
    let mut held = fs::File::open(&weight).expect("open");
    let _ = held.read_to_end(&mut Vec::new());
    util::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || mount.status()["verifyFailures"].as_u64().unwrap_or(0) != 0,
        || format!("background verification never failed: {}", mount.status()),
    );
    let mut buf = vec![0u8; 4096];
    let opened = fs::File::open(&weight);
    let Err(err) = opened.and_then(|mut f| {
        f.seek(SeekFrom::Start(weight_size / 2))?;
        f.read_exact(&mut buf)
    }) else {
        panic!(
            "a layer that failed verification was served: {}",
            mount.status()
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let Err(err) = held
        .seek(SeekFrom::Start(weight_size / 2))
        .and_then(|_| held.read_exact(&mut buf))
    else {
        panic!(
            "a handle opened before the failure still read the cached pages: {}",
            mount.status()
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(held);
    assert!(
        !mount
            .store()
            .join("blobs/sha256")
            .join(&weight_hex)
            .exists()
    );
    drop(mount);

    // With an index attached as a referrer, a fresh mount reads lazily.
    let referrer = s.ok(&["-q", "index", &foreign, "--plain-http"]);
    assert!(referrer.trim().starts_with("sha256:"), "{referrer}");
    let found: serde_json::Value =
        serde_json::from_str(&s.ok(&["discover", &foreign, "--plain-http", "--format", "json"]))
            .expect("json");
    assert_eq!(
        found["referrers"][0]["artifactType"],
        "application/vnd.modelpack.chunk-index.v1+json"
    );
    let mount = Mount::in_fresh_store(&foreign, &[]);
    // One read in the middle (a lone read starts no readahead).
    fs::File::open(mount.dir.join("model.safetensors"))
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(6 << 20))?;
            f.read_exact(&mut head)
        })
        .expect("read");
    let fetched = mount.status()["fetchedBytes"].as_u64().expect("fetched");
    assert!(
        fetched < weight_size / 2,
        "{fetched} of {weight_size} bytes fetched for 4 KiB"
    );
    assert_eq!(util::tree(&mount.dir), util::tree(dir));
}

/// A background mount started with `--daemon`, stopped by PID and unmounted when dropped.
struct Daemon {
    pid: u32,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|s| {
            s.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.alive() {
            let _ = signal_pid(self.pid, Signal::TERM);
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .output();
        if self.alive() {
            let _ = signal_pid(self.pid, Signal::KILL);
        }
    }
}

#[test]
fn daemon_mount_returns_once_serving_and_umount_stops_it() {
    let Some(m) = pushed_model_to_mount("mnt/daemon:v1", 4 << 20) else {
        return;
    };
    let (registry, _, dir, reference) = m.parts();

    let reader = Scratch::new();
    let mnt = reader.path("mnt");
    fs::create_dir_all(&mnt).expect("mkdir");
    let mnt_arg = mnt.to_str().expect("utf8");
    let out = reader.ok(&[
        "-q",
        "mount",
        reference,
        mnt_arg,
        "--plain-http",
        "--daemon",
    ]);
    let daemon = Daemon {
        pid: out.trim().parse().expect("the daemon's pid"),
        dir: mnt.clone(),
    };
    assert!(daemon.alive(), "the daemon is not running");
    // The command returned only once the folder serves: read it at once.
    assert_eq!(util::tree(&mnt), util::tree(dir));

    reader.ok(&["umount", mnt_arg]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!daemon.alive(), "the daemon outlived its mount");
    drop(daemon);

    // A mount that cannot start reports the background process's error, and leaves nothing.
    let missing = format!("{}/mnt/missing:v1", registry.host());
    let err = reader.fails(&["mount", &missing, mnt_arg, "--plain-http", "--daemon"]);
    assert!(err.contains("missing"), "{err}");
    assert!(
        !fs::read_to_string("/proc/mounts")
            .expect("mounts")
            .contains(mnt_arg),
        "a failed daemon left a mount"
    );
}

#[test]
fn prefetch_fetches_small_files_before_the_weights() {
    let Some(m) = pushed_model_to_mount("mnt/prefetch:v1", 12 << 20) else {
        return;
    };
    // 2 MiB/s per connection: the 12 MiB weight takes seconds, the small files milliseconds.
    let (_proxy, slow) = m.through_proxy(Some(2 << 20));
    let mount = Mount::in_fresh_store(&slow, &["--prefetch"]);
    let local = |status: &serde_json::Value, path: &str| {
        status["files"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["path"] == path)
            .and_then(|f| f["local"].as_f64())
            .unwrap_or_default()
    };
    let status = util::poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let status = mount.status();
        if local(&status, "config.json") >= 100.0
            && local(&status, "nested/deeper/notes.md") >= 100.0
        {
            Ok(status)
        } else {
            Err(format!("small files not prefetched: {status}"))
        }
    });
    let weight = local(&status, "model.safetensors");
    assert!(
        weight < 50.0,
        "the weight ({weight}% local) was fetched before the small files"
    );
    // And everything arrives in the background.
    util::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || local(&mount.status(), "model.safetensors") >= 100.0,
        || format!("prefetch did not finish: {}", mount.status()),
    );
}

#[test]
fn tar_and_seekable_zstd_layers_are_read_lazily_and_gzip_on_first_read() {
    if !util::can_fuse() {
        return;
    }
    let weight = util::pseudo_random(48 << 20, 0x7a57_0001);
    let Some(m) = util::registry_and_model("lazy/tar:v1", |s| {
        util::write_model_dir(
            s,
            "model",
            &[
                ("model.safetensors", &weight),
                ("config.json", br#"{"model_type":"lazy-tar"}"#),
            ],
        )
    }) else {
        return;
    };
    let (registry, s, dir, _) = m.parts();
    for (tag, extra, lazy) in [
        ("tar", vec!["--layer-format", "tar"], true),
        (
            "zstd",
            vec!["--layer-format", "tar", "--compress", "zstd"],
            true,
        ),
        (
            "gzip",
            vec!["--layer-format", "tar", "--compress", "gzip"],
            false,
        ),
    ] {
        let reference = format!("{}/lazy/{tag}:v1", registry.host());
        s.build_and_push_with(dir, &reference, &extra);
        let proxy = Proxy::start(registry.port, None);
        let via = format!("{}/lazy/{tag}:v1", proxy.host());
        let mount = Mount::in_fresh_store(&via, &[]);
        let at_mount = proxy.served();
        if lazy {
            assert!(
                at_mount < 8 << 20,
                "{tag}: mounting fetched {at_mount} bytes of a 48 MiB layer"
            );
            // 1 MiB from the middle of the weight: a few chunks, the right bytes.
            let mut file = fs::File::open(mount.dir.join("model.safetensors")).expect("open");
            file.seek(SeekFrom::Start(24 << 20)).expect("seek");
            let mut buf = vec![0u8; 1 << 20];
            file.read_exact(&mut buf).expect("read");
            assert!(buf == weight[24 << 20..25 << 20], "{tag}: wrong bytes");
            let for_read = proxy.served() - at_mount;
            eprintln!("{tag}: mount fetched {at_mount} bytes, a 1 MiB read {for_read}");
            assert!(
                for_read <= 6 << 20,
                "{tag}: a 1 MiB read fetched {for_read} bytes"
            );
        } else {
            // gzip cannot be read in place: its one file is shown from the annotations, and the
            // layer is fetched, verified and unpacked on the first read.
            assert!(
                at_mount < 64 << 10,
                "{tag}: mounting fetched {at_mount} bytes"
            );
            let meta = fs::metadata(mount.dir.join("model.safetensors")).expect("stat");
            assert_eq!(
                meta.len(),
                weight.len() as u64,
                "{tag}: size from the annotations"
            );
            let mut file = fs::File::open(mount.dir.join("model.safetensors")).expect("open");
            let mut head = vec![0u8; 4096];
            file.read_exact(&mut head).expect("read");
            assert!(head == weight[..4096], "{tag}: wrong bytes");
            let for_read = proxy.served() - at_mount;
            assert!(
                for_read >= 40 << 20,
                "{tag}: the first read fetched only {for_read} bytes of a gzip layer"
            );
        }
        assert_eq!(
            util::sha256_file(&mount.dir.join("model.safetensors")),
            util::sha256_hex(&weight),
            "{tag}"
        );
        assert_eq!(
            fs::read(mount.dir.join("config.json")).expect("config"),
            br#"{"model_type":"lazy-tar"}"#
        );
    }
}

#[test]
fn a_gzip_layer_that_lies_about_its_file_fails_the_read_and_shows_nothing_else() {
    if !util::can_fuse() {
        return;
    }
    let Some(registry) = Registry::start(None) else {
        return;
    };
    // The annotations say the layer holds `w.bin` (10 bytes); the tar holds `evil.txt`.
    let s = Scratch::new();
    let tar_bytes = util::tar_of_one_file("evil.txt", 0o644, b"evil");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar_bytes).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let (layer, _) = util::annotated_layer(
        &s.store(),
        "application/vnd.cncf.model.weight.v1.tar+gzip",
        &gz,
        "w.bin",
        Some(util::file_metadata("w.bin", 10)),
    );
    let diff_id = format!("sha256:{}", util::sha256_hex(&tar_bytes));
    let reference = format!("{}/mnt/liar:v1", registry.host());
    util::tag_crafted_model(&s, &reference, &[(layer, diff_id)]);
    s.ok(&["push", &reference, "--plain-http"]);

    let mount = Mount::in_fresh_store(&reference, &[]);
    let names: Vec<String> = fs::read_dir(&mount.dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["w.bin".to_owned()]);
    let err = fs::read(mount.dir.join("w.bin")).expect_err("a lying layer was served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(!mount.dir.join("evil.txt").exists());
}
