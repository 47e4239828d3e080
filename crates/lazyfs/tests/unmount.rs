//! A mount's background work ends with it: once `unmount` returns, not one more request reaches
//! the registry, even while a `--prefetch` of a large weight was still under way (counted by a
//! throttled link in front of a real `docker-registry`). Needs root and /dev/fuse; skipped
//! elsewhere, required under `cargo xtask test` (`MODELPACK_E2E`).

use std::path::Path;
use std::time::{Duration, Instant};

use modelpack_build::{BuildOptions, LayerPlacement, Metadata};
use modelpack_lazyfs::MountOptions;
use modelpack_registry::{Client, ClientOptions, Repository};
use modelpack_spec::{Digest, Encoding, Reference};
use modelpack_store::Store;
use modelpack_testkit::link::Link;
use modelpack_testkit::registry::{Registry, RegistryOptions};
use modelpack_transfer::TransferOptions;

const WEIGHT: usize = 48 << 20;

fn can_run() -> bool {
    let registry = std::process::Command::new("sh")
        .args(["-c", "command -v docker-registry"])
        .output()
        .is_ok_and(|o| o.status.success());
    let ok = modelpack_testkit::sys::is_root() && Path::new("/dev/fuse").exists() && registry;
    assert!(
        ok || std::env::var_os("MODELPACK_E2E").is_none(),
        "this test needs root, /dev/fuse and docker-registry under cargo xtask test"
    );
    if !ok {
        eprintln!("note: no root, FUSE or docker-registry here; the unmount test is skipped");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_registry_request_after_unmount_returns() {
    if !can_run() {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    std::fs::write(
        model.join("model.safetensors"),
        modelpack_testkit::data::pseudo_random(WEIGHT, 0x9e37_79b9_7f4a_7c15),
    )
    .expect("write");
    std::fs::write(model.join("config.json"), br#"{"model_type":"t"}"#).expect("write");
    let store = Store::open(&work.path().join("store")).expect("store");
    let built = modelpack_build::build(
        &store,
        &BuildOptions {
            context: &model,
            modelfile: None,
            excludes: &[],
            encoding: Encoding::Raw,
            created: None,
            source_date_epoch: None,
            metadata: Metadata::default(),
            placement: LayerPlacement::Copy,
            concurrency: 2,
            spelling: Default::default(),
        },
        &|_| {},
    )
    .expect("build");
    let registry = Registry::start(RegistryOptions::default()).expect("registry");
    let client = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    let direct: Reference = format!("{}/lazy/unmount:v1", registry.host())
        .parse()
        .expect("reference");
    let digest: Digest = built.manifest.digest().to_string().parse().expect("digest");
    modelpack_transfer::copy(
        &store,
        digest.as_str(),
        &modelpack_transfer::Remote::new(&Repository::new(&client, &direct)),
        Some("v1"),
        &TransferOptions::new(4),
    )
    .await
    .expect("push");

    // Mounted through a link of 4 MiB/s: the prefetch of the weight takes about 12 s.
    let link = Link::start(registry.port, Some(4 << 20));
    let via: Reference = format!("{}/lazy/unmount:v1", link.host())
        .parse()
        .expect("reference");
    let mut opts = MountOptions::new(
        Repository::new(&client, &via),
        "v1",
        Store::open(&work.path().join("reader")).expect("store"),
        work.path().join("cache"),
    );
    opts.prefetch = true;
    let dir = work.path().join("mnt");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mounted = modelpack_lazyfs::mount(opts, &dir).await.expect("mount");
    let deadline = Instant::now() + Duration::from_secs(20);
    while link.served() < 4 << 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mounted.unmount().await.expect("unmount");
    let at_unmount = link.served();
    assert!(
        at_unmount < (WEIGHT as u64) - (8 << 20),
        "the prefetch finished before the unmount ({at_unmount} bytes)"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = link.served();
    assert!(
        later - at_unmount <= 512 << 10,
        "{} bytes came from the registry after unmount returned",
        later - at_unmount
    );
    assert!(!modelpack_testkit::mounts::is_mounted(&dir));
}
