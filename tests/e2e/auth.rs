//! Login and transfers against a `docker-registry` that requires htpasswd (basic) auth; the
//! password never shows in output.

use std::fs;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::util::{self, Registry, Scratch};

const USER: &str = "modeluser";
const PASSWORD: &str = "s3cret-Pa55word";

fn htpasswd() -> Option<String> {
    if !util::have_tool("htpasswd") {
        return None;
    }
    let out = Command::new("htpasswd")
        .args(["-Bbn", USER, PASSWORD])
        .output()
        .expect("htpasswd");
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned() + "\n")
}

/// Runs modelpack with `DOCKER_CONFIG` in the scratch folder, `stdin` on standard input.
fn run(s: &Scratch, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(util::bin())
        .arg("--store")
        .arg(s.store())
        .args(args)
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

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn login_push_pull_and_wrong_password() {
    let Some(htpasswd) = htpasswd() else { return };
    let Some(registry) = Registry::start(Some(&htpasswd)) else {
        return;
    };
    let s = Scratch::new();
    let dir = s.path("model");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("config.json"), b"{}").expect("write");
    fs::write(dir.join("w.bin"), vec![1u8; 1 << 20]).expect("write");
    let reference = format!("{}/secure/model:v1", registry.host());
    s.ok(&["build", dir.to_str().expect("utf8"), "-t", &reference]);

    // Without credentials: one clear line.
    let out = run(&s, &["push", &reference, "--plain-http"], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("authentication"), "{}", text(&out));

    // Wrong password: one error line, exit 1, the password nowhere.
    let wrong = "not-the-Pa55word";
    let out = run(
        &s,
        &[
            "login",
            &registry.host(),
            "-u",
            USER,
            "--password-stdin",
            "--plain-http",
        ],
        wrong,
    );
    let all = text(&out);
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
    let out = run(
        &s,
        &[
            "login",
            &registry.host(),
            "-u",
            USER,
            "--password-stdin",
            "--plain-http",
        ],
        PASSWORD,
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains(PASSWORD), "the password leaked: {all}");
    let config = fs::read_to_string(s.path("docker/config.json")).expect("docker config");
    assert!(config.contains(&registry.host()));
    let out = run(&s, &["push", &reference, "--plain-http"], "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD));
    let other = s.path("pulled");
    let out = run(
        &s,
        &[
            "pull",
            &reference,
            "--plain-http",
            "-o",
            other.to_str().expect("utf8"),
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains(PASSWORD),
        "debug logs leaked the password"
    );
    assert_eq!(util::tree(&other), util::tree(&dir));

    let out = run(&s, &["logout", &registry.host()], "");
    assert!(out.status.success());
    let out = run(&s, &["pull", &reference, "--plain-http"], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn credential_helper_supplies_the_password() {
    let Some(htpasswd) = htpasswd() else { return };
    let Some(registry) = Registry::start(Some(&htpasswd)) else {
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
    let dir = s.path("model");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("a.bin"), b"abc").expect("write");
    let reference = format!("{}/helper/model:v1", registry.host());
    s.ok(&["build", dir.to_str().expect("utf8"), "-t", &reference]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(util::bin())
        .arg("--store")
        .arg(s.store())
        .args(["push", &reference, "--plain-http"])
        .env("DOCKER_CONFIG", s.path("docker"))
        .env("PATH", path)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD));
}
