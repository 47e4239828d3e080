//! TLS verification on by default, concurrent pulls into one store, a full disk, and passwords
//! kept out of the process list.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use crate::util::{self, Registry, Scratch};
use modelpack_testkit::fault::{Fault, FaultProxy, Rule};

fn small_model(s: &Scratch, size: usize) -> PathBuf {
    let config: &[u8] = br#"{"model_type":"rel"}"#;
    util::model_with_weight(s, size, 0x5eed_1234_abcd_0001, &[("config.json", config)])
}

/// A test CA and a certificate for 127.0.0.1 it signed, made with openssl:
/// (CA certificate, server certificate, server key).
fn test_pki(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    if !util::have_tool("openssl") {
        return None;
    }
    let run = |args: &[&str]| {
        util::checked_output(
            Command::new("openssl").args(args).current_dir(dir),
            &format!("openssl {args:?}"),
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=modelpack test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "registry.key",
        "-out",
        "registry.csr",
    ]);
    fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    run(&[
        "x509",
        "-req",
        "-in",
        "registry.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "registry.crt",
    ]);
    Some((
        dir.join("ca.crt"),
        dir.join("registry.crt"),
        dir.join("registry.key"),
    ))
}

#[test]
fn tls_is_verified_by_default_and_a_ca_file_is_honoured() {
    let s = Scratch::new();
    let Some((ca, cert, key)) = test_pki(s.dir.path()) else {
        return;
    };
    let Some(registry) = Registry::start_tls(&cert, &key) else {
        return;
    };
    let dir = small_model(&s, 1 << 20);
    let reference = format!("{}/tls/model:v1", registry.host());
    s.ok(&["build", dir.to_str().expect("utf8"), "-t", &reference]);
    let err = s.fails(&["push", &reference]);
    assert!(
        err.to_lowercase().contains("certificate"),
        "an untrusted certificate must be refused, naming it: {err}"
    );
    let ca = ca.to_str().expect("utf8");
    s.ok(&["push", &reference, "--ca-file", ca]);
    let reader = Scratch::new();
    let err = reader.fails(&["pull", &reference]);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(
        !reader.store().join("index.json").exists()
            || !fs::read_to_string(reader.store().join("index.json"))
                .unwrap_or_default()
                .contains("tls/model"),
        "a refused pull recorded the model"
    );
    let out = reader.path("out");
    reader.ok(&[
        "pull",
        &reference,
        "--ca-file",
        ca,
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(util::tree(&out), util::tree(&dir));
    // --insecure is the explicit opt-out.
    let other = Scratch::new();
    other.ok(&["pull", &reference, "--insecure"]);
}

#[test]
fn two_processes_pulling_one_model_into_one_store_both_succeed() {
    let Some(m) =
        util::registry_with_pushed_model("rel/concurrent:v1", |s| small_model(s, 24 << 20))
    else {
        return;
    };
    let (_, s, dir, reference) = m.parts();
    let reader = Scratch::new();
    let spawn = || {
        reader
            .command(&["-q", "pull", reference, "--plain-http"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pull")
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().expect("wait");
        util::assert_success(&out, &["pull (concurrent)"]);
    }
    assert!(reader.ok(&["store", "check"]).contains("consistent"));
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let blobs = names(&reader.store().join("blobs/sha256"));
    let expected = names(&s.store().join("blobs/sha256"));
    assert_eq!(blobs, expected, "one copy of each blob, no leftovers");
    let out = reader.path("out");
    reader.ok(&["extract", reference, out.to_str().expect("utf8")]);
    assert_eq!(util::tree(&out), util::tree(dir));
}

#[test]
fn a_full_disk_fails_cleanly_and_leaves_the_store_consistent() {
    if !util::root_or_skip("the full-disk test") {
        return;
    }
    let Some(m) =
        util::registry_with_pushed_model("rel/disk-full:v1", |s| small_model(s, 12 << 20))
    else {
        return;
    };
    let reference = &m.reference;
    let tiny = m.s.path("tiny");
    let _guard = util::Tmpfs::mount_small(&tiny);
    let store = tiny.join("store");
    let store_text = store.to_str().expect("utf8");
    let target = tiny.join("out");
    fs::create_dir_all(&target).expect("mkdir");
    fs::write(target.join("keep.txt"), b"mine").expect("write");
    let out = Command::new(util::bin())
        .args(["--store", store_text, "pull", reference, "--plain-http"])
        .output()
        .expect("run pull");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("space"), "{}", errors[0]);
    // Said before the download, when its blocks are reserved, not somewhere in the middle.
    assert!(errors[0].contains("reserving"), "{}", errors[0]);
    let check = Command::new(util::bin())
        .args(["--store", store_text, "store", "check"])
        .output()
        .expect("store check");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("consistent"),
        "{}",
        util::output_text(&check)
    );
    // -o into the full disk: the target folder is left as it was.
    let out = Command::new(util::bin())
        .args([
            "--store",
            store_text,
            "pull",
            reference,
            "--plain-http",
            "-o",
        ])
        .arg(&target)
        .output()
        .expect("run pull -o");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        util::listing(&target),
        vec![target.join("keep.txt").display().to_string()]
    );
}

#[test]
fn a_password_given_with_p_is_not_in_the_process_list() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    // Stall the registry's answers so the commands are still running when we look.
    let proxy = FaultProxy::start(registry.port);
    proxy.add(Rule::new(
        None,
        "/v2/",
        4,
        Fault::Stall(Duration::from_secs(3)),
    ));
    let s = Scratch::new();
    let host = proxy.host();
    let reference = format!("{host}/rel/secret:v1");
    // (command, its target, how the password is given)
    let runs: [(&str, &str, &[&str]); 3] = [
        ("login", &host, &["-p", "hunter2-one"]),
        ("pull", &reference, &["--password=hunter2-two"]),
        ("pull", &reference, &["-phunter2-three"]),
    ];
    for (command, target, password) in runs {
        let mut args = vec![command, target, "-u", "bob"];
        args.extend(password);
        args.push("--plain-http");
        let mut child = s.spawn_silenced(&args);
        std::thread::sleep(Duration::from_millis(1000));
        let cmdline = fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            shown.contains(args[0]),
            "the process ended too soon: {shown:?}"
        );
        assert!(
            !shown.contains("hunter2"),
            "password in the process list: {shown:?}"
        );
    }
}
