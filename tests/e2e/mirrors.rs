//! Registry mirrors from containerd's `hosts.toml` (`--hosts-dir`): a `docker-registry` in proxy
//! mode (a pull-through cache of the first) is the mirror, with a counting link in front of each
//! registry. `pull` and `mount` fetch from the mirror and give the same bytes; a mirror stopped
//! in the middle of a lazy read, or one that corrupts what it serves, only sends the requests on
//! to the upstream.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use modelpack_testkit::fault::{Fault, FaultProxy, Rule};
use modelpack_testkit::registry::{Registry as TestRegistry, RegistryOptions, write_hosts_toml};

use crate::util::{self, ModelOnRegistry, Mount, Proxy, Scratch};

/// A model on an upstream registry, a pull-through mirror of it, a counting link in front of
/// each, and a hosts folder whose file for the upstream link names the mirror.
struct Mirrored {
    m: ModelOnRegistry<PathBuf>,
    _mirror: TestRegistry,
    up: Proxy,
    mirror: Proxy,
    /// The model named through the upstream link (the registry the hosts file is for).
    via: String,
    hosts: tempfile::TempDir,
}

impl Mirrored {
    /// The hosts folder, as the flag's value.
    fn hosts_dir(&self) -> &str {
        self.hosts.path().to_str().expect("utf8")
    }

    /// `pull REF -o OUT --hosts-dir HOSTS` by a fresh store; the store (to keep) and OUT.
    fn pull_out(&self) -> (Scratch, PathBuf) {
        let reader = Scratch::new();
        let out = reader.path("out");
        reader.ok(&[
            "pull",
            &self.via,
            "-o",
            out.to_str().expect("utf8"),
            "--hosts-dir",
            self.hosts_dir(),
        ]);
        (reader, out)
    }

    /// Writes the upstream's `hosts.toml`: the mirror at `mirror_host` with `capabilities`.
    fn write_hosts(&self, mirror_host: &str, capabilities: &str) {
        let upstream = self.up.host();
        write_hosts_toml(
            self.hosts.path(),
            &upstream,
            &upstream,
            mirror_host,
            capabilities,
        )
        .expect("write hosts.toml");
    }
}

