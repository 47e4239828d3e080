//! `modelpack-csi`, the CSI node plugin, driven over its unix socket exactly as kubelet drives
//! it (GetPluginInfo, NodeGetInfo, NodePublishVolume with kubelet's volume context and target
//! paths, NodeUnpublishVolume), against a real registry behind a counting proxy: publish is
//! fast and fetches no model bytes, two pods of one model fetch it once, every file reads
//! byte-identical, and the CSI error and idempotence rules hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelpack_testkit::mounts::DetachOnDrop;
use serde_json::{Value, json};

use crate::util::{self, Guard, Proxy, Scratch};

/// The `modelpack-csi` binary: `$MODELPACK_CSI_BIN`, else beside the `modelpack` under test.
fn csi_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MODELPACK_CSI_BIN") {
        return PathBuf::from(p);
    }
    let path = util::bin().with_file_name("modelpack-csi");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p modelpack-csi`",
        path.display()
    );
    path
}

/// A running plugin, stopped by PID on drop (the scratch's mounts are detached after it).
struct Plugin {
    socket: PathBuf,
    state: PathBuf,
    guard: Guard,
}

impl Plugin {
    fn start(dir: &Path, extra: &[&str]) -> Plugin {
        Plugin::start_logging(dir, extra, None)
    }

    /// [`Plugin::start`], its stderr appended to `log` when given.
    fn start_logging(dir: &Path, extra: &[&str], log: Option<&Path>) -> Plugin {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the plugin's log"),
            ),
            None => Stdio::inherit(),
        };
        let socket = dir.join("csi/csi.sock");
        let state = dir.join("state");
        let child = Command::new(csi_bin())
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "node-a", "--log-level", "info"])
            .args(if extra.contains(&"--hosts-dir") {
                &[][..]
            } else {
                &["--hosts-dir", ""][..]
            })
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            // The node's own Docker config: empty (tests give credentials by secret).
            .env("DOCKER_CONFIG", dir.join("node-docker"))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start modelpack-csi");
        let plugin = Plugin {
            socket,
            state,
            guard: Guard::new(child),
        };
        util::wait_until(
            Duration::from_secs(20),
            Duration::from_millis(25),
            || plugin.socket.exists(),
            || "the plugin did not open its socket".into(),
        );
        plugin
    }

    /// One RPC: `Ok(response)` or `Err((code, message))`.
    /// A request with secrets goes on stdin (`call METHOD -`), never on the command line.
    fn call(&self, method: &str, request: &Value) -> Result<Value, (String, String)> {
        let on_stdin = request.get("secrets").is_some();
        let mut child = Command::new(csi_bin())
            .arg("--endpoint")
            .arg(&self.socket)
            .args(["call", method])
            .arg(if on_stdin {
                "-".to_owned()
            } else {
                request.to_string()
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run modelpack-csi call");
        if let Some(mut stdin) = child.stdin.take()
            && on_stdin
        {
            std::io::Write::write_all(&mut stdin, request.to_string().as_bytes())
                .expect("write the request");
        }
        let out = child.wait_with_output().expect("run modelpack-csi call");
        let text = String::from_utf8_lossy(&out.stdout);
        let answer: Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
            panic!(
                "{method}: no JSON answer: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if out.status.success() {
            Ok(answer)
        } else {
            assert_eq!(out.status.code(), Some(1), "{method}: {answer}");
            Err((
                answer["code"].as_str().unwrap_or_default().to_owned(),
                answer["message"].as_str().unwrap_or_default().to_owned(),
            ))
        }
    }

    fn ok(&self, method: &str, request: &Value) -> Value {
        self.call(method, request)
            .unwrap_or_else(|(code, message)| panic!("{method}: {code}: {message}"))
    }

    fn fails(&self, method: &str, request: &Value) -> (String, String) {
        match self.call(method, request) {
            Ok(answer) => panic!("{method} succeeded: {answer}"),
            Err(e) => e,
        }
    }

    /// Sends `signal` and waits (up to 10 s) for the plugin to exit; its exit status.
    fn stop_with(
        &mut self,
        signal: modelpack_testkit::process::Signal,
    ) -> std::process::ExitStatus {
        self.guard.signal(signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.guard.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the plugin did not exit on {signal:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// NodeGetVolumeStats of volume `volume_id` at `path`.
    fn stats(&self, volume_id: &str, path: &Path) -> Value {
        self.ok(
            "NodeGetVolumeStats",
            &json!({"volume_id": volume_id, "volume_path": path}),
        )
    }

    /// Waits (up to 10 s) until the plugin holds no model mount; panics with `why` after that.
    fn wait_for_no_model_mounts(&self, why: &str) {
        util::wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || self.model_mounts().is_empty(),
            || why.into(),
        );
    }

    /// The lazy mounts of models the plugin holds now.
    fn model_mounts(&self) -> Vec<PathBuf> {
        modelpack_testkit::mounts::mounts_under(&self.state.join("models"))
    }
}

/// A node's folder for one plugin (its state, kubelet's pod folders). Declared before the
/// plugin, so that the plugin stops first; then on drop the FUSE holder the plugin started is
/// killed, the mounts under the folder are detached, and the folder is removed.
struct Node {
    holder: HolderGuard,
    _detach: DetachOnDrop,
    scratch: Scratch,
}

impl Node {
    fn new() -> Node {
        let scratch = Scratch::new();
        Node {
            holder: HolderGuard(scratch.path("state")),
            _detach: DetachOnDrop(scratch.dir.path().to_owned()),
            scratch,
        }
    }

    fn dir(&self) -> &Path {
        self.scratch.dir.path()
    }

    /// [`Plugin::start`] on this node.
    fn start(&self, extra: &[&str]) -> Plugin {
        Plugin::start(self.dir(), extra)
    }

    /// A kubelet-shaped target path for pod `uid`'s volume `name` (kubelet makes the parent).
    fn target(&self, uid: &str, name: &str) -> PathBuf {
        let dir = self
            .dir()
            .join(format!("pods/{uid}/volumes/kubernetes.io~csi/{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir.join("mount")
    }
}

/// NodePublishVolume as kubelet sends it for a CSI ephemeral inline volume.
fn inline_publish(volume_id: &str, target: &Path, attributes: &[(&str, &str)]) -> Value {
    let mut context = json!({
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "loader",
        "csi.storage.k8s.io/pod.namespace": "ml",
        "csi.storage.k8s.io/pod.uid": "uid",
        "csi.storage.k8s.io/serviceAccount.name": "default",
    });
    for (k, v) in attributes {
        context[*k] = json!(v);
    }
    json!({
        "volume_id": volume_id,
        "target_path": target,
        // kubelet gives inline volumes ReadWriteOnce, whatever the pod says.
        "volume_capability": {"access_type": {"Mount": {}}, "access_mode": {"mode": 1}},
        "readonly": true,
        "volume_context": context,
    })
}

fn unpublish(volume_id: &str, target: &Path) -> Value {
    json!({"volume_id": volume_id, "target_path": target})
}

/// Every regular file under `dir` (the hidden status file left out): relative path -> sha256.
fn file_hashes(dir: &Path) -> BTreeMap<String, String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file() && e.file_name() != ".modelpack-status")
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(dir)
                .expect("under")
                .to_string_lossy()
                .into_owned();
            (rel, util::sha256_file(e.path()))
        })
        .collect()
}

const MIB: u64 = 1 << 20;

/// When this machine can mount FUSE and a registry runs: a model of a 3 MiB weight
/// (pseudo-random from `seed`) and a `config.json`, pushed as `HOST/REPO:TAG`; and its
/// [`file_hashes`].
fn small_model_to_publish(
    repo_and_tag: &str,
    seed: u64,
) -> Option<(util::ModelOnRegistry<PathBuf>, BTreeMap<String, String>)> {
    let m = util::pushed_model_to_mount(repo_and_tag, |s: &Scratch| {
        util::model_with_weight(s, 3 * MIB as usize, seed, &[("config.json", b"{}")])
    })?;
    let expected = file_hashes(&m.dir);
    Some((m, expected))
}

/// A 1 GiB model: publish returns in under a second having fetched under 1 MiB; two pods of
/// the model on the node fetch it once; both read every file byte-identical; stats say when
/// it is all local; the last unpublish unmounts the model and a later pod reads from the cache.
#[test]
fn csi_publish_is_lazy_shared_and_byte_identical() {
    if !util::can_fuse() {
        return;
    }
    const WEIGHT: usize = 1 << 30;
    let Some(m) = util::registry_with_pushed_model("models/big:v1", |s: &Scratch| {
        util::model_with_weight(
            s,
            WEIGHT,
            0x5eed,
            &[
                ("config.json", br#"{"model_type":"m"}"#),
                ("tokenizer/vocab.txt", b"a\nb\n"),
            ],
        )
    }) else {
        return;
    };
    let (proxy, via): (Proxy, String) = m.through_proxy(None);
    let expected = file_hashes(&m.dir);
    let node = Node::new();
    let plugin = node.start(&[]);

    let info = plugin.ok("GetPluginInfo", &json!({}));
    assert_eq!(info["name"], "model.csi.modelpack.io");
    assert_eq!(plugin.ok("NodeGetInfo", &json!({}))["node_id"], "node-a");
    assert_eq!(plugin.ok("Probe", &json!({}))["ready"]["value"], true);
    let caps = plugin.ok("NodeGetCapabilities", &json!({})).to_string();
    assert!(
        caps.contains("\"type\":2") && caps.contains("\"type\":4"),
        "{caps}"
    );

    let pod_a = node.target("uid-a", "model");
    let before = proxy.served();
    let started = Instant::now();
    plugin.ok(
        "NodePublishVolume",
        &inline_publish("csi-aaaa", &pod_a, &[("reference", &via)]),
    );
    let publish_latency = started.elapsed();
    let fetched_at_publish = proxy.served() - before;
    eprintln!(
        "csi: publish of a 1 GiB model took {publish_latency:?}, fetched {fetched_at_publish} bytes"
    );
    assert!(
        publish_latency < Duration::from_secs(1),
        "publish took {publish_latency:?}"
    );
    assert!(
        fetched_at_publish < MIB,
        "publish fetched {fetched_at_publish} bytes"
    );
    // The tree is there before any byte of the weight.
    let size = std::fs::metadata(pod_a.join("model.safetensors"))
        .expect("stat")
        .len();
    assert_eq!(size, WEIGHT as u64);
    assert!(proxy.served() - before < MIB, "a stat fetched model bytes");
    // Read-only, whatever kubelet's access mode said.
    let write = std::fs::write(pod_a.join("new.txt"), b"x").expect_err("read-only");
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");

    // A second pod of the same model on the node: its own target, the same lazy mount.
    let pod_b = node.target("uid-b", "weights");
    plugin.ok(
        "NodePublishVolume",
        &inline_publish("csi-bbbb", &pod_b, &[("reference", &via)]),
    );
    assert_eq!(plugin.model_mounts().len(), 1, "one lazy mount per model");
    // Publishing the same volume again at the same target is a success (kubelet retries).
    plugin.ok(
        "NodePublishVolume",
        &inline_publish("csi-aaaa", &pod_a, &[("reference", &via)]),
    );
    // Another volume at a target in use is refused.
    let (code, message) = plugin.fails(
        "NodePublishVolume",
        &inline_publish("csi-cccc", &pod_a, &[("reference", &via)]),
    );
    assert_eq!(code, "AlreadyExists", "{message}");

    assert_eq!(
        file_hashes(&pod_a),
        expected,
        "pod a reads the model byte-identical"
    );
    assert_eq!(
        file_hashes(&pod_b),
        expected,
        "pod b reads the model byte-identical"
    );
    let fetched = proxy.served() - before;
    eprintln!(
        "csi: two pods read the model, {fetched} bytes fetched ({} weight)",
        WEIGHT
    );
    assert!(
        fetched >= WEIGHT as u64,
        "{fetched} bytes cannot hold the model"
    );
    assert!(
        fetched < WEIGHT as u64 + 8 * MIB,
        "two pods fetched {fetched} bytes: more than once"
    );

    // Stats: everything read is local now.
    let stats = plugin.stats("csi-aaaa", &pod_a);
    let usage = &stats["usage"][0];
    assert_eq!(usage["unit"], 1, "{stats}");
    assert_eq!(usage["total"], usage["used"], "fully local: {stats}");
    assert!(
        usage["total"].as_u64().unwrap_or(0) >= WEIGHT as u64,
        "{stats}"
    );
    assert_eq!(stats["volume_condition"]["abnormal"], false, "{stats}");
    let (code, _) = plugin.fails(
        "NodeGetVolumeStats",
        &json!({"volume_id": "csi-zzzz", "volume_path": pod_a}),
    );
    assert_eq!(code, "NotFound");

    // Unpublish: idempotent; the model stays mounted while pod b uses it.
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-aaaa", &pod_a));
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-aaaa", &pod_a));
    assert!(!pod_a.exists(), "the target folder is removed");
    assert_eq!(plugin.model_mounts().len(), 1);
    assert_eq!(file_hashes(&pod_b), expected);
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-bbbb", &pod_b));
    plugin.wait_for_no_model_mounts("the model's mount outlived its last volume");

    // The next pod: mounted again, served from the node cache, nothing fetched but metadata.
    let pod_c = node.target("uid-c", "model");
    let before = proxy.served();
    plugin.ok(
        "NodePublishVolume",
        &inline_publish("csi-dddd", &pod_c, &[("reference", &via)]),
    );
    assert_eq!(file_hashes(&pod_c), expected);
    let refetched = proxy.served() - before;
    assert!(
        refetched < MIB,
        "the cache was not reused: {refetched} bytes fetched"
    );
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-dddd", &pod_c));
    // An unknown target is a success too.
    plugin.ok(
        "NodeUnpublishVolume",
        &unpublish("csi-eeee", &node.scratch.path("nowhere/mount")),
    );
}

/// The CSI rules for bad requests, each with one clear message; a static PersistentVolume
/// naming the model by its volumeHandle; a registry that is down answers UNAVAILABLE.
#[test]
fn csi_errors_and_static_volumes() {
    let Some((m, expected)) = small_model_to_publish("models/small:v1", 7) else {
        return;
    };
    let node = Node::new();
    let plugin = node.start(&["--resolve-timeout", "3"]);
    let t = node.target("uid-x", "model");
    let check = |request: Value, want_code: &str, want_text: &str| {
        let (code, message) = plugin.fails("NodePublishVolume", &request);
        assert_eq!(code, want_code, "{message}");
        assert!(
            message.contains(want_text),
            "{message:?} lacks {want_text:?}"
        );
    };
    check(
        inline_publish("csi-1", &t, &[("reference", "Not A Reference!")]),
        "InvalidArgument",
        "is not a model reference",
    );
    check(
        inline_publish("csi-1", &t, &[]),
        "InvalidArgument",
        "volumeAttributes.reference is required",
    );
    let mut r = inline_publish("", &t, &[("reference", &m.reference)]);
    check(r.clone(), "InvalidArgument", "volume_id is required");
    r["volume_id"] = json!("csi-1");
    r["target_path"] = json!("");
    check(r.clone(), "InvalidArgument", "target_path is required");
    r["target_path"] = json!(t);
    r["volume_capability"] = Value::Null;
    check(
        r.clone(),
        "InvalidArgument",
        "volume_capability is required",
    );
    r["volume_capability"] = json!({"access_type": {"Block": {}}, "access_mode": {"mode": 1}});
    check(
        r.clone(),
        "InvalidArgument",
        "block volumes are not supported",
    );
    r["volume_capability"] = json!({"access_type": {"Mount": {}}, "access_mode": {"mode": 1}});
    r["secrets"] = json!({"username": "u", "password": "hunter2"});
    let (code, message) = plugin.fails("NodePublishVolume", &r);
    assert_eq!(code, "InvalidArgument");
    assert!(
        !message.contains("hunter2"),
        "a secret in an error: {message}"
    );
    check(
        inline_publish(
            "csi-1",
            &t,
            &[(
                "reference",
                &format!("{}/models/small:nope", m.registry.host()),
            )],
        ),
        "NotFound",
        "models/small:nope",
    );
    // A registry that is down: UNAVAILABLE, so kubelet tries again.
    let down = format!("127.0.0.1:{}/models/small:v1", util::free_port());
    let started = Instant::now();
    check(
        inline_publish("csi-1", &t, &[("reference", &down)]),
        "Unavailable",
        &down,
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        plugin.model_mounts().is_empty(),
        "a failed publish left a mount"
    );

    // A static PersistentVolume: volumeHandle names the model, ReadOnlyMany.
    let pv = json!({
        "volume_id": m.reference,
        "target_path": t,
        "volume_capability": {"access_type": {"Mount": {}}, "access_mode": {"mode": 3}},
        "volume_context": {"csi.storage.k8s.io/pod.name": "p", "csi.storage.k8s.io/pod.namespace": "d"},
    });
    let mut writable = pv.clone();
    writable["volume_capability"]["access_mode"]["mode"] = json!(1);
    check(writable, "InvalidArgument", "read-only");
    plugin.ok("NodePublishVolume", &pv);
    assert_eq!(file_hashes(&t), expected);
    // The tag was resolved once: the volume record holds the digest.
    let records = std::fs::read_to_string(plugin.state.join("volumes.json")).expect("records");
    assert!(records.contains("\"digest\": \"sha256:"), "{records}");
    plugin.ok(
        "NodeUnpublishVolume",
        &json!({"volume_id": m.reference, "target_path": t}),
    );
    let (code, _) = plugin.fails(
        "NodeUnpublishVolume",
        &json!({"volume_id": "", "target_path": t}),
    );
    assert_eq!(code, "InvalidArgument");
}

/// `deploy/kubernetes/` parses as Kubernetes objects (kubectl reads it offline: `kubectl label
/// --local --dry-run=client`; `apply --dry-run=client` needs an API server for its REST
/// mapping, so the fields the plugin relies on are checked here).
#[test]
fn csi_deployment_manifests_hold_what_the_plugin_needs() {
    if !util::have_tool("kubectl") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let out = Command::new("kubectl")
        .args(["label", "--local", "--dry-run=client", "-o", "json", "-f"])
        .arg(&dir)
        .arg("modelpack.io/checked=true")
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|o| o.expect("JSON from kubectl"))
        .collect();
    let find = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
    };
    let driver = find("CSIDriver");
    assert_eq!(driver["metadata"]["name"], "model.csi.modelpack.io");
    assert_eq!(driver["spec"]["podInfoOnMount"], true);
    // kubelet publishes again periodically: a restarted plugin gets the secrets back.
    assert_eq!(driver["spec"]["requiresRepublish"], true);
    assert_eq!(driver["spec"]["attachRequired"], false);
    assert_eq!(driver["spec"]["fsGroupPolicy"], "None");
    assert_eq!(
        driver["spec"]["volumeLifecycleModes"],
        json!(["Ephemeral", "Persistent"])
    );

    // A rolling update would replace the pod and its FUSE holder: upgrades are in place.
    assert_eq!(
        find("DaemonSet")["spec"]["updateStrategy"]["type"],
        "OnDelete"
    );
    // kubectl checks no field names offline (`--validate` needs an API server's OpenAPI):
    // every key is checked against the Kubernetes API's field names here.
    for object in &objects {
        let kind = object["kind"].as_str().expect("kind");
        check_fields(kind, kind, object);
    }

    let pod_spec = &find("DaemonSet")["spec"]["template"]["spec"];
    let containers = pod_spec["containers"].as_array().expect("containers");
    let registrar = containers
        .iter()
        .find(|c| {
            c["image"]
                .as_str()
                .is_some_and(|i| i.contains("csi-node-driver-registrar"))
        })
        .expect("the node-driver-registrar sidecar");
    let args = registrar["args"].to_string();
    assert!(
        args.contains("/var/lib/kubelet/plugins/model.csi.modelpack.io/csi.sock"),
        "{args}"
    );
    let plugin = containers
        .iter()
        .find(|c| c["name"] == "modelpack-csi")
        .expect("plugin");
    assert_eq!(plugin["securityContext"]["privileged"], true);
    let mounts = plugin["volumeMounts"].as_array().expect("mounts");
    let kubelet = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/kubelet")
        .expect("kubelet's folder");
    assert_eq!(kubelet["mountPropagation"], "Bidirectional");
    assert!(mounts.iter().any(|m| m["mountPath"] == "/dev/fuse"));
    assert!(plugin["env"].to_string().contains("spec.nodeName"));
    // The FUSE holder in a sidecar, on a socket both containers see; model mounts on the host.
    let holder = containers
        .iter()
        .find(|c| c["name"] == "fuse-holder")
        .expect("the fuse-holder sidecar");
    let holder_args = holder["args"].to_string();
    assert!(
        holder_args.contains("\"fuse-holder\"") && holder_args.contains("--idle-exit=0"),
        "{holder_args}"
    );
    let plugin_args = plugin["args"].to_string();
    assert!(
        plugin_args.contains("--fuse-holder=/run/modelpack-holder/fuse-holder.sock")
            && plugin_args.contains("--fuse-holder-external")
            && holder_args.contains("--socket=/run/modelpack-holder/fuse-holder.sock"),
        "{plugin_args}"
    );
    let mounted_at = |c: &Value, path: &str| {
        c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["mountPath"] == path)
    };
    assert!(
        mounted_at(holder, "/run/modelpack-holder") && mounted_at(plugin, "/run/modelpack-holder")
    );
    let state = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/modelpack-csi")
        .expect("the state folder");
    assert_eq!(state["mountPropagation"], "Bidirectional");

    let pod = find("Pod");
    let csi = &pod["spec"]["volumes"][0]["csi"];
    assert_eq!(csi["driver"], "model.csi.modelpack.io");
    assert!(csi["volumeAttributes"]["reference"].is_string());
    let pv = find("PersistentVolume");
    assert_eq!(pv["spec"]["csi"]["driver"], "model.csi.modelpack.io");
    assert_eq!(pv["spec"]["accessModes"], json!(["ReadOnlyMany"]));
}

