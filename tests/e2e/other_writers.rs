//! Artifacts the project did not make: the spec's own example shape (layers without any name
//! annotation), modctl's shapes (file metadata without a title, the legacy `cnai` names, real
//! owners and times in tar layers), and `oras push --artifact-type` with the ModelPack type.
//! Each is pushed to a real registry and read back with `pull -o`, `extract` and `mount`.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::util::{self, Mount, Registry, Scratch};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A tar entry: path, mode, uid, gid, mtime, bytes.
type TarEntry<'a> = (&'a str, u32, u64, u64, u64, &'a [u8]);

/// A tar of `files`, as modctl writes tar layers (real owners and times).
fn tar_of(files: &[TarEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, uid, gid, mtime, body) in files {
        let mut header = tar::Header::new_ustar();
        header.set_path(path).expect("path");
        header.set_size(body.len() as u64);
        header.set_mode(*mode);
        header.set_uid(*uid);
        header.set_gid(*gid);
        header.set_mtime(*mtime);
        header.set_cksum();
        builder.append(&header, *body).expect("append");
    }
    builder.into_inner().expect("tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).expect("zstd")
}

/// A layer descriptor for `blob` (written into the store) with `annotations`, and its diff ID
/// (the digest of the uncompressed bytes).
fn layer(
    store: &Path,
    media_type: &str,
    blob: &[u8],
    uncompressed: &[u8],
    annotations: Option<Value>,
) -> (Value, String) {
    let digest = util::put_blob(store, blob);
    let mut descriptor = json!({"mediaType": media_type, "digest": digest, "size": blob.len()});
    if let Some(a) = annotations {
        descriptor["annotations"] = a;
    }
    (
        descriptor,
        format!("sha256:{}", util::sha256_hex(uncompressed)),
    )
}

/// Writes a manifest over `layers` with a config of `config_media_type` into the store, names
/// it `name`, and pushes it to `reference`.
fn tag_and_push(
    s: &Scratch,
    name: &str,
    reference: &str,
    manifest: Value,
    layers: &[(Value, String)],
) {
    let diff_ids: Vec<&String> = layers.iter().map(|l| &l.1).collect();
    let config = serde_json::to_vec(&json!({
        "descriptor": {"name": "foreign"},
        "config": {},
        "modelfs": {"type": "layers", "diffIds": diff_ids},
    }))
    .expect("json");
    let config_digest = util::put_blob(&s.store(), &config);
    let mut manifest = manifest;
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config.len());
    manifest["layers"] = Value::Array(layers.iter().map(|l| l.0.clone()).collect());
    s.ok(&["ls"]);
    util::tag_manifest(
        &s.store(),
        name,
        &serde_json::to_vec(&manifest).expect("json"),
    );
    s.ok(&["push", reference, "--from", name, "--plain-http"]);
}

/// The folder `pull -o` writes, the one `extract` writes from the pulled store, and (with FUSE)
/// the mounted tree: all three must be `expected`. Returns the `pull -o` stderr.
fn read_three_ways(reference: &str, expected: &[(&str, &[u8])]) -> String {
    let reader = Scratch::new();
    let out = reader.path("pulled");
    let pulled = reader.run(&util::pull_to_args(reference, &out));
    util::assert_success(&pulled, &["pull", "-o"]);
    let stderr = String::from_utf8_lossy(&pulled.stderr).into_owned();
    reader.ok(&["pull", reference, "--plain-http"]);
    let extracted = reader.path("extracted");
    reader.ok(&["extract", reference, &extracted.display().to_string()]);
    let mut dirs = vec![out, extracted];
    let mount =
        util::can_fuse().then(|| Mount::start(&reader, reference, &reader.path("mnt"), &[]));
    if let Some(m) = &mount {
        dirs.push(m.dir.clone());
    }
    for dir in &dirs {
        for (path, body) in expected {
            let got = std::fs::read(dir.join(path))
                .unwrap_or_else(|e| panic!("{}: {path}: {e}", dir.display()));
            assert!(got == *body, "{}: {path} differs", dir.display());
        }
    }
    stderr
}

