//! Crash tests: `kill -9` of build, push and pull at seeded random points. After each kill the
//! store must be consistent (`store check`), the registry must name only complete artifacts, and
//! the same command run again must complete with the same digest and the same files.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{self, Proxy, Registry, Scratch};

/// Seeds of the kill points; each gives a point in (5%, 95%) of an uninterrupted run.
const SEEDS: [u64; 4] = [0x5eed_0001, 0x5eed_0002, 0x5eed_0003, 0x5eed_0004];

/// A model of several files (two large weights, small configs, a nested folder).
fn model(s: &Scratch, weight: usize) -> String {
    let dir = s.path("model");
    util::write_files(
        &dir,
        &[
            (
                "model-00001.safetensors",
                &util::pseudo_random(weight, 0xc4a5_0001),
            ),
            (
                "model-00002.safetensors",
                &util::pseudo_random(weight / 2, 0xc4a5_0002),
            ),
            ("config.json", br#"{"model_type":"crash"}"#),
            ("tokenizer/vocab.txt", b"a\nb\nc\n"),
        ],
    );
    dir.to_str().expect("utf8").to_owned()
}

/// The kill point for `seed`: a fraction of `full` between 5% and 95%.
fn kill_point(seed: u64, full: Duration) -> Duration {
    let bytes = util::pseudo_random(8, seed);
    let x = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let permille = 50 + x % 900;
    full.mul_f64(permille as f64 / 1000.0)
}

/// Runs `modelpack ARGS` against the scratch store, kills it with SIGKILL after `after`, and
/// says whether it was still running then.
fn run_and_kill(s: &Scratch, args: &[&str], after: Duration) -> bool {
    let mut child = s
        .command(args)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let running = child.try_wait().expect("wait").is_none();
    child.kill().expect("kill -9");
    let _ = child.wait();
    running
}

/// Builds are reproducible under `SOURCE_DATE_EPOCH`: a rebuild after a kill must give the
/// same digest.
const EPOCH: &str = "1700000000";

/// Runs `modelpack ARGS` to success (with [`EPOCH`]) and returns its stdout.
fn ok(s: &Scratch, args: &[&str]) -> String {
    let out = s.run_env(args, &[("SOURCE_DATE_EPOCH", EPOCH)]);
    util::assert_success(&out, args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Times one uninterrupted `modelpack ARGS` and returns its stdout.
fn timed(s: &Scratch, args: &[&str]) -> (Duration, String) {
    let start = Instant::now();
    let out = ok(s, args);
    (start.elapsed(), out)
}

/// Asserts that `hit` kills of `what` (one per seed) came before it had finished.
fn assert_some_kills_landed_mid_run(what: &str, hit: usize) {
    eprintln!("{what}: {hit} of {} kills landed mid-run", SEEDS.len());
    assert!(hit > 0, "every kill came after the {what} had finished");
}

fn assert_consistent(s: &Scratch) {
    let out = s.run(&["store", "check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("consistent"),
        "store check after a kill: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn build_killed_at_random_points_leaves_a_consistent_store() {
    let s = Scratch::new();
    let dir = model(&s, 192 << 20);
    let (first, digest) = timed(&s, &["-q", "build", &dir, "-t", "crash:v1"]);
    // Timed again with the source in the page cache, as the killed builds will find it.
    let (second, _) = timed(&Scratch::new(), &["-q", "build", &dir, "-t", "crash:v1"]);
    let full = first.min(second);
    let mut hit = 0;
    for seed in SEEDS {
        let c = Scratch::new();
        let at = kill_point(seed, full);
        hit += usize::from(run_and_kill(&c, &["build", &dir, "-t", "crash:v1"], at));
        assert_consistent(&c);
        let listed = c.ok(&["ls"]);
        assert!(
            !listed.contains("crash") || c.run(&["inspect", "crash:v1"]).status.success(),
            "a killed build names an incomplete model: {listed}"
        );
        let again = ok(&c, &["-q", "build", &dir, "-t", "crash:v1"]);
        assert_eq!(
            again.trim(),
            digest.trim(),
            "seed {seed:#x}: rebuilt digest"
        );
        assert_consistent(&c);
    }
    assert_some_kills_landed_mid_run("build", hit);
}

#[test]
fn push_killed_at_random_points_then_pushed_again_is_complete() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let dir = model(&s, 48 << 20);
    // 16 MiB/s per connection: a push lasts a few seconds.
    let proxy = Proxy::start(registry.port, Some(16 << 20));
    let mut hit = 0;
    let mut full = None;
    for (n, seed) in SEEDS.iter().enumerate() {
        let reference = format!("{}/crash/push{n}:v1", proxy.host());
        s.ok(&["build", &dir, "-t", &reference]);
        let full = *full.get_or_insert_with(|| {
            // Time one uninterrupted push to another repository.
            let timing = format!("{}/crash/timing:v1", proxy.host());
            s.ok(&["tag", &reference, &timing]);
            timed(&s, &["push", &timing, "--plain-http"]).0
        });
        let at = kill_point(*seed, full);
        hit += usize::from(run_and_kill(&s, &["push", &reference, "--plain-http"], at));
        assert_consistent(&s);
        // The registry names the artifact only once it is whole: a pull either finds no tag or
        // gets every byte.
        let probe = Scratch::new();
        let direct = format!("{}/crash/push{n}:v1", registry.host());
        let pulled = probe.run(&["pull", &direct, "--plain-http"]);
        if pulled.status.success() {
            assert_consistent(&probe);
        } else {
            let err = String::from_utf8_lossy(&pulled.stderr);
            assert!(
                err.contains("not found") || err.contains("404") || err.contains("unknown"),
                "seed {seed:#x}: a killed push left a broken artifact: {err}"
            );
        }
        s.ok(&["push", &reference, "--plain-http"]);
        assert_eq!(
            util::pulled_tree(&direct),
            util::tree(Path::new(&dir)),
            "seed {seed:#x}"
        );
    }
    assert_some_kills_landed_mid_run("push", hit);
}

#[test]
fn pull_killed_at_random_points_resumes_to_the_same_files() {
    let Some(m) = util::registry_with_pushed_model("crash/pull:v1", |s| model(s, 48 << 20)) else {
        return;
    };
    let (_proxy, slow) = m.through_proxy(Some(16 << 20));
    let (dir, reference) = (&m.dir, &m.reference);
    let (full, _) = timed(&Scratch::new(), &["pull", &slow, "--plain-http"]);
    let mut hit = 0;
    for seed in SEEDS {
        let c = Scratch::new();
        hit += usize::from(run_and_kill(
            &c,
            &["pull", &slow, "--plain-http"],
            kill_point(seed, full),
        ));
        assert_consistent(&c);
        c.ok(&["pull", reference, "--plain-http"]);
        assert_consistent(&c);
        let out = c.path("out");
        c.ok(&["extract", reference, out.to_str().expect("utf8")]);
        assert_eq!(
            util::tree(&out),
            util::tree(Path::new(dir)),
            "seed {seed:#x}"
        );
    }
    assert_some_kills_landed_mid_run("pull", hit);
}
