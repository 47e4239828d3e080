//! `modelpack mount --cache-max`: a 1 GiB model read twice through a mount whose chunk cache is
//! capped at 256 MiB. The cache folder never holds more than the cap plus one readahead window,
//! every byte read is right, and the evictions and refetches are counted in the status.

use modelpack_testkit::disk::{PeakUsage, usage};

use crate::util;

const WEIGHT: usize = 1 << 30;
const CAP: u64 = 256 << 20;
/// The most readahead may have in flight beyond the cap: 32 chunks of 2 MiB (readahead.rs).
const WINDOW: u64 = 32 * (2 << 20);

#[test]
fn a_capped_cache_stays_under_its_cap_while_a_large_model_is_read_twice() {
    let Some((m, proxy, mount)) = util::mounted_through_proxy(
        "cache/capped:v1",
        |s| util::model_with_weight(s, WEIGHT, 31, &[("config.json", br#"{"model_type":"c"}"#)]),
        &["--cache-max", "256MiB"],
    ) else {
        return;
    };
    let source = util::sha256_file(&m.dir.join("model.safetensors"));
    let cache = mount.store().join("cache");
    let sampler = PeakUsage::start(cache.clone());
    let weight = mount.dir.join("model.safetensors");
    for pass in 0..2 {
        // The second pass must come through the mount, not the page cache.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        assert_eq!(
            util::sha256_file(&weight),
            source,
            "pass {pass}: wrong bytes"
        );
        eprintln!(
            "pass {pass}: cache folder peak {} MiB, registry served {} MiB",
            sampler.peak() >> 20,
            proxy.served() >> 20
        );
    }
    let peak = sampler.peak();
    drop(sampler);
    assert!(
        peak <= CAP + WINDOW,
        "the cache folder held {peak} bytes, over the cap {CAP} plus one readahead window"
    );
    let status = mount.status();
    let stats = &status["cache"];
    assert_eq!(stats["maxBytes"].as_u64(), Some(CAP), "{status}");
    assert!(
        stats["bytes"].as_u64().is_some_and(|b| b <= CAP),
        "{status}"
    );
    assert!(
        stats["evictions"].as_u64().is_some_and(|e| e >= 384),
        "a 1 GiB read under a 256 MiB cap evicts at least 384 chunks: {status}"
    );
    assert!(
        stats["refetches"].as_u64().is_some_and(|r| r > 0),
        "the second pass fetched nothing again: {status}"
    );
    assert_eq!(status["refetches"], stats["refetches"], "{status}");
    // Both passes came from the registry (the cache could not keep the first).
    assert!(
        proxy.served() > (WEIGHT as u64) * 3 / 2,
        "{}",
        proxy.served()
    );
    assert!(usage(&cache) <= CAP + WINDOW);
}