/// The fields (name, type) of the Kubernetes API types `deploy/kubernetes/` uses, as in the
/// API reference (core/v1, apps/v1, storage.k8s.io/v1); type `""` is a scalar or a list of
/// scalars, `"map"` a free-form map (labels, quantities, attributes).
fn fields_of(t: &str) -> &'static [(&'static str, &'static str)] {
    const TOP: [(&str, &str); 2] = [("apiVersion", ""), ("kind", "")];
    match t {
        "CSIDriver" => &[
            TOP[0],
            TOP[1],
            ("metadata", "ObjectMeta"),
            ("spec", "CSIDriverSpec"),
        ],
        "CSIDriverSpec" => &[
            ("attachRequired", ""),
            ("podInfoOnMount", ""),
            ("fsGroupPolicy", ""),
            ("requiresRepublish", ""),
            ("volumeLifecycleModes", ""),
            ("storageCapacity", ""),
            ("seLinuxMount", ""),
            ("tokenRequests", "TokenRequest"),
        ],
        "TokenRequest" => &[("audience", ""), ("expirationSeconds", "")],
        "Namespace" => &[TOP[0], TOP[1], ("metadata", "ObjectMeta")],
        "ObjectMeta" => &[
            ("name", ""),
            ("namespace", ""),
            ("labels", "map"),
            ("annotations", "map"),
        ],
        "DaemonSet" => &[
            TOP[0],
            TOP[1],
            ("metadata", "ObjectMeta"),
            ("spec", "DaemonSetSpec"),
        ],
        "DaemonSetSpec" => &[
            ("selector", "LabelSelector"),
            ("updateStrategy", "DaemonSetUpdateStrategy"),
            ("template", "PodTemplateSpec"),
            ("minReadySeconds", ""),
            ("revisionHistoryLimit", ""),
        ],
        "LabelSelector" => &[("matchLabels", "map"), ("matchExpressions", "map")],
        "DaemonSetUpdateStrategy" => &[("type", ""), ("rollingUpdate", "map")],
        "PodTemplateSpec" => &[("metadata", "ObjectMeta"), ("spec", "PodSpec")],
        "Pod" => &[
            TOP[0],
            TOP[1],
            ("metadata", "ObjectMeta"),
            ("spec", "PodSpec"),
        ],
        "PodSpec" => &[
            ("containers", "Container"),
            ("initContainers", "Container"),
            ("volumes", "Volume"),
            ("tolerations", "Toleration"),
            ("priorityClassName", ""),
            ("serviceAccountName", ""),
            ("nodeSelector", "map"),
            ("hostNetwork", ""),
            ("terminationGracePeriodSeconds", ""),
        ],
        "Toleration" => &[
            ("key", ""),
            ("operator", ""),
            ("value", ""),
            ("effect", ""),
            ("tolerationSeconds", ""),
        ],
        "Container" => &[
            ("name", ""),
            ("image", ""),
            ("imagePullPolicy", ""),
            ("command", ""),
            ("args", ""),
            ("env", "EnvVar"),
            ("ports", "ContainerPort"),
            ("resources", "ResourceRequirements"),
            ("securityContext", "SecurityContext"),
            ("volumeMounts", "VolumeMount"),
            ("livenessProbe", "map"),
            ("readinessProbe", "map"),
        ],
        "EnvVar" => &[("name", ""), ("value", ""), ("valueFrom", "EnvVarSource")],
        "EnvVarSource" => &[
            ("fieldRef", "ObjectFieldSelector"),
            ("secretKeyRef", "map"),
            ("configMapKeyRef", "map"),
        ],
        "ObjectFieldSelector" => &[("fieldPath", ""), ("apiVersion", "")],
        "ContainerPort" => &[
            ("name", ""),
            ("containerPort", ""),
            ("hostPort", ""),
            ("protocol", ""),
        ],
        "ResourceRequirements" => &[("requests", "map"), ("limits", "map")],
        "SecurityContext" => &[
            ("privileged", ""),
            ("capabilities", "map"),
            ("runAsUser", ""),
            ("readOnlyRootFilesystem", ""),
            ("allowPrivilegeEscalation", ""),
        ],
        "VolumeMount" => &[
            ("name", ""),
            ("mountPath", ""),
            ("mountPropagation", ""),
            ("readOnly", ""),
            ("subPath", ""),
        ],
        "Volume" => &[
            ("name", ""),
            ("emptyDir", "EmptyDirVolumeSource"),
            ("hostPath", "HostPathVolumeSource"),
            ("csi", "CSIVolumeSource"),
            ("persistentVolumeClaim", "map"),
            ("secret", "map"),
            ("configMap", "map"),
        ],
        "EmptyDirVolumeSource" => &[("medium", ""), ("sizeLimit", "")],
        "HostPathVolumeSource" => &[("path", ""), ("type", "")],
        "CSIVolumeSource" => &[
            ("driver", ""),
            ("readOnly", ""),
            ("fsType", ""),
            ("volumeAttributes", "map"),
            ("nodePublishSecretRef", "LocalObjectReference"),
        ],
        "LocalObjectReference" => &[("name", "")],
        "SecretReference" => &[("name", ""), ("namespace", "")],
        "PersistentVolume" => &[
            TOP[0],
            TOP[1],
            ("metadata", "ObjectMeta"),
            ("spec", "PersistentVolumeSpec"),
        ],
        "PersistentVolumeSpec" => &[
            ("capacity", "map"),
            ("accessModes", ""),
            ("persistentVolumeReclaimPolicy", ""),
            ("storageClassName", ""),
            ("volumeMode", ""),
            ("mountOptions", ""),
            ("claimRef", "map"),
            ("nodeAffinity", "map"),
            ("csi", "CSIPersistentVolumeSource"),
        ],
        "CSIPersistentVolumeSource" => &[
            ("driver", ""),
            ("volumeHandle", ""),
            ("readOnly", ""),
            ("fsType", ""),
            ("volumeAttributes", "map"),
            ("nodePublishSecretRef", "SecretReference"),
            ("nodeStageSecretRef", "SecretReference"),
            ("controllerPublishSecretRef", "SecretReference"),
            ("controllerExpandSecretRef", "SecretReference"),
            ("nodeExpandSecretRef", "SecretReference"),
        ],
        "PersistentVolumeClaim" => &[
            TOP[0],
            TOP[1],
            ("metadata", "ObjectMeta"),
            ("spec", "PersistentVolumeClaimSpec"),
        ],
        "PersistentVolumeClaimSpec" => &[
            ("accessModes", ""),
            ("storageClassName", ""),
            ("volumeName", ""),
            ("volumeMode", ""),
            ("resources", "ResourceRequirements"),
            ("selector", "LabelSelector"),
        ],
        _ => &[],
    }
}

