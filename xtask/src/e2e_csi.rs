//! The CSI node plugin under a real container: `modelpack-csi` publishes a model volume as
//! kubelet would (over its socket, kubelet's volume context and target path), and a container
//! (`ctr run`, the target path bind-mounted as a pod's volume is) reads every file
//! byte-identical; unpublish leaves nothing mounted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use modelpack_testkit::mounts::{DetachOnDrop, mounts_under};
use modelpack_testkit::process::ChildGuard;

use crate::e2e::{Rig, make_model, tree_digests};

/// One CSI call through `modelpack-csi call`: the answer's JSON, or an error with the code.
fn call(
    csi: &Path,
    socket: &Path,
    method: &str,
    request: &serde_json::Value,
) -> anyhow::Result<String> {
    let out = Command::new(csi)
        .arg("--endpoint")
        .arg(socket)
        .args(["call", method, &request.to_string()])
        .output()
        .with_context(|| format!("cannot run {}", csi.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{method} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// Publishes a model through `modelpack-csi` (the binary beside `rig`'s `modelpack`) and reads
/// it from a container of `image` (a busybox with `find` and `sha256sum`).
pub fn csi_in_containerd(rig: &Rig, image: &str) -> anyhow::Result<()> {
    let csi = rig.bins.modelpack.with_file_name("modelpack-csi");
    ensure!(
        csi.exists(),
        "build modelpack-csi first (cargo build -p modelpack-csi)"
    );
    let model = rig.path("csi-model");
    make_model(&model, 24)?;
    let reference = format!("{}/e2e/csi-model:v1", rig.registry.host());
    rig.build_and_push(&model, &reference)?;
    let expected = tree_digests(&model)?;

    let root = rig.path("csi");
    std::fs::create_dir_all(&root)?;
    // Dropped last: whatever the plugin left mounted goes, even after a failure.
    let _detach = DetachOnDrop(root.clone());
    let socket = root.join("plugin/csi.sock");
    let log = std::fs::File::create(root.join("csi.log"))?;
    let child = Command::new(&csi)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--state-dir")
        .arg(root.join("state"))
        .args(["--node-id", "e2e-node", "--hosts-dir", ""])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start modelpack-csi")?;
    let _plugin = ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "modelpack-csi did not open its socket"
        );
        std::thread::sleep(Duration::from_millis(25));
    }

    // kubelet's order: plugin info (registration), node info, publish, then the container.
    let info = call(&csi, &socket, "GetPluginInfo", &serde_json::json!({}))?;
    ensure!(
        info.contains("model.csi.modelpack.io"),
        "GetPluginInfo: {info}"
    );
    call(&csi, &socket, "NodeGetInfo", &serde_json::json!({}))?;
    let pod_dir = root.join("pods/uid-1/volumes/kubernetes.io~csi/model");
    std::fs::create_dir_all(&pod_dir)?;
    let target = pod_dir.join("mount");
    let publish = serde_json::json!({
        "volume_id": "csi-e2e-1",
        "target_path": target,
        "volume_capability": {"access_type": {"Mount": {}}, "access_mode": {"mode": 1}},
        "readonly": true,
        "volume_context": {
            "reference": reference,
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": "reader",
            "csi.storage.k8s.io/pod.namespace": "default",
        },
    });
    let started = Instant::now();
    call(&csi, &socket, "NodePublishVolume", &publish)?;
    println!("csi: publish took {:?}", started.elapsed());

    let result = (|| -> anyhow::Result<()> {
        let out = rig.containerd.run_with_models_ok(
            image,
            "csi-reader",
            &target,
            &[
                "sh",
                "-c",
                "cd /models && find . -type f ! -name .modelpack-status | sort | xargs sha256sum",
            ],
        )?;
        let mut seen = std::collections::BTreeMap::new();
        for line in out.lines() {
            if let Some((digest, path)) = line.split_once("  ") {
                seen.insert(
                    path.trim_start_matches("./").to_owned(),
                    digest.trim().to_owned(),
                );
            }
        }
        ensure!(
            seen == expected,
            "the container read other bytes through the CSI volume: {seen:?} != {expected:?}"
        );
        Ok(())
    })();
    let unpublished = call(
        &csi,
        &socket,
        "NodeUnpublishVolume",
        &serde_json::json!({"volume_id": "csi-e2e-1", "target_path": target}),
    );
    result?;
    unpublished?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mounts_under(&root).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "mounts left after unpublish: {:?}",
            mounts_under(&root)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("csi: a container read every model file through a CSI volume, byte-identical");
    Ok(())
}
