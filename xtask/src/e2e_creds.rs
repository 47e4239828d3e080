//! Step 9 of the containerd checks: credentials rotated while the snapshotter runs. A registry
//! with htpasswd auth serves a model; the snapshotter reads the Docker config that `modelpack
//! login` wrote; a container reads the start of the weight lazily. Then the registry's password
//! changes and `modelpack login` writes the new one: a second container reads the whole weight,
//! which the snapshotter fetches with the new password, read again on the 401, with no restart.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use modelpack_testkit::link::Link;
use modelpack_testkit::registry::{Registry, RegistryOptions};

use crate::containerd::NAMESPACE;
use crate::e2e::Rig;

/// `htpasswd -nbB USER PASSWORD`: one bcrypt line.
fn htpasswd(user: &str, password: &str) -> anyhow::Result<String> {
    let out = Command::new("htpasswd")
        .args(["-nbB", user, password])
        .output()
        .context("cannot run htpasswd (cargo xtask setup installs apache2-utils)")?;
    ensure!(out.status.success(), "htpasswd failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned() + "\n")
}

/// `modelpack ARGS` with the rig's store and the step's Docker config.
fn modelpack(rig: &Rig, docker_config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&rig.bins.modelpack)
        .args(args)
        .env("MODELPACK_STORE", rig.path("store"))
        .env("DOCKER_CONFIG", docker_config)
        .stdin(Stdio::null())
        .output()
        .context("cannot run modelpack")?;
    ensure!(
        out.status.success(),
        "modelpack {} failed: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The step; leaves the snapshotter running with the step's Docker config (it only adds the
/// step's registry).
pub fn rotated_credentials(rig: &mut Rig, image: &str) -> anyhow::Result<()> {
    println!("== 9. credentials rotated while the snapshotter runs");
    let mut registry = Registry::start(RegistryOptions {
        dir: Some(&rig.path("auth-registry")),
        htpasswd: Some(&htpasswd("model", "first-secret")?),
        ..RegistryOptions::default()
    })
    .context("cannot start docker-registry with htpasswd")?;
    // Bytes counted on their way to the snapshotter.
    let link = Link::start(registry.port, None);
    let docker_config = rig.path("docker-config");
    fs::create_dir_all(&docker_config)?;
    let login = |rig: &Rig, password: &str| {
        modelpack(
            rig,
            &docker_config,
            &[
                "login",
                "-q",
                "--plain-http",
                "-u",
                "model",
                "-p",
                password,
                &link.host(),
            ],
        )
    };
    login(rig, "first-secret")?;
    rig.snapshotter
        .set_env("DOCKER_CONFIG", docker_config.as_os_str());
    rig.snapshotter.restart()?;
    rig.containerd.wait_for_snapshotter()?;

    let weight_mib = 96;
    let model = rig.path("model-auth");
    crate::e2e::make_model(&model, weight_mib)?;
    let reference = format!("{}/e2e/auth:v1", link.host());
    let dir = model.display().to_string();
    modelpack(
        rig,
        &docker_config,
        &["build", "-q", &dir, "-t", &reference],
    )?;
    modelpack(
        rig,
        &docker_config,
        &["push", "-q", "--plain-http", &reference],
    )?;
    let expected = crate::e2e::tree_digests(&model)?
        .remove("model.safetensors")
        .context("the model has no model.safetensors")?;
    let socket = rig.containerd.socket.display().to_string();
    let ctd = ["--address", &socket, "--namespace", NAMESPACE];
    let mut pull = vec!["containerd", "pull", "-q", "--plain-http"];
    pull.extend(ctd);
    pull.push(&reference);
    modelpack(rig, &docker_config, &pull)?;
    let view = rig.path("view-auth");
    fs::create_dir_all(&view)?;
    rig.mounted.push(view.clone());
    let view_arg = view.display().to_string();
    let mut mount = vec!["containerd", "mount", "-q"];
    mount.extend(ctd);
    mount.extend([reference.as_str(), view_arg.as_str()]);
    modelpack(rig, &docker_config, &mount)?;
    rig.containerd.run_with_models_ok(
        image,
        "e2e-auth-first",
        &view,
        &[
            "sh",
            "-c",
            "head -c 1048576 /models/model.safetensors > /dev/null",
        ],
    )?;
    let before = link.served();
    ensure!(
        before < weight_mib << 20,
        "the weight was fetched whole ({before} bytes) before the rotation; nothing is left to test"
    );

    // The password changes at the registry, then in the Docker config.
    registry.replace_htpasswd(&htpasswd("model", "second-secret")?)?;
    login(rig, "second-secret")?;
    let out = rig.containerd.run_with_models_ok(
        image,
        "e2e-auth-second",
        &view,
        &["sha256sum", "/models/model.safetensors"],
    )?;
    let got = out.split_whitespace().next().unwrap_or_default();
    ensure!(
        got == expected,
        "after the rotation the container read {got}, not {expected}"
    );
    let after = link.served() - before;
    ensure!(
        after > 0,
        "nothing was fetched after the rotation: the test proves nothing"
    );
    let log = rig.snapshotter.log_text();
    ensure!(
        !log.contains("second-secret") && !log.contains("first-secret"),
        "a password reached the snapshotter's log"
    );
    println!(
        "   ok: {} MiB fetched with the first password, {} MiB after the rotation with the new one, no restart; right digest",
        before >> 20,
        after >> 20
    );
    let mut umount = vec!["containerd", "umount", "-q"];
    umount.extend(ctd);
    umount.push(&view_arg);
    modelpack(rig, &docker_config, &umount)?;
    rig.mounted.retain(|d| d != &view);
    rig.containerd
        .ctr_ok(&["images", "rm", "--sync", &reference])?;
    Ok(())
}