/// Every key of `value` (of API type `t`, at `at`) is a field of that type.
fn check_fields(t: &str, at: &str, value: &Value) {
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_fields(t, &format!("{at}[{i}]"), item);
            }
        }
        Value::Object(_) if t == "map" => {}
        Value::Object(map) => {
            let fields = fields_of(t);
            assert!(
                !fields.is_empty(),
                "{at}: an object where {t:?} is expected"
            );
            for (key, child) in map {
                let Some((_, child_type)) = fields.iter().find(|(f, _)| f == key) else {
                    panic!("{at}.{key}: {t} has no field {key:?} in the Kubernetes API");
                };
                check_fields(child_type, &format!("{at}.{key}"), child);
            }
        }
        _ => {}
    }
}

#[test]
fn csi_field_check_catches_a_misspelt_field() {
    let driver = json!({"kind": "CSIDriver", "spec": {"podInfoOnMount": true}});
    check_fields("CSIDriver", "CSIDriver", &driver);
    let typo = json!({"kind": "CSIDriver", "spec": {"podInfoOnMountMode": true}});
    assert!(std::panic::catch_unwind(|| check_fields("CSIDriver", "CSIDriver", &typo)).is_err());
}

/// Kills the FUSE holder a plugin started (its PID file under the state folder) when dropped.
struct HolderGuard(PathBuf);

