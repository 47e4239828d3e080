//! A client notices an edited, broken, new or removed `hosts.toml` without being built again
//! (long-running daemons), within about a second. Small blob servers on loopback stand for the
//! upstream and the mirrors; which one a request reached is read from their counters.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use modelpack_registry::{Client, ClientOptions, Repository};
use modelpack_spec::Digest;
use modelpack_testkit::blob_server::BlobServer;

/// Longer than the client's re-check interval (1 s).
const RECHECK: Duration = Duration::from_millis(1100);

fn blob() -> Arc<Vec<u8>> {
    Arc::new((0..100_000usize).map(|i| (i * 13 + i / 97) as u8).collect())
}

/// The three servers, all serving the same blob honestly.
struct Hosts {
    upstream: BlobServer,
    a: BlobServer,
    b: BlobServer,
    data: Arc<Vec<u8>>,
    digest: Digest,
}

fn hosts() -> Hosts {
    let data = blob();
    Hosts {
        upstream: BlobServer::start(data.clone(), Vec::new()),
        a: BlobServer::start(data.clone(), Vec::new()),
        b: BlobServer::start(data.clone(), Vec::new()),
        digest: Digest::sha256_of(&data),
        data,
    }
}

/// Writes `text` as the registry's `hosts.toml` under `dir` with the modification time
/// `age_secs` seconds after a fixed past instant (so a rewrite is seen even within the clock's
/// granularity).
fn write_hosts(dir: &Path, registry: &str, text: &str, age_secs: u64) {
    let folder = dir.join(registry);
    std::fs::create_dir_all(&folder).expect("mkdir");
    let path = folder.join("hosts.toml");
    std::fs::write(&path, text).expect("write hosts.toml");
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + age_secs);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open hosts.toml")
        .set_modified(when)
        .expect("set mtime");
}

fn mirror_file(upstream: &str, mirror: &str) -> String {
    format!(
        "server = \"http://{upstream}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\"]\n"
    )
}

fn repo(dir: &Path, registry: &str) -> Repository {
    let client = Client::new(ClientOptions {
        hosts_dir: Some(dir.to_owned()),
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    Repository::new(
        &client,
        &format!("{registry}/models/m:v1")
            .parse()
            .expect("reference"),
    )
}

async fn read(repo: &Repository, h: &Hosts) {
    let mut body = repo
        .blob_stream(&h.digest, Some(1000..50_000))
        .await
        .expect("open");
    let mut out = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("read") {
        out.extend_from_slice(&piece);
    }
    assert!(out == h.data[1000..50_000], "wrong bytes");
}

/// Requests each server answered: (upstream, a, b).
fn asked(h: &Hosts) -> (usize, usize, usize) {
    (h.upstream.requests(), h.a.requests(), h.b.requests())
}

/// A client whose registry's `hosts.toml` names mirror `a`, and which has read through it once.
struct Scene {
    h: Hosts,
    dir: tempfile::TempDir,
    registry: String,
    repo: Repository,
    /// Taken just before the first read.
    started: Instant,
}

/// The three servers, a `hosts.toml` naming mirror `a`, and a client that has read through it.
async fn reading_through_mirror_a() -> Scene {
    let h = hosts();
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = h.upstream.host();
    write_hosts(
        dir.path(),
        &registry,
        &mirror_file(&registry, &h.a.host()),
        0,
    );
    let repo = repo(dir.path(), &registry);
    let started = Instant::now();
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 1, 0));
    Scene {
        h,
        dir,
        registry,
        repo,
        started,
    }
}

impl Scene {
    /// [`write_hosts`] for this scene's registry.
    fn write(&self, text: &str, age_secs: u64) {
        write_hosts(self.dir.path(), &self.registry, text, age_secs);
    }

    /// [`mirror_file`] sending this scene's registry to `mirror`.
    fn mirror_file(&self, mirror: &BlobServer) -> String {
        mirror_file(&self.registry, &mirror.host())
    }

    async fn read(&self) {
        read(&self.repo, &self.h).await;
    }

    /// Waits out the client's re-check interval, then reads.
    async fn read_after_recheck(&self) {
        tokio::time::sleep(RECHECK).await;
        self.read().await;
    }