#[test]
fn layers_without_name_annotations_are_read_from_their_entries_and_digests() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let store = s.store();
    let (a, b, readme, config, loose) = (
        modelpack_testkit::data::pseudo_random(3 << 20, 1),
        modelpack_testkit::data::pseudo_random(100_000, 2),
        b"# a model\n".to_vec(),
        br#"{"hidden_size": 8}"#.to_vec(),
        modelpack_testkit::data::pseudo_random(50_000, 3),
    );
    let weights = tar_of(&[
        ("weights/a.bin", 0o644, 0, 0, 1_700_000_000, &a),
        ("weights/b.bin", 0o600, 0, 0, 1_700_000_000, &b),
    ]);
    let docs = tar_of(&[("README.md", 0o644, 0, 0, 1_700_000_000, &readme)]);
    let cfg = tar_of(&[("config.json", 0o644, 0, 0, 1_700_000_000, &config)]);
    // The spec's example: tar, tar+gzip and tar+zstd layers with no annotations, and a raw
    // layer that names no file.
    let layers = vec![
        layer(
            &store,
            "application/vnd.cncf.model.weight.v1.tar",
            &weights,
            &weights,
            None,
        ),
        layer(
            &store,
            "application/vnd.cncf.model.doc.v1.tar+gzip",
            &gzip(&docs),
            &docs,
            None,
        ),
        layer(
            &store,
            "application/vnd.cncf.model.weight.config.v1.tar+zstd",
            &zstd(&cfg),
            &cfg,
            None,
        ),
        layer(
            &store,
            "application/vnd.cncf.model.weight.v1.raw",
            &loose,
            &loose,
            None,
        ),
    ];
    let reference = format!("{}/foreign/unnamed:v1", registry.host());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.model.config.v1+json"},
    });
    tag_and_push(&s, "foreign/unnamed:v1", &reference, manifest, &layers);
    let loose_name = format!("sha256-{}", util::sha256_hex(&loose));
    let stderr = read_three_ways(
        &reference,
        &[
            ("weights/a.bin", &a),
            ("weights/b.bin", &b),
            ("README.md", &readme),
            ("config.json", &config),
            (&loose_name, &loose),
        ],
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("names no file"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning line for the unnamed raw layer: {stderr}"
    );
    assert!(
        warnings[0].contains(&util::sha256_hex(&loose)),
        "{}",
        warnings[0]
    );
    // validate agrees that it is a valid artifact, with warnings.
    s.ok(&["validate", "foreign/unnamed:v1"]);
}

#[test]
fn modctl_shapes_and_the_legacy_cnai_names_keep_modes_and_times() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let store = s.store();
    let weight = modelpack_testkit::data::pseudo_random(2 << 20, 4);
    let tokenizer = br#"{"version": "1.0"}"#.to_vec();
    // modctl's file metadata: nanoseconds, a local offset, a typeflag, and a field we do not
    // know; a filepath but no OCI title.
    let meta = |name: &str, size: usize, mode: u32| {
        json!({"name": name, "mode": mode, "uid": 1000, "gid": 1000, "size": size,
            "mtime": "2025-06-03T10:11:12.123456789+08:00", "typeflag": 0,
            "comment": "a field from a newer spec"})
        .to_string()
    };
    for (spelling, artifact_type, config_type, layer_prefix, key_prefix) in [
        (
            "cncf",
            "application/vnd.cncf.model.manifest.v1+json",
            "application/vnd.cncf.model.config.v1+json",
            "application/vnd.cncf.model.",
            "org.cncf.model.",
        ),
        (
            "cnai",
            "application/vnd.cnai.model.manifest.v1+json",
            "application/vnd.cnai.model.config.v1+json",
            "application/vnd.cnai.model.",
            "org.cnai.model.",
        ),
    ] {
        let code = tar_of(&[(
            "src/run.py",
            0o750,
            1000,
            1000,
            1_650_000_000,
            b"print(1)\n",
        )]);
        // (kind and encoding, path, bytes, mode in the file metadata; tar layers carry theirs)
        let files: [(&str, &str, &[u8], Option<u32>); 3] = [
            ("weight.v1.raw", "model.safetensors", &weight, Some(0o600)),
            (
                "weight.config.v1.raw",
                "tokenizer.json",
                &tokenizer,
                Some(0o644),
            ),
            ("code.v1.tar", "src", &code, None),
        ];
        let layers: Vec<(Value, String)> = files
            .iter()
            .map(|(media_type, path, bytes, mode)| {
                let mut annotations = json!({ format!("{key_prefix}filepath"): path });
                if let Some(mode) = mode {
                    annotations[format!("{key_prefix}file.metadata+json")] =
                        json!(meta(path, bytes.len(), *mode));
                }
                let media_type = format!("{layer_prefix}{media_type}");
                layer(&store, &media_type, bytes, bytes, Some(annotations))
            })
            .collect();
        let name = format!("foreign/modctl-{spelling}:v1");
        let reference = format!("{}/{name}", registry.host());
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": config_type},
            "annotations": {format!("{key_prefix}modelfile"): "NAME demo\nMODEL model.safetensors\n"},
        });
        tag_and_push(&s, &name, &reference, manifest, &layers);
        read_three_ways(
            &reference,
            &[
                ("model.safetensors", &weight),
                ("tokenizer.json", &tokenizer),
                ("src/run.py", b"print(1)\n"),
            ],
        );
        // Modes and times as recorded: the raw file's from its metadata, the tar entry's from
        // its header.
        let reader = Scratch::new();
        let out = reader.path("out");
        reader.ok(&util::pull_to_args(&reference, &out));
        let mode = |p: &str| {
            std::fs::metadata(out.join(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("model.safetensors"), 0o600, "{spelling}");
        assert_eq!(mode("src/run.py"), 0o750, "{spelling}");
        let mtimes = util::mtimes(&out);
        // 2025-06-03T10:11:12+08:00 is 1748916672 seconds after the epoch.
        assert_eq!(mtimes["model.safetensors"], 1_748_916_672, "{spelling}");
        assert_eq!(mtimes["src/run.py"], 1_650_000_000, "{spelling}");
    }
}