/// `None` when `docker-registry` is missing (outside `cargo xtask test`).
fn mirrored(repo_tag: &str, weight: usize, mirror_rate: Option<u64>) -> Option<Mirrored> {
    let m = util::registry_with_pushed_model(repo_tag, |s| {
        util::model_with_weight(s, weight, 11, &[("config.json", br#"{"model_type":"m"}"#)])
    })?;
    let remote = format!("http://127.0.0.1:{}", m.registry.port);
    let mirror = TestRegistry::start(RegistryOptions {
        proxy_of: Some(&remote),
        ..RegistryOptions::default()
    })
    .expect("start the mirror");
    let (up, via) = m.through_proxy(None);
    let mirror_link = Proxy::start(mirror.port, mirror_rate);
    let mirrored = Mirrored {
        m,
        _mirror: mirror,
        up,
        mirror: mirror_link,
        via,
        hosts: tempfile::tempdir().expect("tempdir"),
    };
    mirrored.write_hosts(&mirrored.mirror.host(), "[\"pull\"]");
    Some(mirrored)
}

/// What `link` served, once the last bytes in flight are counted.
fn settled(link: &Proxy) -> u64 {
    std::thread::sleep(Duration::from_millis(500));
    link.served()
}

fn weight_of(dir: &Path) -> String {
    util::sha256_file(&dir.join("model.safetensors"))
}

#[test]
fn pull_and_mount_fetch_from_the_mirror_and_tags_resolve_at_the_upstream() {
    const WEIGHT: usize = 8 << 20;
    let Some(x) = mirrored("mirror/pull:v1", WEIGHT, None) else {
        return;
    };
    // A pull-only mirror: the tag resolves at the upstream, every blob comes from the mirror.
    let (_reader, out) = x.pull_out();
    let direct = util::pulled_tree(&x.m.reference);
    assert_eq!(util::tree(&out), direct, "pulled files differ");
    let (up, mirror) = (settled(&x.up), settled(&x.mirror));
    eprintln!("pull: {mirror} bytes from the mirror, {up} from the upstream");
    assert!(mirror >= WEIGHT as u64, "{mirror}");
    assert!(up > 0 && up < 256 << 10, "{up}");

    // Without the hosts folder everything comes from the upstream.
    let plain = Scratch::new();
    plain.ok(&["pull", &x.via, "--plain-http", "--hosts-dir", ""]);
    assert!(settled(&x.up) >= up + WEIGHT as u64);

    if !util::can_fuse() {
        return;
    }
    let (up, mirror) = (settled(&x.up), settled(&x.mirror));
    let mount = Mount::in_fresh_store(&x.via, &["--hosts-dir", x.hosts_dir()]);
    assert_eq!(weight_of(&mount.dir), weight_of(&x.m.dir));
    assert_eq!(
        std::fs::read(mount.dir.join("config.json")).expect("read"),
        br#"{"model_type":"m"}"#
    );
    let (up_mount, mirror_mount) = (settled(&x.up) - up, settled(&x.mirror) - mirror);
    eprintln!("mount: {mirror_mount} bytes from the mirror, {up_mount} from the upstream");
    assert!(mirror_mount >= WEIGHT as u64, "{mirror_mount}");
    assert!(up_mount < 256 << 10, "{up_mount}");
}

#[test]
fn a_mirror_stopped_in_the_middle_of_a_lazy_read_is_left_for_the_upstream() {
    const WEIGHT: usize = 256 << 20;
    if !util::can_fuse() {
        return;
    }
    // 64 MiB/s per connection through the mirror, so the read is still going when it stops.
    let Some(x) = mirrored("mirror/stop:v1", WEIGHT, Some(64 << 20)) else {
        return;
    };
    x.write_hosts(&x.mirror.host(), "[\"pull\", \"resolve\"]");
    let mount = Mount::in_fresh_store(&x.via, &["--hosts-dir", x.hosts_dir()]);
    let weight = mount.dir.join("model.safetensors");
    let reader = std::thread::spawn(move || util::sha256_file(&weight));
    let started = Instant::now();
    while x.mirror.served() < 48 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the mirror served {} bytes",
            x.mirror.served()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    x.mirror.down.store(true, Ordering::SeqCst);
    let at_stop = x.mirror.served();
    let read = reader.join().expect("the read completes with no error");
    assert_eq!(read, weight_of(&x.m.dir), "wrong bytes after the switch");
    let up = settled(&x.up);
    eprintln!("mirror stopped after {at_stop} bytes; {up} bytes came from the upstream");
    assert!(up >= (WEIGHT as u64) - at_stop - (64 << 20), "{up}");
    drop(mount);
}

#[test]
fn a_corrupting_mirror_serves_nothing_wrong_and_pull_completes_from_the_upstream() {
    const WEIGHT: usize = 6 << 20;
    let Some(x) = mirrored("mirror/corrupt:v1", WEIGHT, None) else {
        return;
    };
    let faults = FaultProxy::start(x.mirror.port);
    x.write_hosts(&faults.host(), "[\"pull\"]");
    faults.add(Rule::new(
        Some("GET"),
        "/blobs/sha256:",
        1000,
        Fault::FlipByte(4096),
    ));
    let (_reader, out) = x.pull_out();
    assert_eq!(
        util::tree(&out),
        util::pulled_tree(&x.m.reference),
        "pulled files differ"
    );
    assert!(faults.applied() > 0, "the mirror was asked and corrupted");
    assert!(
        settled(&x.up) >= WEIGHT as u64,
        "the upstream served the weight"
    );

    if !util::can_fuse() {
        return;
    }
    // A lazy read: a chunk from the mirror that fails its check is never served.
    let mount = Mount::in_fresh_store(&x.via, &["--hosts-dir", x.hosts_dir()]);
    let expected = util::pseudo_random(WEIGHT, 11);
    match std::fs::read(mount.dir.join("model.safetensors")) {
        Ok(bytes) => assert!(bytes == expected, "wrong bytes were served"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
}