impl HolderGuard {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.0.join("fuse-holder.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }
}

impl Drop for HolderGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = modelpack_testkit::process::signal_pid(
                pid,
                modelpack_testkit::process::Signal::KILL,
            );
        }
    }
}

/// A reader of one file (`sha256sum`, as a pod's loader would read it), killed on drop.
struct Reader {
    guard: Guard,
    started: Instant,
}

impl Reader {
    fn start(path: &Path) -> Reader {
        let child = Command::new("sha256sum")
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sha256sum");
        Reader {
            guard: Guard::new(child),
            started: Instant::now(),
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.guard.child.try_wait(), Ok(None))
    }

    /// Waits (up to `limit`) for the reader: its hash, or what went wrong.
    fn finish(&mut self, limit: Duration) -> Result<String, String> {
        util::wait_until(
            limit,
            Duration::from_millis(20),
            || !self.running(),
            || "the reader never finished".into(),
        );
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read as _;
        if let Some(o) = self.guard.child.stdout.as_mut() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(e) = self.guard.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        let status = self.guard.child.wait().expect("wait");
        if !status.success() {
            return Err(format!("{status}: {err}"));
        }
        out.split_whitespace()
            .next()
            .map(str::to_owned)
            .ok_or_else(|| format!("no hash in {out:?}"))
    }
}