#[test]
fn an_oras_push_with_the_model_artifact_type_is_pulled_by_title_with_a_warning() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let store = s.store();
    let body = b"plain file pushed by oras\n".to_vec();
    let layers = vec![layer(
        &store,
        "application/vnd.oci.image.layer.v1.tar",
        &body,
        &body,
        Some(json!({"org.opencontainers.image.title": "notes.txt"})),
    )];
    let reference = format!("{}/foreign/oras:v1", registry.host());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json"},
    });
    tag_and_push(&s, "foreign/oras:v1", &reference, manifest, &layers);
    let reader = Scratch::new();
    let out = reader.path("out");
    let pulled = reader.run(&util::pull_to_args(&reference, &out));
    util::assert_success(&pulled, &["pull", "-o"]);
    assert_eq!(std::fs::read(out.join("notes.txt")).expect("notes"), body);
    let stderr = String::from_utf8_lossy(&pulled.stderr);
    assert!(
        stderr.contains("not a valid ModelPack artifact"),
        "a warning: {stderr}"
    );
    // ModelPack tar layers are never written under a title (a tar where a file belongs): an
    // invalid artifact that has them is refused, and the folder stays as it was.
    let tarred = tar_of(&[("a.bin", 0o644, 0, 0, 1_700_000_000, b"a")]);
    let titled_tar = |title: &str| {
        layer(
            &store,
            "application/vnd.cncf.model.weight.v1.tar",
            &tarred,
            &tarred,
            Some(json!({"org.opencontainers.image.title": title})),
        )
    };
    let clash = format!("{}/foreign/oras-tar:v1", registry.host());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.model.config.v1+json"},
    });
    tag_and_push(
        &s,
        "foreign/oras-tar:v1",
        &clash,
        manifest,
        &[titled_tar("same"), titled_tar("same")],
    );
    let refused_dir = reader.path("refused");
    let refused = reader.run(&util::pull_to_args(&clash, &refused_dir));
    assert!(!refused.status.success(), "{}", util::output_text(&refused));
    assert!(!refused_dir.join("same").exists());
    // validate still calls it invalid: exit 1, its problems listed as errors.
    let validated = s.run(&["validate", "foreign/oras:v1"]);
    assert_eq!(validated.status.code(), Some(1));
    let report = String::from_utf8_lossy(&validated.stdout);
    assert!(report.contains("error"), "{report}");
}

#[test]
fn build_with_the_cnai_prefix_writes_the_legacy_names_in_the_oci_field_order() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let weight = modelpack_testkit::data::pseudo_random(1 << 20, 5);
    let dir = util::write_model_dir(
        &s,
        "model",
        &[("model.safetensors", &weight), ("config.json", b"{}")],
    );
    let reference = format!("{}/legacy/model:v1", registry.host());
    s.build_and_push_with(&dir, &reference, &["--media-type-prefix", "cnai"]);
    let fetched = s.path("manifest.json");
    s.fetch_manifest_to(&reference, &fetched);
    let bytes = std::fs::read(&fetched).expect("manifest");
    let text = String::from_utf8(bytes.clone()).expect("utf-8");
    // The OCI Go struct order, as modctl re-serialises before hashing.
    assert!(
        text.starts_with(&format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/vnd.cnai.model.manifest.v1+json","config":{{"mediaType":"application/vnd.cnai.model.config.v1+json","digest":"sha256:"#
        )),
        "{text}"
    );
    let doc: Value = serde_json::from_slice(&bytes).expect("json");
    for l in doc["layers"].as_array().expect("layers") {
        assert!(
            l["mediaType"]
                .as_str()
                .is_some_and(|m| m.starts_with("application/vnd.cnai.model.")),
            "{l}"
        );
        assert!(
            l["annotations"]["org.cnai.model.filepath"].is_string(),
            "{l}"
        );
        assert!(
            l["annotations"].get("org.cncf.model.filepath").is_none(),
            "{l}"
        );
    }
    read_three_ways(
        &reference,
        &[("model.safetensors", &weight), ("config.json", b"{}")],
    );
}

