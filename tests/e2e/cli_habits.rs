//! What users of oras and modctl expect of a CLI: shell completion, a `version` command, logs
//! without terminal colours when they go to a pipe or a file, and a quiet unmount.

use std::fs;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use modelpack_testkit::process::Signal;

use crate::util::{self, Guard, Scratch};

const ESC: u8 = 0x1b;

/// Asserts `bytes` (what `what` wrote) hold no terminal escape sequence.
fn assert_no_escape(bytes: &[u8], what: &str) {
    assert!(
        !bytes.contains(&ESC),
        "{what} carries terminal colour codes: {}",
        String::from_utf8_lossy(bytes)
    );
}

/// True when `bytes` hold an SGR sequence (`ESC [ params m`), the escape that sets colours (on
/// a terminal, progress bars also send other escapes, such as clearing the line).
fn has_colour(bytes: &[u8]) -> bool {
    bytes.windows(2).enumerate().any(|(at, pair)| {
        pair == [ESC, b'[']
            && bytes[at + 2..]
                .iter()
                .find(|b| !(b.is_ascii_digit() || **b == b';'))
                == Some(&b'm')
    })
}

#[test]
fn completion_prints_a_script_for_each_shell() {
    let s = Scratch::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = s.run(&["completion", shell]);
        util::assert_success(&out, &["completion", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("modelpack"), "{shell}: {script}");
        for sub in ["pull", "mount", "umount", "version"] {
            assert!(script.contains(sub), "the {shell} script lacks {sub}");
        }
        assert!(
            out.stderr.is_empty(),
            "{shell}: {}",
            util::output_text(&out)
        );
    }
    // bash can load it.
    if util::have_tool("bash") {
        let script = s.path("modelpack.bash");
        fs::write(&script, s.run(&["completion", "bash"]).stdout).expect("write");
        let out = util::checked_output(
            std::process::Command::new("bash").arg("-c").arg(format!(
                "source '{}' && complete -p modelpack",
                script.display()
            )),
            "bash",
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("modelpack"),
            "{}",
            util::output_text(&out)
        );
    }
}

#[test]
fn completion_for_an_unknown_shell_is_one_error_line() {
    let s = Scratch::new();
    let out = s.run(&["completion", "nosuchshell"]);
    assert!(!out.status.success(), "{}", util::output_text(&out));
    assert!(out.stdout.is_empty(), "{}", util::output_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("nosuchshell"), "{stderr}");
    // Not a terminal: clap's message is plain text too.
    assert_no_escape(&out.stderr, "a usage error");
}

#[test]
fn version_prints_the_crate_version_as_text_and_json() {
    let s = Scratch::new();
    let version = env!("CARGO_PKG_VERSION");
    let text = s.ok(&["version"]);
    assert_eq!(
        text.lines().next(),
        Some(format!("Version:     {version}").as_str()),
        "{text}"
    );
    assert!(text.contains(std::env::consts::ARCH), "{text}");
    assert_eq!(s.ok(&["-q", "version"]).trim(), version);
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["version", "--format", "json"])).expect("JSON");
    assert_eq!(json["version"], version, "{json}");
    assert!(json["target"].is_string(), "{json}");
    // `--version` still works.
    assert_eq!(s.ok(&["--version"]).trim(), format!("modelpack {version}"));
}