/// Issue 16: the plugin restarts (kill -9, then SIGTERM) while a pod reads a 256 MiB file
/// lazily over a slow link: the holder keeps the FUSE connection, the next plugin adopts it,
/// and the reader waits and then finishes with the right bytes and no error; the binds at the
/// targets never change.
#[test]
fn csi_restart_while_a_pod_reads_loses_no_read() {
    if !util::can_fuse() {
        return;
    }
    const WEIGHT: usize = 256 << 20;
    let second = util::pseudo_random(WEIGHT, 0x5ec0);
    let Some(m) = util::registry_with_pushed_model("models/restart:v1", |s: &Scratch| {
        util::model_with_weight(
            s,
            WEIGHT,
            0x16,
            &[("config.json", b"{}"), ("shard-2.safetensors", &second)],
        )
    }) else {
        return;
    };
    drop(second);
    let expected = file_hashes(&m.dir);
    // Per connection: a 256 MiB file takes several seconds.
    let (proxy, via) = m.through_proxy(Some(24 * MIB));
    let node = Node::new();
    let mut plugin = node.start(&[]);
    let pod = node.target("uid-r", "model");
    plugin.ok(
        "NodePublishVolume",
        &inline_publish("csi-rrrr", &pod, &[("reference", &via)]),
    );
    let model_dirs = plugin.model_mounts();
    assert_eq!(model_dirs.len(), 1);

    for (round, file, signal) in [
        (
            "kill -9",
            "model.safetensors",
            modelpack_testkit::process::Signal::KILL,
        ),
        (
            "SIGTERM",
            "shard-2.safetensors",
            modelpack_testkit::process::Signal::TERM,
        ),
    ] {
        let before = proxy.served();
        let mut reader = Reader::start(&pod.join(file));
        util::wait_until(
            Duration::from_secs(60),
            Duration::from_millis(10),
            || proxy.served() - before >= 16 * MIB,
            || "the reader fetched nothing".into(),
        );
        let status = plugin.stop_with(signal);
        let stopped = Instant::now();
        let fetched_before = proxy.served() - before;
        assert!(node.holder.pid().is_some(), "no FUSE holder was started");
        assert!(reader.running(), "{round}: the read ended with the plugin");
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            reader.running(),
            "{round}: the read failed while the plugin was away"
        );
        // A killed plugin leaves its socket file; the next start waits for a fresh one.
        let _ = std::fs::remove_file(&plugin.socket);
        drop(plugin);
        plugin = node.start(&[]);
        let back = stopped.elapsed();
        let hash = reader
            .finish(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{round}: the reader failed: {e}"));
        eprintln!(
            "csi restart ({round}, plugin exit {status}): {fetched_before} bytes fetched before; \
             plugin back after {back:?}; the read took {:?} in all, {:?} after the stop",
            reader.started.elapsed(),
            stopped.elapsed()
        );
        assert_eq!(Some(&hash), expected.get(file), "{round}: wrong bytes");
        assert_eq!(
            plugin.model_mounts(),
            model_dirs,
            "{round}: the model's mount was replaced, not adopted"
        );
        let stats = plugin.stats("csi-rrrr", &pod);
        assert_eq!(stats["volume_condition"]["abnormal"], false, "{stats}");
    }
    assert_eq!(
        file_hashes(&pod),
        expected,
        "the volume reads whole after both restarts"
    );
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-rrrr", &pod));
    plugin.wait_for_no_model_mounts("the model's mount outlived its last volume");
}