#[test]
fn the_chunk_index_survives_registry_garbage_collection_and_a_lost_index_falls_back() {
    if !util::can_fuse() {
        return;
    }
    let Some(mut registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let size = 16 << 20;
    let weight = modelpack_testkit::data::pseudo_random(size, 6);
    let dir = util::write_model_dir(&s, "model", &[("model.safetensors", &weight)]);
    let reference = format!("{}/gc/model:v1", registry.host());
    s.build_and_push(&dir, &reference);
    registry.garbage_collect().expect("garbage collection");

    // After GC the first read is still lazy: the index is there, so one chunk is fetched.
    let mount = Mount::in_fresh_store(&reference, &[]);
    let mut head = vec![0u8; 4096];
    std::fs::File::open(mount.dir.join("model.safetensors"))
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .expect("read the head");
    assert_eq!(head, weight[..4096]);
    let status = mount.status();
    assert!(status["chunkIndexWarning"].is_null(), "{status}");
    let fetched = status["fetchedBytes"].as_u64().expect("fetched");
    assert!(
        fetched < size as u64,
        "a whole layer was fetched: {fetched}"
    );
    drop(mount);

    // The index deleted by hand: the mount still serves the right bytes, verifying the whole
    // layer, and says why in its status.
    let fetched_manifest = s.path("m.json");
    s.fetch_manifest_to(&reference, &fetched_manifest);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(&fetched_manifest).expect("manifest")).expect("json");
    let index = manifest["annotations"]["dev.modelpack.chunk-index.digest"]
        .as_str()
        .expect("a pinned index")
        .to_owned();
    s.ok(&[
        "blob",
        "delete",
        &format!("{}/gc/model@{index}", registry.host()),
        "--plain-http",
    ]);
    let mount = Mount::in_fresh_store(&reference, &[]);
    let got = std::fs::read(mount.dir.join("model.safetensors")).expect("read");
    assert!(got == weight, "the bytes differ");
    let status = mount.status();
    let warning = status["chunkIndexWarning"].as_str().unwrap_or_default();
    assert!(warning.contains(&index), "{status}");
    drop(mount);
    // `--verify none` is for artifacts that never had an index: a pinned index that is lost
    // still gets whole-layer verification, so the first read fetches the whole layer.
    let mount = Mount::in_fresh_store(&reference, &["--verify", "none"]);
    std::fs::File::open(mount.dir.join("model.safetensors"))
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .expect("read the head");
    assert_eq!(head, weight[..4096]);
    let fetched = mount.status()["fetchedBytes"].as_u64().expect("fetched");
    assert!(
        fetched >= size as u64,
        "served before the layer was verified: {fetched}"
    );
}

#[test]
fn pull_into_a_folder_fetches_each_tar_layer_once() {
    let Some(m) = util::registry_and_model("tarred/model:v1", |s| {
        let weight = modelpack_testkit::data::pseudo_random(8 << 20, 7);
        util::write_model_dir(
            s,
            "model",
            &[("model.safetensors", &weight), ("config.json", b"{}")],
        )
    }) else {
        return;
    };
    m.s.build_and_push_with(&m.dir, &m.reference, &["--layer-format", "tar"]);
    let inspected: Value =
        serde_json::from_str(&m.s.ok(&["inspect", &m.reference, "--format", "json"]))
            .expect("inspect JSON");
    let layer_bytes = util::layer_bytes(&inspected);
    let (proxy, via) = m.through_proxy(None);
    let reader = Scratch::new();
    let out = reader.path("out");
    reader.ok(&util::pull_to_args(&via, &out));
    let served = proxy.served();
    // Each layer once, plus the manifest, config and chunk index (a few KiB).
    assert!(
        served >= layer_bytes && served < layer_bytes + (256 << 10),
        "served {served} bytes for {layer_bytes} bytes of layers"
    );
    assert_eq!(
        util::sha256_file(&out.join("model.safetensors")),
        util::sha256_file(&m.dir.join("model.safetensors"))
    );
}