#[test]
fn logs_through_a_pipe_carry_no_colour_codes() {
    let s = Scratch::new();
    // A socket in the model folder: `build` skips it with a warning.
    let dir = util::write_model_dir(&s, "model", &[("config.json", b"{}")]);
    let _socket = std::os::unix::net::UnixListener::bind(dir.join("a.sock")).expect("socket");
    let out = s.run_env(
        &["build", dir.to_str().expect("utf8"), "-t", "piped:v1"],
        &[("MODELPACK_LOG", "debug")],
    );
    util::assert_success(&out, &["build"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARN"), "no warning logged: {stderr}");
    assert_no_escape(&out.stderr, "build's log");

    // A failing command, logging at debug.
    let out = s.run_env(&["inspect", "missing:v1"], &[("MODELPACK_LOG", "debug")]);
    assert_eq!(out.status.code(), Some(1), "{}", util::output_text(&out));
    assert_no_escape(&out.stderr, "a failing command's log");
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color() {
    if !util::have_tool("script") {
        return;
    }
    let s = Scratch::new();
    let dir = util::write_model_dir(&s, "model", &[("config.json", b"{}")]);
    let _socket = std::os::unix::net::UnixListener::bind(dir.join("a.sock")).expect("socket");
    // `script` gives the command a terminal and copies what it printed to our pipe.
    let on_terminal = |no_color: Option<&str>| -> Output {
        let command = format!(
            "'{}' --store '{}' build '{}' -t tty:v1",
            util::bin().display(),
            s.store().display(),
            dir.display()
        );
        let mut cmd = std::process::Command::new("script");
        cmd.args(["-qec", &command, "/dev/null"])
            .stdin(Stdio::null())
            .env_remove("NO_COLOR");
        if let Some(value) = no_color {
            cmd.env("NO_COLOR", value);
        }
        util::checked_output(&mut cmd, "script")
    };
    let coloured = on_terminal(None);
    assert!(
        String::from_utf8_lossy(&coloured.stdout).contains("WARN"),
        "{}",
        util::output_text(&coloured)
    );
    assert!(
        has_colour(&coloured.stdout),
        "no colour on a terminal: {}",
        util::output_text(&coloured)
    );
    let plain = on_terminal(Some("1"));
    assert!(
        String::from_utf8_lossy(&plain.stdout).contains("WARN"),
        "{}",
        util::output_text(&plain)
    );
    assert!(
        !has_colour(&plain.stdout),
        "colours despite NO_COLOR=1: {}",
        util::output_text(&plain)
    );
}

#[test]
fn colour_sequences_are_told_from_other_escapes() {
    assert!(has_colour(b"\x1b[2m WARN\x1b[0m"));
    assert!(has_colour(b"\x1b[33;1mx"));
    assert!(!has_colour(b"\x1b[2Kbuilding"));
    assert!(!has_colour(b"plain\x1b["));
}

/// Starts `modelpack mount REF DIR --plain-http` in the foreground with its stderr going to
/// `log`, and waits until it serves.
fn start_mount(s: &Scratch, reference: &str, dir: &Path, log: &Path) -> Guard {
    fs::create_dir_all(dir).expect("mkdir");
    let child = s
        .command(&["mount", reference])
        .arg(dir)
        .arg("--plain-http")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start mount");
    let mut guard = Guard::new(child);
    util::wait_until(
        Duration::from_secs(10),
        Duration::from_millis(25),
        || {
            assert!(
                matches!(guard.child.try_wait(), Ok(None)),
                "the mount exited: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
            modelpack_testkit::mounts::is_mounted(dir)
        },
        || format!("{} did not mount", dir.display()),
    );
    guard
}

/// Waits for the mount process to exit by itself; returns whether it succeeded.
fn wait_for_exit(guard: &mut Guard, log: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = guard.child.try_wait() {
            return status.success();
        }
        assert!(
            Instant::now() < deadline,
            "the mount did not exit: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the mount's log holds no warning or error about unmounting.
fn assert_quiet_unmount(log: &Path, how: &str) {
    let text = fs::read_to_string(log).expect("log");
    assert!(!text.contains("Unmount failed"), "{how}: {text}");
    assert!(!text.contains("WARN"), "{how}: {text}");
    assert!(!text.contains("error:"), "{how}: {text}");
    assert_no_escape(text.as_bytes(), how);
}

#[test]
fn mount_and_umount_are_quiet() {
    if !util::can_fuse() {
        return;
    }
    let Some(m) = util::registry_with_pushed_model("habits/quiet:v1", |s| {
        util::write_model_dir(s, "model", &[("config.json", b"{}"), ("w.bin", b"weights")])
    }) else {
        return;
    };
    let (_, s, dir, reference) = m.parts();
    let mnt = s.path("mnt");
    let _detach = modelpack_testkit::mounts::DetachOnDrop(mnt.clone());
    let mnt_arg = mnt.to_str().expect("utf8");

    // `modelpack umount DIR` from another process.
    let log = s.path("umount.log");
    let mut mount = start_mount(s, reference, &mnt, &log);
    assert_eq!(util::tree(&mnt), util::tree(dir));
    s.ok(&["umount", mnt_arg]);
    assert!(
        wait_for_exit(&mut mount, &log),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!modelpack_testkit::mounts::is_mounted(&mnt));
    assert_quiet_unmount(&log, "umount DIR");

    // SIGTERM and Ctrl-C (SIGINT) to the foreground mount.
    for (signal, how) in [(Signal::TERM, "SIGTERM"), (Signal::INT, "Ctrl-C")] {
        let log = s.path(&format!("{how}.log"));
        let mut mount = start_mount(s, reference, &mnt, &log);
        mount.signal(signal);
        assert!(
            wait_for_exit(&mut mount, &log),
            "{how}: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            !modelpack_testkit::mounts::is_mounted(&mnt),
            "{how} left the mount"
        );
        assert_quiet_unmount(&log, how);
    }

    // A real failure is still reported, once: umount of a folder nothing serves.
    let out = s.run(&["umount", mnt_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", util::output_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(mnt_arg),
        "{stderr}"
    );
}