    fn asked(&self) -> (usize, usize, usize) {
        asked(&self.h)
    }
}

#[tokio::test]
async fn an_edited_hosts_file_is_read_again_without_a_new_client() {
    let s = reading_through_mirror_a().await;

    // Same length (the ports have as many digits, most likely), another mirror.
    s.write(&s.mirror_file(&s.h.b), 10);
    // Within the re-check interval the reading stands (checked when this machine was quick
    // enough to still be within it).
    s.read().await;
    let from_a = s.asked().1;
    if s.started.elapsed() < Duration::from_millis(900) {
        assert_eq!(s.asked(), (0, 2, 0));
    }
    s.read_after_recheck().await;
    assert_eq!(
        s.asked(),
        (0, from_a, 3 - from_a),
        "the next request goes to the new mirror"
    );
    s.read().await;
    assert_eq!(s.asked(), (0, from_a, 4 - from_a));
}

#[tokio::test]
async fn a_broken_edit_keeps_the_last_good_hosts_until_it_is_fixed() {
    let s = reading_through_mirror_a().await;

    // Half written: not TOML any more.
    let half = s.mirror_file(&s.h.b);
    s.write(&half[..half.len() - 30], 10);
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (0, 2, 0), "the last good reading serves");
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (0, 3, 0));

    // A valid file naming what cannot be used (a CA that is not there): the same.
    s.write(&format!("{half}  ca = \"missing-ca.crt\"\n"), 20);
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (0, 4, 0));

    s.write(&half, 30);
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (0, 4, 1), "the fixed file is read");
}

#[tokio::test]
async fn a_removed_folder_returns_to_the_upstream_and_a_new_one_is_found() {
    let s = reading_through_mirror_a().await;

    std::fs::remove_dir_all(s.dir.path().join(&s.registry)).expect("remove the folder");
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (1, 1, 0), "the plain upstream");

    // A `_default` folder appears: it applies to every registry without its own.
    write_hosts(
        s.dir.path(),
        "_default",
        &format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            s.h.b.host()
        ),
        0,
    );
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (1, 1, 1));
}

#[tokio::test]
async fn a_fresh_client_with_a_broken_file_fails_naming_it() {
    let h = hosts();
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = h.upstream.host();
    write_hosts(dir.path(), &registry, "server = \"http://x\"\n[host", 0);
    let repo = repo(dir.path(), &registry);
    let err = repo
        .blob_stream(&h.digest, Some(0..10))
        .await
        .expect_err("a broken first reading")
        .to_string();
    assert!(err.contains("hosts.toml"), "{err}");
    assert_eq!(asked(&h), (0, 0, 0));
    // Fixed: the same client reads it (nothing was kept of the failure).
    write_hosts(
        dir.path(),
        &registry,
        &mirror_file(&registry, &h.a.host()),
        10,
    );
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 1, 0));
}

/// A self-signed CA certificate written to `path` with openssl; false (and a line saying so)
/// when openssl is not installed.
fn make_ca(path: &Path) -> bool {
    let key = path.with_extension("key");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=modelpack hosts test CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(path)
        .output();
    match made {
        Ok(out) if out.status.success() => true,
        Ok(out) => panic!("openssl failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            println!("skipped: cannot run openssl ({e}); install it to run this test");
            false
        }
    }
}

#[tokio::test]
async fn a_ca_named_outside_the_folder_is_watched_even_while_it_is_missing() {
    let s = reading_through_mirror_a().await;
    let elsewhere = tempfile::tempdir().expect("tempdir");

    // The edit names a CA in another folder that is not there yet: the last good reading stays.
    let ca = elsewhere.path().join("mirror-ca.crt");
    let edited = format!("{}  ca = \"{}\"\n", s.mirror_file(&s.h.b), ca.display());
    s.write(&edited, 10);
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (0, 2, 0), "the last good reading serves");

    // The CA appears, and nothing else in the hosts folder changes: the edit now applies.
    if !make_ca(&ca) {
        return;
    }
    s.read_after_recheck().await;
    assert_eq!(s.asked(), (0, 2, 1), "the new mirror, once its CA exists");
}
