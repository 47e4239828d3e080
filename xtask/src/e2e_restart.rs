//! The containerd check that reads survive the snapshotter: a container hashes a 256 MiB weight
//! read lazily through a throttled link, and in the middle of the read the snapshotter is killed
//! (`kill -9`), stopped (SIGTERM), killed and kept down for 10 s, or upgraded (stopped, then
//! started from another copy of the binary), then started again. The
//! container's read waits and completes: its exit code is 0 and its digest the source's. How
//! long the read stalled (from the stop until bytes flow again) is printed for
//! docs/reliability.md.

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::e2e::{Rig, one_weight_model};
use modelpack_testkit::link::Link;

/// Each connection's rate through the link: the read takes several seconds.
const RATE: u64 = 24 << 20;
/// The weight's size.
const WEIGHT: u64 = 256 << 20;
/// Bytes fetched before the snapshotter is stopped.
const STOP_AFTER: u64 = 48 << 20;

/// How the snapshotter goes away.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Kill,
    Graceful,
    KillAndWait(Duration),
    Upgrade,
}

impl Stop {
    fn name(self) -> String {
        match self {
            Stop::Kill => "kill -9, started again at once".into(),
            Stop::Graceful => "SIGTERM (graceful stop), started again at once".into(),
            Stop::KillAndWait(d) => format!("kill -9, down for {} s", d.as_secs()),
            Stop::Upgrade => "upgrade: SIGTERM, started from a new copy of the binary".into(),
        }
    }
}

/// One scenario's outcome.
#[derive(Debug)]
pub struct Stall {
    /// What was done.
    pub scenario: String,
    /// From the stop until the new snapshotter answered.
    pub daemon_away: Duration,
    /// From the stop until the read moved again.
    pub read_stalled: Duration,
    /// The whole read, as the container saw it.
    pub read_took: Duration,
}

/// Runs the three scenarios on `rig` with the runnable `image`. Returns the link the models are
/// served through: it must outlive the rig's later restarts, which remount them.
pub fn reads_survive_restarts(rig: &mut Rig, image: &str) -> anyhow::Result<(Link, Vec<Stall>)> {
    println!("== 8. a container's read survives the snapshotter's restart");
    let link = Link::start(rig.registry.port, Some(RATE));
    let mut stalls = Vec::new();
    for (n, stop) in [
        Stop::Kill,
        Stop::Graceful,
        Stop::KillAndWait(Duration::from_secs(10)),
        Stop::Upgrade,
    ]
    .into_iter()
    .enumerate()
    {
        let stall =
            one(rig, image, &link, n, stop).with_context(|| format!("scenario {}", stop.name()))?;
        println!(
            "   ok: {}: daemon away {:.2} s, read stalled {:.2} s, read took {:.2} s; right digest, exit 0",
            stall.scenario,
            stall.daemon_away.as_secs_f64(),
            stall.read_stalled.as_secs_f64(),
            stall.read_took.as_secs_f64()
        );
        stalls.push(stall);
    }
    Ok((link, stalls))
}