const USER: &str = "modeluser";
const PASSWORD: &str = "s3cret-Pa55word";

/// Writes a model of a `weight`-byte weight (pseudo-random from `seed`) and a `config.json`,
/// builds it as the first of `references`, tags it as the others, and pushes each with a
/// Docker config logging [`USER`] in to each `(host, password)` of `logins`. The model's
/// [`file_hashes`], and the one digest every push printed.
fn push_model_logged_in(
    weight: usize,
    seed: u64,
    references: &[&str],
    logins: &[(&str, &str)],
) -> (BTreeMap<String, String>, String) {
    let s = Scratch::new();
    let dir = util::model_with_weight(&s, weight, seed, &[("config.json", b"{}")]);
    s.ok(&["build", dir.to_str().expect("utf8"), "-t", references[0]]);
    for other in &references[1..] {
        s.ok(&["tag", references[0], other]);
    }
    let config = s.path("push-docker");
    std::fs::create_dir_all(&config).expect("mkdir");
    let auths: serde_json::Map<String, Value> = logins
        .iter()
        .map(|(host, password)| {
            let login = json!({"username": USER, "password": password});
            ((*host).to_owned(), login)
        })
        .collect();
    std::fs::write(
        config.join("config.json"),
        json!({ "auths": auths }).to_string(),
    )
    .expect("docker config");
    let digests: Vec<String> = references
        .iter()
        .map(|reference| {
            let out = s.run_env(
                &["-q", "push", reference, "--plain-http"],
                &[("DOCKER_CONFIG", config.to_str().expect("utf8"))],
            );
            util::assert_success(&out, &["push"]);
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "one model, one digest: {digests:?}"
    );
    (file_hashes(&dir), digests[0].clone())
}

/// A `.dockerconfigjson` secret for `host` (the `username`/`password` form).
fn docker_secret(host: &str, password: &str) -> Value {
    let config = json!({"auths": {host: {"username": USER, "password": password}}});
    json!({".dockerconfigjson": config.to_string()})
}

/// A private model (htpasswd registry): every publish is checked at the registry with its own
/// credentials, even of a digest the node serves or has stored; a restarted plugin reports the
/// model abnormal until kubelet's republish brings the secret back, which its reads then use;
/// a restart drops the records of targets whose folders kubelet removed and creates none.
#[test]
fn csi_private_models_are_checked_per_publish_and_get_credentials_back_after_a_restart() {
    if !util::can_fuse() || !util::have_tool("htpasswd") {
        return;
    }
    let Some(registry) = util::Registry::start_with_login(USER, PASSWORD) else {
        return;
    };
    let host = registry.host().to_owned();
    // 4 MiB: above the plugin's small-file prefetch, so it stays uncached until read.
    let (expected, digest) = push_model_logged_in(
        4 * MIB as usize,
        0xa11,
        &[&format!("{host}/private/model:v1")],
        &[(&host, PASSWORD)],
    );
    let by_digest = format!("{host}/private/model@{digest}");

    let node = Node::new();
    let log = node.scratch.path("plugin.log");
    let mut plugin = Plugin::start_logging(node.dir(), &["--resolve-timeout", "5"], Some(&log));
    let with_secret = |id: &str, t: &Path, password: Option<&str>| {
        let mut r = inline_publish(id, t, &[("reference", &by_digest)]);
        if let Some(password) = password {
            r["secrets"] = docker_secret(&host, password);
        }
        r
    };
    let pod_a = node.target("uid-a", "model");
    plugin.ok(
        "NodePublishVolume",
        &with_secret("csi-a", &pod_a, Some(PASSWORD)),
    );
    // The model is served: another pod's wrong secret, or none, still gets nothing.
    let pod_b = node.target("uid-b", "model");
    let (code, message) = plugin.fails(
        "NodePublishVolume",
        &with_secret("csi-b", &pod_b, Some("wrong")),
    );
    assert_eq!(code, "PermissionDenied", "{message}");
    assert!(
        message.contains("nodePublishSecretRef") && !message.contains("wrong"),
        "{message}"
    );
    let (code, message) = plugin.fails("NodePublishVolume", &with_secret("csi-b", &pod_b, None));
    assert_eq!(code, "PermissionDenied", "{message}");
    assert!(!modelpack_testkit::mounts::is_mounted(&pod_b));

    // A second volume, whose pod folder kubelet removes while the plugin is away.
    let pod_gone = node.target("uid-gone", "model");
    plugin.ok(
        "NodePublishVolume",
        &with_secret("csi-g", &pod_gone, Some(PASSWORD)),
    );
    let status = plugin.stop_with(modelpack_testkit::process::Signal::TERM);
    assert!(status.success(), "{status}");
    let gone_parent = pod_gone.parent().expect("parent").to_owned();
    modelpack_testkit::mounts::detach_all(&pod_gone);
    std::fs::remove_dir_all(&gone_parent).expect("kubelet removes the pod's folder");

    plugin = Plugin::start_logging(node.dir(), &["--resolve-timeout", "5"], Some(&log));
    assert!(
        !gone_parent.exists(),
        "restore created a removed target folder"
    );
    let records = std::fs::read_to_string(plugin.state.join("volumes.json")).expect("records");
    assert!(!records.contains("csi-g"), "{records}");
    assert!(
        records.contains("csi-a") && !records.contains(PASSWORD),
        "{records}"
    );
    // No secret yet: abnormal, and the stats say why.
    let stats_of_a = || plugin.stats("csi-a", &pod_a);
    let stats = stats_of_a();
    assert_eq!(stats["volume_condition"]["abnormal"], true, "{stats}");
    assert!(
        stats["volume_condition"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nodePublishSecretRef")),
        "{stats}"
    );
    assert_eq!(stats["usage"][0]["available"], 0, "{stats}");
    // kubelet's republish (the same request) hands the credentials back; reads work.
    plugin.ok(
        "NodePublishVolume",
        &with_secret("csi-a", &pod_a, Some(PASSWORD)),
    );
    let stats = stats_of_a();
    assert_eq!(stats["volume_condition"]["abnormal"], false, "{stats}");
    assert_eq!(file_hashes(&pod_a), expected);

    // Unpublished (the mount goes, the manifest stays stored): a wrong secret is refused still.
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-a", &pod_a));
    let pod_c = node.target("uid-c", "model");
    let (code, message) = plugin.fails(
        "NodePublishVolume",
        &with_secret("csi-c", &pod_c, Some("wrong")),
    );
    assert_eq!(code, "PermissionDenied", "{message}");
    plugin.ok(
        "NodePublishVolume",
        &with_secret("csi-c", &pod_c, Some(PASSWORD)),
    );
    assert_eq!(file_hashes(&pod_c), expected);
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-c", &pod_c));
    let status = plugin.stop_with(modelpack_testkit::process::Signal::TERM);
    assert!(status.success(), "{status}");
    // The plugin logged (publishes, refusals, a restart), never the secret.
    let logged = std::fs::read_to_string(&log).expect("the plugin's log");
    assert!(logged.contains("published"), "{logged}");
    for secret in [
        PASSWORD.to_owned(),
        base64(PASSWORD.as_bytes()),
        base64(format!("{USER}:{PASSWORD}").as_bytes()),
    ] {
        assert!(!logged.contains(&secret), "the log holds {secret:?}");
    }
}

/// Standard base64, padded (to look for a secret's encoded form).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Two private registries serve one model (the same manifest digest), each with its own
/// password: a publish from the second, with the second's secret, hands its credentials to
/// nothing of the first's; the first pod's reads of bytes not yet fetched go on working with
/// the first's credentials (the second's, sent to the first, would be refused).
#[test]
fn csi_credentials_of_one_registry_never_reach_another_with_the_same_digest() {
    if !util::can_fuse() || !util::have_tool("htpasswd") {
        return;
    }
    const PASSWORD_2: &str = "other-Pa55word-2";
    let Some(first) = util::Registry::start_with_login(USER, PASSWORD) else {
        return;
    };
    let Some(second) = util::Registry::start_with_login(USER, PASSWORD_2) else {
        return;
    };
    let (host_1, host_2) = (first.host().to_owned(), second.host().to_owned());
    let (expected, digest) = push_model_logged_in(
        4 * MIB as usize,
        0x2e9,
        &[
            &format!("{host_1}/shared/model:v1"),
            &format!("{host_2}/shared/model:v1"),
        ],
        &[(&host_1, PASSWORD), (&host_2, PASSWORD_2)],
    );

    let node = Node::new();
    let plugin = node.start(&["--resolve-timeout", "5"]);
    let publish = |id: &str, t: &Path, host: &str, password: &str| {
        let mut r = inline_publish(
            id,
            t,
            &[("reference", &format!("{host}/shared/model@{digest}"))],
        );
        r["secrets"] = docker_secret(host, password);
        r
    };
    let pod_a = node.target("uid-a", "model");
    plugin.ok(
        "NodePublishVolume",
        &publish("csi-a", &pod_a, &host_1, PASSWORD),
    );
    // The second registry's secret is no key to the first: refused there.
    let pod_x = node.target("uid-x", "model");
    let (code, message) = plugin.fails(
        "NodePublishVolume",
        &publish("csi-x", &pod_x, &host_1, PASSWORD_2),
    );
    assert_eq!(code, "PermissionDenied", "{message}");
    // A pod of the same digest from the second registry, with the second's secret (a
    // republish too, as kubelet's requiresRepublish does).
    let pod_b = node.target("uid-b", "model");
    let request_b = publish("csi-b", &pod_b, &host_2, PASSWORD_2);
    plugin.ok("NodePublishVolume", &request_b);
    plugin.ok("NodePublishVolume", &request_b);
    // Nothing of the weight was read yet: the first pod's reads fetch it from the first
    // registry, which refuses the second's password.
    assert_eq!(file_hashes(&pod_a), expected);
    assert_eq!(file_hashes(&pod_b), expected);
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-a", &pod_a));
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-b", &pod_b));
}

/// The FUSE connection number (the minor of its device) of the mount at `path`, from
/// `/proc/self/mountinfo`.
fn fuse_connection_of(path: &Path) -> Option<u32> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4) == Some(&wanted))
            .then(|| fields.get(2)?.split(':').nth(1)?.parse().ok())
            .flatten()
    })
}

