//! Credentials that change under a long-running client (the snapshotter): the registry's
//! htpasswd is rotated and the Docker config updated; the next request succeeds with no new
//! client. The test runs itself again in a child process with its own `DOCKER_CONFIG`, so the
//! user's Docker config is never read or written.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use bytes::Bytes;
use modelpack_registry::{Client, ClientOptions, Repository};
use modelpack_spec::Digest;
use modelpack_testkit::registry::{Registry, RegistryOptions};

/// Set in the child process, which does the work.
const CHILD: &str = "MODELPACK_TEST_CREDENTIALS_CHILD";

fn htpasswd(user: &str, password: &str) -> Option<String> {
    let out = Command::new("htpasswd")
        .args(["-nbB", user, password])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned() + "\n")
}

fn docker_config(dir: &Path, registry: &str, user: &str, password: &str) {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config.json");
}

#[test]
fn rotated_credentials_are_read_again_without_a_new_client() {
    if std::env::var_os(CHILD).is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("test binary");
        let status = Command::new(exe)
            .args([
                "--exact",
                "rotated_credentials_are_read_again_without_a_new_client",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("DOCKER_CONFIG", dir.path())
            .status()
            .expect("run the child");
        assert!(status.success(), "the child failed");
        return;
    }
    let config_dir = std::path::PathBuf::from(std::env::var_os("DOCKER_CONFIG").expect("set"));
    let (Some(first), Some(second)) = (htpasswd("model", "first"), htpasswd("model", "second"))
    else {
        eprintln!("note: htpasswd is not installed; skipped");
        return;
    };
    let mut registry = Registry::start(RegistryOptions {
        htpasswd: Some(&first),
        ..RegistryOptions::default()
    })
    .expect("registry");
    docker_config(&config_dir, &registry.host(), "model", "first");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    let name = format!("{}/models/m:v1", registry.host());
    let repo = Repository::new(&client, &name.parse().expect("reference"));
    let blob = Bytes::from_static(b"weights");
    let digest = Digest::sha256_of(&blob);
    rt.block_on(repo.push_blob_bytes(&digest, blob.clone()))
        .expect("push with the first password");

    // Rotated on the registry and in the Docker config: the same client reads the new
    // password on the 401.
    registry
        .replace_htpasswd(&second)
        .expect("restart the registry");
    docker_config(&config_dir, &registry.host(), "model", "second");
    let read = rt
        .block_on(repo.read_blob_capped(&digest, 1 << 10))
        .expect("the new password, read again on the 401");
    assert_eq!(read, blob);

    // Rotated on the registry only: refused, one clear error without the secret.
    let third = htpasswd("model", "third").expect("htpasswd");
    registry
        .replace_htpasswd(&third)
        .expect("restart the registry");
    let err = rt
        .block_on(repo.read_blob_capped(&digest, 1 << 10))
        .expect_err("the old password");
    assert!(err.is_unauthorized(), "{err}");
    assert!(!err.to_string().contains("second"), "{err}");
}