fn one(rig: &mut Rig, image: &str, link: &Link, n: usize, stop: Stop) -> anyhow::Result<Stall> {
    let model = rig.path(&format!("model-restart-{n}"));
    let weight = ("model.safetensors", WEIGHT, 100 + n as u64);
    let want = one_weight_model(&model, weight, "restart")?;
    let reference = format!("{}/e2e/restart-{n}:v1", link.host());
    rig.build_and_push(&model, &reference)?;
    let view = rig.path(&format!("view-restart-{n}"));
    rig.pull_and_mount(&reference, &view)?;

    let before = link.served();
    let started = Instant::now();
    // The container keeps the weight open (fd 3) from before the stop until after a second
    // container opened it again once it is complete: the kernel then holds the inode in
    // page-cache mode, and the new snapshotter must not answer that second open with kernel
    // passthrough (the kernel would refuse it with EIO).
    let mut container = rig
        .containerd
        .run_with_models(
            image,
            &format!("e2e-restart-{n}"),
            &view,
            &[
                "sh",
                "-c",
                "exec 3</models/model.safetensors; sha256sum /models/model.safetensors; sleep 6",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the container")?;
    let lines = lines_of(container.stdout.take());
    let errors = lines_of(container.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(60);
    while link.served() - before < STOP_AFTER {
        ensure!(
            Instant::now() < deadline,
            "the container read only {} bytes in 60 s",
            link.served() - before
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let log_before = rig.snapshotter.log_text().len();
    let stopped = Instant::now();
    match stop {
        Stop::Kill => rig.snapshotter.kill9(),
        Stop::Graceful => rig.snapshotter.terminate()?,
        Stop::KillAndWait(d) => {
            rig.snapshotter.kill9();
            std::thread::sleep(d);
        }
        Stop::Upgrade => {
            rig.snapshotter.terminate()?;
            let new = rig.path("upgraded/modelpack-snapshotter");
            fs::create_dir_all(rig.path("upgraded"))?;
            fs::copy(&rig.bins.snapshotter, &new)?;
            rig.snapshotter.set_binary(&new);
        }
    }
    let fetched_while_stopped = link.served();
    rig.snapshotter.start_again()?;
    let daemon_away = stopped.elapsed();
    // Bytes flowing again (a little more than what was in flight when it stopped).
    let deadline = Instant::now() + Duration::from_secs(60);
    while link.served() < fetched_while_stopped + (1 << 20) {
        ensure!(
            Instant::now() < deadline,
            "the read did not resume within 60 s of the restart"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let read_stalled = stopped.elapsed();

    let failed = |what: &str| {
        anyhow::anyhow!(
            "{what}; container output: {}\nsnapshotter log:\n{}",
            errors.try_iter().collect::<Vec<_>>().join("\n"),
            tail(&rig.snapshotter.log_text(), 30)
        )
    };
    let got = lines
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| failed("the container printed no digest within 120 s of the restart"))?;
    let read_took = started.elapsed();
    let got = got.split_whitespace().next().unwrap_or_default().to_owned();
    ensure!(
        got == want,
        "the container read other bytes: {got} (want {want})"
    );
    // The second open, while the first container still holds the file open.
    let again = rig.containerd.run_with_models_ok(
        image,
        &format!("e2e-restart-{n}-again"),
        &view,
        &["sha256sum", "/models/model.safetensors"],
    )?;
    ensure!(
        again.split_whitespace().next() == Some(want.as_str()),
        "a second container opening the weight after the restart read {again:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = container.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = container.kill();
            let _ = container.wait();
            return Err(failed("the first container did not exit"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        return Err(failed(&format!("the container failed ({status})")));
    }

    let log = rig.snapshotter.log_text();
    let log = log.get(log_before..).unwrap_or_default();
    ensure!(
        log.contains("adopted the FUSE connection"),
        "the new snapshotter did not adopt the FUSE connections:\n{}",
        tail(log, 30)
    );
    for bad in [
        "cannot adopt",
        "mounting afresh",
        "cannot resend",
        "Reply not sent",
    ] {
        ensure!(
            !log.contains(bad),
            "the restart logged {bad:?}:\n{}",
            tail(log, 30)
        );
    }
    if matches!(stop, Stop::Graceful | Stop::Upgrade) {
        ensure!(
            log.contains("left the FUSE connections to the holder"),
            "the stopped snapshotter did not leave its connections to the holder:\n{}",
            tail(log, 30)
        );
    }
    rig.containerd.wait_for_snapshotter()?;
    rig.modelpack_containerd("umount", &[&view.display().to_string()])?;
    rig.mounted.retain(|d| d != &view);
    Ok(Stall {
        scenario: stop.name(),
        daemon_away,
        read_stalled,
        read_took,
    })
}

/// The lines `pipe` gives, as they come (read on a thread of their own).
fn lines_of(
    pipe: Option<impl std::io::Read + Send + 'static>,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(pipe) = pipe {
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
