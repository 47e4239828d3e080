//! Readahead of `modelpack mount` grows with evidence: a header read of a cold weight fetches
//! little, a sequential reader still gets chunks fetched well ahead of it, from a few long
//! requests rather than one per run of readahead, over a fast link and a slow one.

use std::fs;
use std::io::Read as _;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::util::{self, Proxy};

/// Waits until `proxy` has served nothing new for a while (readahead started by a read runs
/// after its reply); returns what it served by then.
fn settled(proxy: &Proxy) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = proxy.served();
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(50));
        let now = proxy.served();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// A model of one `size`-byte weight (seeded with `seed`) and a config.json, in `s`.
fn weight_model(s: &util::Scratch, size: usize, seed: u64) -> std::path::PathBuf {
    util::model_with_weight(s, size, seed, &[("config.json", br#"{"model_type":"ra"}"#)])
}

#[test]
fn a_header_read_fetches_little_and_a_sequential_reader_earns_readahead() {
    const WEIGHT: usize = 256 << 20;
    let Some((m, proxy, mount)) =
        util::mounted_through_proxy("ra/header:v1", |s| weight_model(s, WEIGHT, 7), &[])
    else {
        return;
    };
    let weight = mount.dir.join("model.safetensors");
    let at_mount = settled(&proxy);

    // What a safetensors loader reads first: 4 KiB at offset 0.
    let mut file = fs::File::open(&weight).expect("open");
    let mut head = vec![0u8; 4096];
    file.read_exact(&mut head).expect("read");
    assert!(head == util::pseudo_random(4096, 7), "wrong bytes");
    let header = settled(&proxy) - at_mount;
    eprintln!("a 4 KiB read at offset 0 fetched {header} bytes");
    assert!(
        header <= 4 << 20,
        "a 4 KiB read at offset 0 of a cold 256 MiB weight fetched {header} bytes"
    );

    // Reading on in sequence earns readahead: well past what the kernel asks ahead (4 MiB).
    let mut rest = vec![0u8; 32 << 20];
    file.read_exact(&mut rest).expect("read on");
    let sequential = settled(&proxy) - at_mount;
    eprintln!("32 MiB more in sequence: {sequential} bytes fetched in all");
    assert!(
        sequential >= 48 << 20,
        "a sequential reader of 32 MiB got no readahead: {sequential} bytes fetched"
    );
    drop(file);
    assert_eq!(
        util::sha256_file(&weight),
        util::sha256_file(&m.dir.join("model.safetensors"))
    );
}

#[test]
fn a_cold_sequential_read_costs_the_registry_few_requests() {
    const WEIGHT: usize = 256 << 20;
    let Some(m) = util::pushed_model_to_mount("ra/stream:v1", |s| weight_model(s, WEIGHT, 13))
    else {
        return;
    };
    // Straight from the registry: a proxy in the way would be the slow link of the next test.
    let mount = util::Mount::in_fresh_store(&m.reference, &[]);
    let fetches = || mount.status()["fetches"].as_u64().expect("fetches");
    let mut file = fs::File::open(mount.dir.join("model.safetensors")).expect("open");
    let mut hasher = Sha256::new();
    // The first 32 MiB: readahead grows (a few chunks on their own, then runs).
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..32 {
        file.read_exact(&mut piece).expect("read");
        hasher.update(&piece);
    }
    let growing = fetches();
    // The other 224 MiB: in runs of readahead (32 MiB each) that was 8 ranged GETs; one stream
    // serves the reader now.
    std::io::copy(&mut file, &mut hasher).expect("read on");
    assert_eq!(
        hex::encode(hasher.finalize()),
        util::sha256_file(&m.dir.join("model.safetensors")),
        "wrong bytes"
    );
    let streaming = fetches() - growing;
    eprintln!("a cold 256 MiB read: {growing} GETs in its first 32 MiB, {streaming} after");
    assert!(
        streaming <= 3,
        "the last 224 MiB of a cold read took {streaming} GETs: {}",
        mount.status()
    );
}

#[test]
fn over_a_slow_link_a_sequential_reader_gets_every_byte_once() {
    const WEIGHT: usize = 64 << 20;
    let Some(m) = util::pushed_model_to_mount("ra/slow:v1", |s| weight_model(s, WEIGHT, 17)) else {
        return;
    };
    // 16 MiB/s per connection: the stream is slow, so runs go beside it; every byte still
    // comes once.
    let (proxy, via) = m.through_proxy(Some(16 << 20));
    let mount = util::Mount::in_fresh_store(&via, &[]);
    assert_eq!(
        util::sha256_file(&mount.dir.join("model.safetensors")),
        util::sha256_file(&m.dir.join("model.safetensors"))
    );
    let served = proxy.served();
    assert!(
        served <= WEIGHT as u64 + (4 << 20),
        "the registry sent {served} bytes for a {WEIGHT}-byte weight read once"
    );
}
