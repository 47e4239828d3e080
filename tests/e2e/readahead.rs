//! Readahead of `modelpack mount` grows with evidence: a header read of a cold weight fetches
//! little, a sequential reader still gets chunks fetched well ahead of it.

use std::fs;
use std::io::Read as _;
use std::time::{Duration, Instant};

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

#[test]
fn a_header_read_fetches_little_and_a_sequential_reader_earns_readahead() {
    const WEIGHT: usize = 256 << 20;
    let Some((m, proxy, mount)) = util::mounted_through_proxy(
        "ra/header:v1",
        |s| util::model_with_weight(s, WEIGHT, 7, &[("config.json", br#"{"model_type":"ra"}"#)]),
        &[],
    ) else {
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
