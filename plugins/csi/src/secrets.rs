//! Registry credentials from a `kubernetes.io/dockerconfigjson` secret (the content of a
//! Docker `config.json`: `auths` by registry host, each with `auth` = base64 `user:password`,
//! or `username`/`password`, or an `identitytoken`).

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
    // The registry crate's reading, so `docker.io` is also found under
    // `https://index.docker.io/v1/`, as `docker login` writes it.
    modelpack_registry::credentials::from_auths(&value, registry).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credential `config` holds for `registry`; it must hold one.
    fn found(config: &str, registry: &str) -> Credential {
        credential_for(config, registry)
            .expect("valid")
            .expect("found")
    }

    #[test]
    fn auth_entries_decode_to_user_and_password() {
        // base64("alice:s3cret")
        let config = r#"{"auths":{"reg.example:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#;
        let c = found(config, "reg.example:5000");
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
        let t = found(config, "reg.example");
        assert!(t.identity_token && t.secret == "tok");
        let p = found(config, "plain.example");
        assert_eq!(p.username, "bob");
    }

    #[test]
    fn docker_hub_is_found_under_its_index_url() {
        let config = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"}}}"#;
        let c = found(config, "docker.io");
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
