//! Registry credentials from a `kubernetes.io/dockerconfigjson` secret (the content of a
//! Docker `config.json`: `auths` by registry host, each with `auth` = base64 `user:password`,
//! or `username`/`password`, or an `identitytoken`).

use base64::Engine as _;
use modelpack_registry::Credential;

use crate::error::Error;

/// The credential `config` holds for `registry`, if any. Errors name the registry, never a
/// secret.
pub fn credential_for(config: &str, registry: &str) -> Result<Option<Credential>, Error> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "the .dockerconfigjson secret is not a Docker config ({why})"
        ))
    };
    let value: serde_json::Value = serde_json::from_str(config).map_err(|_| bad("not JSON"))?;
    let auths = &value["auths"];
    // The registry crate's keys: `docker.io` is stored under `https://index.docker.io/v1/`.
    let keys = modelpack_registry::credentials::keys_for(registry);
    let Some(entry) = keys.iter().map(|k| &auths[k]).find(|e| e.is_object()) else {
        return Ok(None);
    };
    if let Some(token) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential {
            username: String::new(),
            secret: token.to_owned(),
            identity_token: true,
        }));
    }
    if let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad(&format!("auth of {registry} is not base64")))?;
        let (username, secret) = decoded
            .split_once(':')
            .ok_or_else(|| bad(&format!("auth of {registry} is not user:password")))?;
        return Ok(Some(Credential {
            username: username.to_owned(),
            secret: secret.to_owned(),
            identity_token: false,
        }));
    }
    match (entry["username"].as_str(), entry["password"].as_str()) {
        (Some(username), Some(password)) => Ok(Some(Credential {
            username: username.to_owned(),
            secret: password.to_owned(),
            identity_token: false,
        })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries_decode_to_user_and_password() {
        // base64("alice:s3cret")
        let config = r#"{"auths":{"reg.example:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#;
        let c = credential_for(config, "reg.example:5000")
            .expect("valid")
            .expect("found");
        assert_eq!(
            (c.username.as_str(), c.secret.as_str()),
            ("alice", "s3cret")
        );
        assert!(
            credential_for(config, "other.example")
                .expect("valid")
                .is_none()
        );
    }

    #[test]
    fn url_keys_tokens_and_plain_fields_are_read() {
        let config = r#"{"auths":{"https://reg.example":{"identitytoken":"tok"},
            "plain.example":{"username":"bob","password":"pw"}}}"#;
        let t = credential_for(config, "reg.example")
            .expect("ok")
            .expect("found");
        assert!(t.identity_token && t.secret == "tok");
        let p = credential_for(config, "plain.example")
            .expect("ok")
            .expect("found");
        assert_eq!(p.username, "bob");
    }

    #[test]
    fn docker_hub_is_found_under_its_index_url() {
        let config = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"}}}"#;
        let c = credential_for(config, "docker.io")
            .expect("valid")
            .expect("found");
        assert_eq!(c.username, "alice");
    }

    #[test]
    fn garbage_is_refused_without_echoing_it() {
        let e = credential_for("{\"auths\":{\"r\":{\"auth\":\"%%%secret\"}}}", "r")
            .expect_err("refused");
        assert!(!e.to_string().contains("%%%"), "{e}");
        assert!(
            credential_for("not json hunter2", "r")
                .is_err_and(|e| !e.to_string().contains("hunter2"))
        );
    }
}
