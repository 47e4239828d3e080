//! Login and transfers against a `docker-registry` that requires htpasswd (basic) auth; the
//! password never shows in output.

use std::fs;
use std::io::Write as _;
use std::process::Stdio;

use crate::util::{self, Registry, Scratch};

const USER: &str = "modeluser";
const PASSWORD: &str = "s3cret-Pa55word";

/// A registry that requires basic auth for [`USER`] with [`PASSWORD`]; `None` when `htpasswd`
/// or `docker-registry` is not installed.
fn registry_requiring_login() -> Option<Registry> {
    Registry::start_with_login(USER, PASSWORD)
}

/// Runs modelpack with `DOCKER_CONFIG` in the scratch folder, `stdin` on standard input.
fn run(s: &Scratch, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = s
        .command(args)
        .env("DOCKER_CONFIG", s.path("docker"))
        .env("MODELPACK_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("wait")
}

/// `login HOST -u USER --password-stdin --plain-http` with `password` on standard input.
fn login(s: &Scratch, host: &str, password: &str) -> std::process::Output {
    run(
        s,
        &[
            "login",
            host,
            "-u",
            USER,
            "--password-stdin",
            "--plain-http",
        ],
        password,
    )
}

#[test]
fn login_push_pull_and_wrong_password() {
    let Some(registry) = registry_requiring_login() else {
        return;
    };
    let s = Scratch::new();
    let files: &[(&str, &[u8])] = &[("config.json", b"{}"), ("w.bin", &vec![1u8; 1 << 20])];
    let dir = util::write_model_dir(&s, "model", files);
    let reference = format!("{}/secure/model:v1", registry.host());
    s.ok(&["build", dir.to_str().expect("utf8"), "-t", &reference]);

    // Without credentials: one clear line.
    let out = run(&s, &["push", &reference, "--plain-http"], "");
    assert_eq!(out.status.code(), Some(1), "{}", util::output_text(&out));
    assert!(
        util::output_text(&out).contains("authentication"),
        "{}",
        util::output_text(&out)
    );

    // Wrong password: one error line, exit 1, the password nowhere.
    let wrong = "not-the-Pa55word";
    let out = login(&s, &registry.host(), wrong);
    let all = util::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{all}"
    );
    assert!(!all.contains(wrong), "the password leaked: {all}");
    assert!(
        !s.path("docker/config.json").exists(),
        "a failed login stored credentials"
    );

    // Right password, then push and pull with the stored credentials.
    let out = login(&s, &registry.host(), PASSWORD);
    let all = util::output_text(&out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains(PASSWORD), "the password leaked: {all}");
    let config = fs::read_to_string(s.path("docker/config.json")).expect("docker config");
    assert!(config.contains(&registry.host()));
    let out = run(&s, &["push", &reference, "--plain-http"], "");
    assert!(out.status.success(), "{}", util::output_text(&out));
    assert!(!util::output_text(&out).contains(PASSWORD));
    let other = s.path("pulled");
    let out = run(&s, &util::pull_to_args(&reference, &other), "");
    assert!(out.status.success(), "{}", util::output_text(&out));
    assert!(
        !util::output_text(&out).contains(PASSWORD),
        "debug logs leaked the password"
    );
    assert_eq!(util::tree(&other), util::tree(&dir));

    let out = run(&s, &["logout", &registry.host()], "");
    assert!(out.status.success());
    let out = run(&s, &["pull", &reference, "--plain-http"], "");
    assert_eq!(out.status.code(), Some(1), "{}", util::output_text(&out));
}

#[test]
fn credential_helper_supplies_the_password() {
    let Some(registry) = registry_requiring_login() else {
        return;
    };
    let s = Scratch::new();
    // A docker-credential helper, as credsStore names it.
    let bin = s.path("bin");
    fs::create_dir_all(&bin).expect("mkdir");
    let helper = bin.join("docker-credential-fake");
    fs::write(
        &helper,
        format!("#!/bin/sh\nread host\n[ \"$1\" = get ] && printf '{{\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n"),
    )
    .expect("write helper");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::create_dir_all(s.path("docker")).expect("mkdir");
    fs::write(s.path("docker/config.json"), br#"{"credsStore":"fake"}"#).expect("config");
    let dir = util::write_model_dir(&s, "model", &[("a.bin", b"abc")]);
    let reference = format!("{}/helper/model:v1", registry.host());
    s.ok(&["build", dir.to_str().expect("utf8"), "-t", &reference]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = s
        .command(&["push", &reference, "--plain-http"])
        .env("DOCKER_CONFIG", s.path("docker"))
        .env("PATH", path)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", util::output_text(&out));
    assert!(!util::output_text(&out).contains(PASSWORD));
}
