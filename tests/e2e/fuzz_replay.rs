//! Replays every input under `fuzz/corpus/<target>` (the seeds, and every crash a fuzz run found,
//! once copied there) through the same harness the cargo-fuzz targets use: none may panic.

#[path = "../../fuzz/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus folder") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panics", path.display());
        count += 1;
    }
    assert!(count > 0, "{target}: empty corpus");
}

#[test]
fn fuzz_corpora_replay_without_a_panic() {
    replay("manifest", harness::manifest);
    replay("config", harness::config);
    replay("modelfile", harness::modelfile);
    replay("tar_index", harness::tar_index);
    replay("zstd_seek_table", harness::zstd_seek_table);
}