/// Aborts the FUSE connection of the mount at `path` through the fusectl file system (mounted
/// at `/sys/fs/fuse/connections` when it is not); false when that cannot be done here.
fn abort_fuse_connection(path: &Path) -> bool {
    let Some(minor) = fuse_connection_of(path) else {
        return false;
    };
    let connections = Path::new("/sys/fs/fuse/connections");
    let abort = connections.join(minor.to_string()).join("abort");
    // Mounted here only for this write, and unmounted after it: the test leaves no mount.
    let mounted_here = !abort.exists()
        && Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(connections)
            .status()
            .is_ok_and(|s| s.success());
    let aborted = std::fs::write(&abort, b"1").is_ok();
    if mounted_here {
        let _ = Command::new("umount").arg(connections).status();
    }
    aborted
}

/// A model mount that died (its FUSE connection aborted, as when the server is killed) is not
/// reused: the next publish of the model mounts it again; the first volume's dead bind
/// (ENOTCONN) is replaced by its republish, which then reads right.
#[test]
fn csi_a_dead_model_mount_is_replaced() {
    let Some((m, expected)) = small_model_to_publish("models/dead:v1", 9) else {
        return;
    };
    let node = Node::new();
    let plugin = node.start(&[]);
    let pod_a = node.target("uid-a", "model");
    let publish_a = inline_publish("csi-a", &pod_a, &[("reference", &m.reference)]);
    plugin.ok("NodePublishVolume", &publish_a);
    let before = plugin.model_mounts();
    assert_eq!(before.len(), 1);
    let aborted = abort_fuse_connection(&before[0]);
    if aborted {
        // statfs (`stat -f`) always asks the FUSE server (a stat may be answered from
        // cached attributes).
        let out = Command::new("stat")
            .arg("-f")
            .arg(&pod_a)
            .output()
            .expect("stat -f");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && text.contains("not connected"),
            "the aborted connection's bind answers: {text}"
        );
    } else {
        assert!(
            !util::strict(),
            "cannot abort a FUSE connection here (no fusectl)"
        );
        eprintln!("no fusectl: the model mount is unmounted instead of aborted");
        modelpack_testkit::mounts::detach(&before[0]).expect("detach the model mount");
    }

    let pod_b = node.target("uid-b", "model");
    plugin.ok(
        "NodePublishVolume",
        &inline_publish("csi-b", &pod_b, &[("reference", &m.reference)]),
    );
    let after = plugin.model_mounts();
    assert!(
        !after.contains(&before[0]),
        "the dead mount was reused: {after:?}"
    );
    assert_eq!(file_hashes(&pod_b), expected);
    // kubelet's republish of the first volume: its dead bind is replaced; it reads right.
    plugin.ok("NodePublishVolume", &publish_a);
    assert_eq!(file_hashes(&pod_a), expected);
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-a", &pod_a));
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-b", &pod_b));
    plugin.wait_for_no_model_mounts("the model stayed mounted");
}

