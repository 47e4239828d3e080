//! Credentials from the Docker config (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`): inline `auths`, a `credsStore` and per-registry `credHelpers`
//! (`docker-credential-NAME get|store|erase`). Secrets never reach logs or error text.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// A user name with a password, or an identity (refresh) token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name (`<token>` for identity tokens from helpers).
    pub username: String,
    /// Password or token.
    pub secret: String,
    /// True when `secret` is an OAuth2 refresh (identity) token.
    pub identity_token: bool,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .field("identity_token", &self.identity_token)
            .finish()
    }
}

/// The Docker config file to read and write.
pub fn docker_config_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".docker/config.json")
}

fn read_config(path: &Path) -> Result<Value> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            context: format!("reading {}", path.display()),
            source: std::io::Error::other(e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(e) => Err(Error::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Keys a registry may be stored under in a Docker config's `auths`, most specific first
/// (docker uses the index URL, `https://index.docker.io/v1/`, for Docker Hub).
pub fn keys_for(registry: &str) -> Vec<String> {
    let mut keys = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ];
    if registry == "docker.io" || registry == "registry-1.docker.io" {
        keys.push("https://index.docker.io/v1/".to_owned());
        keys.push("index.docker.io".to_owned());
    }
    keys
}

fn helper(name: &str, action: &str, input: &str) -> Result<String> {
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Io {
            context: format!("running {program}"),
            source: e,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Io {
        context: format!("running {program}"),
        source: e,
    })?;
    if !out.status.success() {
        // Helpers print "credentials not found in native keychain" and the like; never secrets.
        let first = String::from_utf8_lossy(&out.stdout);
        return Err(Error::Io {
            context: format!("{program} {action}"),
            source: std::io::Error::other(first.lines().next().unwrap_or("failed").to_owned()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn from_helper(name: &str, registry: &str) -> Result<Option<Credential>> {
    let out = match helper(name, "get", registry) {
        Ok(out) => out,
        Err(_) => return Ok(None),
    };
    let v: Value = serde_json::from_str(&out)
        .map_err(|e| Error::Protocol(format!("docker-credential-{name} get: not JSON ({e})")))?;
    let username = v["Username"].as_str().unwrap_or_default().to_owned();
    let secret = v["Secret"].as_str().unwrap_or_default().to_owned();
    if secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credential {
        identity_token: username == "<token>",
        username,
        secret,
    }))
}

/// The credential the `auths` table of a Docker config (`config.json`, or a Kubernetes
/// `.dockerconfigjson` secret) holds for `registry`: an identity token, a base64
/// `user:password`, or a username and password; `None` when it holds none. Errors name the key,
/// never a secret.
pub fn from_auths(config: &Value, registry: &str) -> Result<Option<Credential>> {
    for key in keys_for(registry) {
        let entry = &config["auths"][&key];
        if entry.is_null() {
            continue;
        }
        if let Some(token) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
            return Ok(Some(Credential {
                username: String::new(),
                secret: token.to_owned(),
                identity_token: true,
            }));
        }
        if let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
            let decoded = STANDARD
                .decode(auth)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    Error::Protocol(format!("auth entry for {key} is not base64 user:password"))
                })?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                Error::Protocol(format!("auth entry for {key} is not user:password"))
            })?;
            return Ok(Some(Credential {
                username: user.to_owned(),
                secret: pass.to_owned(),
                identity_token: false,
            }));
        }
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Ok(Some(Credential {
                username: u.to_owned(),
                secret: p.to_owned(),
                identity_token: false,
            }));
        }
    }
    Ok(None)
}

/// Looks up credentials for `registry` in the Docker config.
pub fn lookup(registry: &str) -> Result<Option<Credential>> {
    let config = read_config(&docker_config_path())?;
    if let Some(name) = config["credHelpers"][registry].as_str() {
        return from_helper(name, registry);
    }
    if let Some(credential) = from_auths(&config, registry)? {
        return Ok(Some(credential));
    }
    if let Some(name) = config["credsStore"].as_str() {
        return from_helper(name, registry);
    }
    Ok(None)
}

fn write_config(path: &Path, config: &Value) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| Error::Io {
        context: format!("writing {}", path.display()),
        source: e,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(&serde_json::to_vec_pretty(config).unwrap_or_default())
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The credential helper that keeps `registry`'s secrets: its `credHelpers` entry, else the
/// `credsStore`.
fn helper_for(config: &Value, registry: &str) -> Option<String> {
    config["credHelpers"][registry]
        .as_str()
        .or(config["credsStore"].as_str())
        .map(str::to_owned)
}

/// Stores credentials for `registry`: in the helper the config names, else inline in `auths`
/// (base64, file mode 0600, as docker does).
pub fn store(registry: &str, credential: &Credential) -> Result<()> {
    let path = docker_config_path();
    let mut config = read_config(&path)?;
    let helper_name = helper_for(&config, registry);
    if let Some(name) = helper_name {
        let input = json!({
            "ServerURL": registry,
            "Username": credential.username,
            "Secret": credential.secret,
        });
        helper(&name, "store", &input.to_string())?;
        return Ok(());
    }
    if !config["auths"].is_object() {
        config["auths"] = json!({});
    }
    let auth = STANDARD.encode(format!("{}:{}", credential.username, credential.secret));
    config["auths"][registry] = json!({ "auth": auth });
    write_config(&path, &config)
}

/// Removes credentials for `registry`; returns false when there were none.
pub fn erase(registry: &str) -> Result<bool> {
    let path = docker_config_path();
    let mut config = read_config(&path)?;
    let helper_name = helper_for(&config, registry);
    let mut removed = false;
    if let Some(auths) = config["auths"].as_object_mut() {
        for key in keys_for(registry) {
            removed |= auths.remove(&key).is_some();
        }
    }
    if removed {
        write_config(&path, &config)?;
    }
    if let Some(name) = helper_name {
        removed |= helper(&name, "erase", registry).is_ok();
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credential {
            username: "u".into(),
            secret: "hunter2".into(),
            identity_token: false,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
