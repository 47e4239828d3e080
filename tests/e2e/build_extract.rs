//! build -> inspect -> extract round trips: the acceptance tree, reproducibility, every layer
//! encoding, Modelfiles, partial extraction, bad input, and flat memory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::util::{self, Scratch};

/// Writes `size` pseudo-random bytes.
fn random_file(path: &Path, size: usize, seed: u64) {
    let data = util::pseudo_random(size, seed);
    fs::write(path, data).expect("write random");
}

/// The tree the acceptance criteria name: nested folders, a zero-byte file, spaces and
/// non-ASCII in names, a symlink inside the tree, modes, and a weight of `weight_size` bytes.
fn acceptance_tree(root: &Path, weight_size: usize) {
    fs::create_dir_all(root.join("nested/deeper/deepest")).expect("mkdir");
    fs::create_dir_all(root.join("with space")).expect("mkdir");
    random_file(&root.join("model.safetensors"), weight_size, 42);
    fs::write(
        root.join("config.json"),
        br#"{"model_type":"llama","torch_dtype":"bfloat16","transformers_version":"4.46.0"}"#,
    )
    .expect("write");
    fs::write(root.join("tokenizer.json"), br#"{"version":"1.0"}"#).expect("write");
    fs::write(root.join("empty.bin"), b"").expect("write");
    fs::write(root.join("with space/ünïcode – notes.md"), "héllo wörld\n").expect("write");
    fs::write(root.join("nested/deeper/deepest/run.py"), b"print('hi')\n").expect("write");
    fs::set_permissions(
        root.join("nested/deeper/deepest/run.py"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    fs::write(root.join("nested/private.yaml"), b"secret: true\n").expect("write");
    fs::set_permissions(
        root.join("nested/private.yaml"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    fs::write(root.join("README.md"), b"# model\n").expect("write");
    std::os::unix::fs::symlink("../config.json", root.join("nested/config-link.json"))
        .expect("symlink");
}

fn inspect(s: &Scratch, name: &str) -> Value {
    serde_json::from_str(&s.ok(&["inspect", name, "--format", "json"])).expect("inspect JSON")
}

/// The upstream config schema, or `None` when the spec folder is missing (see testkit::spec).
fn schema_validator() -> Option<jsonschema::Validator> {
    let path = modelpack_testkit::spec::spec_dir()?.join("config-schema.json");
    let schema: Value = serde_json::from_slice(&fs::read(&path).expect("schema")).expect("JSON");
    Some(
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("schema compiles"),
    )
}

#[test]
fn acceptance_tree_round_trips_byte_identical() {
    let s = Scratch::new();
    let model = s.path("model");
    acceptance_tree(&model, 100 * 1000 * 1000);
    s.ok(&[
        "build",
        model.to_str().expect("utf8"),
        "-t",
        "acme/llama:v1",
    ]);
    let info = inspect(&s, "acme/llama:v1");

    let config = &info["config"];
    let errors: Vec<String> = schema_validator()
        .iter()
        .flat_map(|validator| validator.iter_errors(config).map(|e| e.to_string()))
        .collect();
    assert!(
        errors.is_empty(),
        "config fails the upstream schema: {errors:?}\n{config}"
    );
    assert_eq!(config["descriptor"]["family"], "llama");
    assert_eq!(config["config"]["format"], "safetensors");

    let manifest = &info["manifest"];
    assert_eq!(
        manifest["artifactType"],
        "application/vnd.cncf.model.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.cncf.model.config.v1+json"
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 9, "one layer per file (symlink included)");
    let diff_ids = config["modelfs"]["diffIds"].as_array().expect("diffIds");
    assert_eq!(diff_ids.len(), layers.len(), "one diffId per layer");
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let a = &layer["annotations"];
        let path = a["org.cncf.model.filepath"]
            .as_str()
            .expect("filepath annotation");
        assert_eq!(
            a["org.opencontainers.image.title"], path,
            "title equals filepath"
        );
        let meta: Value = serde_json::from_str(
            a["org.cncf.model.file.metadata+json"]
                .as_str()
                .expect("metadata annotation"),
        )
        .expect("metadata is JSON");
        for key in ["name", "mode", "uid", "gid", "size", "mtime", "typeflag"] {
            assert!(meta.get(key).is_some(), "{path}: metadata lacks {key}");
        }
        if layer["mediaType"]
            .as_str()
            .is_some_and(|m| m.ends_with(".raw"))
        {
            assert_eq!(
                &layer["digest"], diff_id,
                "{path}: raw diffId is the layer digest"
            );
        }
    }
    let link = layers
        .iter()
        .find(|l| l["annotations"]["org.cncf.model.filepath"] == "nested/config-link.json")
        .expect("symlink layer");
    assert_eq!(
        link["mediaType"],
        "application/vnd.cncf.model.weight.config.v1.tar"
    );

    let out = s.path("out");
    s.ok(&["extract", "acme/llama:v1", out.to_str().expect("utf8")]);
    assert_eq!(
        util::tree(&out),
        util::tree(&model),
        "extracted tree differs"
    );
    assert_eq!(
        util::mtimes(&out),
        util::mtimes(&model),
        "mtimes not restored"
    );
    assert!(s.ok(&["validate", "acme/llama:v1"]).contains("valid"));
}

#[test]
fn source_date_epoch_gives_the_same_digest() {
    let model = Scratch::new();
    acceptance_tree(&model.path("m"), 1 << 20);
    let mut digests = Vec::new();
    for _ in 0..2 {
        let s = Scratch::new();
        let out = s.run_env(
            &[
                "-q",
                "build",
                model.path("m").to_str().expect("utf8"),
                "-t",
                "r:v1",
            ],
            &[("SOURCE_DATE_EPOCH", "1700000000")],
        );
        util::assert_success(&out, &["build"]);
        digests.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        let info = inspect(&s, "r:v1");
        assert_eq!(
            info["config"]["descriptor"]["createdAt"],
            "2023-11-14T22:13:20Z"
        );
    }
    assert!(digests[0].starts_with("sha256:"), "{digests:?}");
    assert_eq!(digests[0], digests[1]);
    // Without a creation time, two builds also agree.
    let a = Scratch::new();
    let b = Scratch::new();
    let m = model.path("m");
    let m = m.to_str().expect("utf8");
    assert_eq!(
        a.ok(&["-q", "build", m, "-t", "x:1", "--no-creation-time"]),
        b.ok(&["-q", "build", m, "-t", "x:1", "--no-creation-time"])
    );
}

#[test]
fn every_layer_encoding_round_trips() {
    let s = Scratch::new();
    let model = s.path("model");
    acceptance_tree(&model, 3 << 20);
    for (tag, extra) in [
        ("tar", vec!["--layer-format", "tar"]),
        ("gzip", vec!["--layer-format", "tar", "--compress", "gzip"]),
        ("zstd", vec!["--layer-format", "tar", "--compress", "zstd"]),
    ] {
        let name = format!("enc:{tag}");
        let mut args = vec!["build", model.to_str().expect("utf8"), "-t", name.as_str()];
        args.extend(extra);
        s.ok(&args);
        let info = inspect(&s, &name);
        let suffix = match tag {
            "tar" => ".tar",
            "gzip" => ".tar+gzip",
            _ => ".tar+zstd",
        };
        for layer in info["manifest"]["layers"].as_array().expect("layers") {
            assert!(
                layer["mediaType"].as_str().expect("mt").ends_with(suffix),
                "{layer}"
            );
        }
        let out = s.path(&format!("out-{tag}"));
        s.ok(&["extract", &name, out.to_str().expect("utf8")]);
        assert_eq!(util::tree(&out), util::tree(&model), "{tag}");
        assert_eq!(util::mtimes(&out), util::mtimes(&model), "{tag}");
    }
}

#[test]
fn modelfile_selects_kinds_and_packages_datasets() {
    let s = Scratch::new();
    let model = s.path("model");
    acceptance_tree(&model, 1 << 20);
    fs::create_dir_all(model.join("data/train")).expect("mkdir");
    fs::write(model.join("data/train/part-0.jsonl"), b"{\"x\":1}\n").expect("write");
    fs::write(model.join("data/labels.txt"), b"a\nb\n").expect("write");
    let modelfile = s.path("Modelfile");
    fs::write(
        &modelfile,
        "# test\nNAME crafted\nPARAMSIZE 1m\nCONFIG *.json\nMODEL *.safetensors empty.bin\nCODE **/*.py\nDOC README.md \"with space\"\nDATASET data\n",
    )
    .expect("write");
    s.ok(&[
        "build",
        "-f",
        modelfile.to_str().expect("utf8"),
        model.to_str().expect("utf8"),
        "-t",
        "mf:v1",
    ]);
    let info = inspect(&s, "mf:v1");
    let kinds: Vec<(String, String)> = info["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["path"].as_str().expect("path").to_owned(),
                l["kind"].as_str().expect("kind").to_owned(),
            )
        })
        .collect();
    let expect = |path: &str, kind: &str| {
        assert!(
            kinds.contains(&(path.to_owned(), kind.to_owned())),
            "{path} as {kind} missing from {kinds:?}"
        );
    };
    expect("config.json", "weight.config");
    expect("model.safetensors", "weight");
    expect("empty.bin", "weight");
    expect("nested/deeper/deepest/run.py", "code");
    expect("with space/ünïcode – notes.md", "doc");
    expect("data/train/part-0.jsonl", "dataset");
    expect("data/labels.txt", "dataset");
    assert!(
        !kinds.iter().any(|(p, _)| p == "nested/private.yaml"),
        "unselected file packaged"
    );
    assert_eq!(info["config"]["descriptor"]["name"], "crafted");
    assert_eq!(info["config"]["config"]["paramSize"], "1m");

    // `modelfile generate` writes what a plain build would use; building from it gives the same
    // layers as a build without it.
    let generated = s.path("Generated");
    s.ok(&[
        "modelfile",
        "generate",
        model.to_str().expect("utf8"),
        "-o",
        generated.to_str().expect("utf8"),
    ]);
    let m = model.to_str().expect("utf8");
    let g = generated.to_str().expect("utf8");
    s.ok(&["build", m, "-t", "auto:v1", "--no-creation-time"]);
    s.ok(&["build", "-f", g, m, "-t", "gen:v1", "--no-creation-time"]);
    let paths = |name: &str| -> Vec<(Value, Value)> {
        inspect(&s, name)["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| (l["path"].clone(), l["kind"].clone()))
            .collect()
    };
    assert_eq!(paths("auto:v1"), paths("gen:v1"));
    // Generating again refuses to overwrite.
    let err = s.fails(&["modelfile", "generate", m, "-o", g]);
    assert!(err.contains("--overwrite"), "{err}");
}

#[test]
fn extract_filters_and_skips_identical_files() {
    let s = Scratch::new();
    let model = s.path("model");
    acceptance_tree(&model, 1 << 20);
    s.ok(&["build", model.to_str().expect("utf8"), "-t", "p:v1"]);
    let out = s.path("json-only");
    let o = out.to_str().expect("utf8");
    s.ok(&["extract", "p:v1", o, "--pattern", "*.json"]);
    let files: Vec<String> = util::tree(&out).into_keys().collect();
    assert_eq!(files, ["config.json", "tokenizer.json"]);
    s.ok(&["extract", "p:v1", o, "--pattern", "**/*.py"]);
    assert!(out.join("nested/deeper/deepest/run.py").exists());

    let full = s.path("full");
    let f = full.to_str().expect("utf8");
    s.ok(&["extract", "p:v1", f]);
    let report: Value =
        serde_json::from_str(&s.ok(&["extract", "p:v1", f, "--format", "json"])).expect("json");
    assert_eq!(report["written"], 0, "{report}");
    assert_eq!(
        report["skipped"], 9,
        "every file and link already identical: {report}"
    );
    // A changed file is restored.
    fs::write(full.join("README.md"), b"changed").expect("write");
    let report: Value =
        serde_json::from_str(&s.ok(&["extract", "p:v1", f, "--format", "json"])).expect("json");
    assert_eq!(report["written"], 1, "only README.md: {report}");
    assert_eq!(util::tree(&full), util::tree(&model));
}

#[test]
fn bad_build_input_gives_one_error_and_changes_nothing() {
    let s = Scratch::new();
    let model = s.path("model");
    acceptance_tree(&model, 1024);
    let m = model.to_str().expect("utf8");
    s.ok(&["build", m, "-t", "keep:v1"]);
    let before_ls = s.ok(&["ls", "--format", "json"]);

    let missing = s.path("nope");
    let err = s.fails(&["build", missing.to_str().expect("utf8"), "-t", "x:v1"]);
    assert!(err.contains("nope"), "{err}");
    let err = s.fails(&["build", m, "-t", "x:v1", "--compress", "zstd"]);
    assert!(err.contains("--layer-format tar"), "{err}");
    let err = s.fails(&["build", m, "-t", "Bad Name"]);
    assert!(err.contains("invalid reference"), "{err}");

    let bad_modelfile = s.path("Bad");
    for (text, needle) in [
        ("NAME x\nWEIGHTS *.bin\n", "line 2: unknown directive"),
        ("MODEL ../outside/*.bin\n", "escapes the build context"),
        ("MODEL /etc/passwd\n", "escapes the build context"),
        ("MODEL *.gguf\n", "matches no file"),
    ] {
        fs::write(&bad_modelfile, text).expect("write");
        let err = s.fails(&[
            "build",
            "-f",
            bad_modelfile.to_str().expect("utf8"),
            m,
            "-t",
            "x:v1",
        ]);
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    // A symlink leaving the tree is refused.
    std::os::unix::fs::symlink("/etc/passwd", model.join("escape")).expect("symlink");
    let err = s.fails(&["build", m, "-t", "x:v1"]);
    assert!(err.contains("points outside the model directory"), "{err}");
    assert_eq!(
        s.ok(&["ls", "--format", "json"]),
        before_ls,
        "the store's names changed"
    );
    assert!(s.ok(&["store", "check"]).contains("consistent"));
}

#[test]
fn validate_reports_json_paths_and_exit_codes() {
    let s = Scratch::new();
    let Some(spec) = modelpack_testkit::spec::spec_dir() else {
        return;
    };
    let vectors = spec.join("vectors");
    for entry in fs::read_dir(vectors.join("valid")).expect("vectors") {
        let path = entry.expect("entry").path();
        s.ok(&["validate", path.to_str().expect("utf8")]);
    }
    for entry in fs::read_dir(vectors.join("invalid")).expect("vectors") {
        let path = entry.expect("entry").path();
        let out = s.run(&["validate", path.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(1), "{}", path.display());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().any(|l| l.starts_with("error: $")),
            "{}: {stdout}",
            path.display()
        );
    }
    let manifest = vectors.join("manifest/01-spec-md-example-manifest.json");
    let out = s.ok(&["validate", manifest.to_str().expect("utf8")]);
    assert!(out.contains("manifest is valid"), "{out}");
}

#[test]
fn build_memory_stays_flat_on_a_1_gib_file() {
    let s = Scratch::new();
    let model = s.path("model");
    fs::create_dir_all(&model).expect("mkdir");
    // Sparse: the build still reads, hashes and writes every byte.
    let file = fs::File::create(model.join("model.safetensors")).expect("create");
    file.set_len(1 << 30).expect("set_len");
    let (ok, rss_kib) = util::peak_rss_kib(
        Command::new(util::bin())
            .arg("--store")
            .arg(s.store())
            .args(["-q", "build", "-t", "big:v1"])
            .arg(&model)
            .stdout(std::process::Stdio::null()),
    );
    assert!(ok, "build failed");
    assert!(
        rss_kib < 128 * 1024,
        "peak RSS {rss_kib} KiB is over 128 MiB"
    );
}