/// The access check of a publish asks the registry itself, never a mirror of it: a pull
/// mirror (open, holding the same model) in the registry's `hosts.toml` cannot let a wrong
/// secret in; the right one passes and the model reads; a secret with no entry for the
/// registry says so.
#[test]
fn csi_the_access_check_is_never_answered_by_a_mirror() {
    if !util::can_fuse() || !util::have_tool("htpasswd") {
        return;
    }
    let Some(registry) = util::Registry::start_with_login(USER, PASSWORD) else {
        return;
    };
    let Some(mirror) = util::Registry::start(None) else {
        return;
    };
    let (host, mirror_host) = (registry.host().to_owned(), mirror.host().to_owned());
    let (expected, digest) = push_model_logged_in(
        2 * MIB as usize,
        0x3a1,
        &[
            &format!("{host}/private/model:v1"),
            &format!("{mirror_host}/private/model:v1"),
        ],
        &[(&host, PASSWORD)],
    );
    let by_digest = format!("{host}/private/model@{digest}");

    let node = Node::new();
    let hosts = node.scratch.path("hosts");
    modelpack_testkit::registry::write_hosts_toml(&hosts, &host, &host, &mirror_host, "[\"pull\"]")
        .expect("write hosts.toml");
    let plugin = node.start(&[
        "--resolve-timeout",
        "5",
        "--hosts-dir",
        hosts.to_str().expect("utf8"),
    ]);
    let publish = |id: &str, t: &Path, secret: Value| {
        let mut r = inline_publish(id, t, &[("reference", &by_digest)]);
        r["secrets"] = secret;
        r
    };
    let pod_a = node.target("uid-a", "model");
    let (code, message) = plugin.fails(
        "NodePublishVolume",
        &publish("csi-a", &pod_a, docker_secret(&host, "wrong")),
    );
    assert_eq!(code, "PermissionDenied", "{message}");
    let (code, message) = plugin.fails(
        "NodePublishVolume",
        &publish("csi-a", &pod_a, docker_secret("other.example", PASSWORD)),
    );
    assert_eq!(code, "PermissionDenied", "{message}");
    assert!(
        message.contains(&format!("has no entry for registry {host}")),
        "{message}"
    );
    assert!(!modelpack_testkit::mounts::is_mounted(&pod_a));
    let request = publish("csi-a", &pod_a, docker_secret(&host, PASSWORD));
    plugin.ok("NodePublishVolume", &request);
    assert_eq!(file_hashes(&pod_a), expected);
    // An unpublish naming another volume ID leaves the volume alone.
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-other", &pod_a));
    assert!(modelpack_testkit::mounts::is_mounted(&pod_a));
    assert_eq!(file_hashes(&pod_a), expected);
    plugin.ok("NodeUnpublishVolume", &unpublish("csi-a", &pod_a));
    assert!(!modelpack_testkit::mounts::is_mounted(&pod_a));
}
