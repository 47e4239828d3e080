//! A client notices an edited, broken, new or removed `hosts.toml` without being built again
//! (long-running daemons), within about a second. Small blob servers on loopback stand for the
//! upstream and the mirrors; which one a request reached is read from their counters.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

#[tokio::test]
async fn an_edited_hosts_file_is_read_again_without_a_new_client() {
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
    let started = std::time::Instant::now();
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 1, 0));

    // Same length (the ports have as many digits, most likely), another mirror.
    write_hosts(
        dir.path(),
        &registry,
        &mirror_file(&registry, &h.b.host()),
        10,
    );
    // Within the re-check interval the reading stands (checked when this machine was quick
    // enough to still be within it).
    read(&repo, &h).await;
    let from_a = asked(&h).1;
    if started.elapsed() < Duration::from_millis(900) {
        assert_eq!(asked(&h), (0, 2, 0));
    }
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(
        asked(&h),
        (0, from_a, 3 - from_a),
        "the next request goes to the new mirror"
    );
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, from_a, 4 - from_a));
}

#[tokio::test]
async fn a_broken_edit_keeps_the_last_good_hosts_until_it_is_fixed() {
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
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 1, 0));

    // Half written: not TOML any more.
    let half = mirror_file(&registry, &h.b.host());
    write_hosts(dir.path(), &registry, &half[..half.len() - 30], 10);
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 2, 0), "the last good reading serves");
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 3, 0));

    // A valid file naming what cannot be used (a CA that is not there): the same.
    write_hosts(
        dir.path(),
        &registry,
        &format!("{half}  ca = \"missing-ca.crt\"\n"),
        20,
    );
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 4, 0));

    write_hosts(dir.path(), &registry, &half, 30);
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 4, 1), "the fixed file is read");
}

#[tokio::test]
async fn a_removed_folder_returns_to_the_upstream_and_a_new_one_is_found() {
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
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 1, 0));

    std::fs::remove_dir_all(dir.path().join(&registry)).expect("remove the folder");
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (1, 1, 0), "the plain upstream");

    // A `_default` folder appears: it applies to every registry without its own.
    write_hosts(
        dir.path(),
        "_default",
        &format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            h.b.host()
        ),
        0,
    );
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (1, 1, 1));
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
    let h = hosts();
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let registry = h.upstream.host();
    write_hosts(
        dir.path(),
        &registry,
        &mirror_file(&registry, &h.a.host()),
        0,
    );
    let repo = repo(dir.path(), &registry);
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 1, 0));

    // The edit names a CA in another folder that is not there yet: the last good reading stays.
    let ca = elsewhere.path().join("mirror-ca.crt");
    let edited = format!(
        "{}  ca = \"{}\"\n",
        mirror_file(&registry, &h.b.host()),
        ca.display()
    );
    write_hosts(dir.path(), &registry, &edited, 10);
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 2, 0), "the last good reading serves");

    // The CA appears, and nothing else in the hosts folder changes: the edit now applies.
    if !make_ca(&ca) {
        return;
    }
    tokio::time::sleep(RECHECK).await;
    read(&repo, &h).await;
    assert_eq!(asked(&h), (0, 2, 1), "the new mirror, once its CA exists");
}
