//! Image references as docker and oras parse them: `[registry/]repository[:tag][@digest]`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The registry a reference names when it names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag a reference names when it names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed reference to an artifact in a repository.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

fn invalid(reference: &str, reason: &'static str) -> Error {
    Error::InvalidReference {
        reference: reference.to_owned(),
        reason,
    }
}

fn valid_path_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

fn valid_registry(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'-' | b':' | b'[' | b']'))
}

impl Reference {
    /// The registry host (and port), e.g. `localhost:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was given (or defaulted).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if one was given.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The digest if one was given, else the tag: what to ask a registry for.
    pub fn tag_or_digest(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference> {
        if !valid_tag(tag) {
            return Err(invalid(tag, "invalid tag"));
        }
        Ok(Reference {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        })
    }

    /// The same repository pinned to `digest`, keeping the tag for display.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The short form docker prints: `docker.io/library/` dropped, tag and digest kept.
    pub fn familiar(&self) -> String {
        let mut name = self.familiar_name();
        if let Some(tag) = &self.tag {
            name.push(':');
            name.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            name.push('@');
            name.push_str(digest.as_str());
        }
        name
    }

    /// The repository in familiar form, without tag or digest (`llama`, `localhost:5000/llama`).
    pub fn familiar_name(&self) -> String {
        if self.registry == DEFAULT_REGISTRY {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_owned()
        } else {
            format!("{}/{}", self.registry, self.repository)
        }
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(invalid(s, "empty reference"));
        }
        if s.len() > 4096 {
            return Err(invalid(s, "longer than 4096 bytes"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((left, right)) => (left, Some(right.parse::<Digest>()?)),
            None => (s, None),
        };
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(&name_tag[at + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(invalid(s, "invalid tag"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if !valid_registry(&registry) {
            return Err(invalid(s, "invalid registry host"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.len() > 255 || !repository.split('/').all(valid_path_component) {
            return Err(invalid(
                s,
                "repository must be lower-case letters, digits and separators",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    /// The fully qualified form, e.g. `docker.io/library/llama:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, full: &str, familiar: &str) {
        let r: Reference = input.parse().expect("parses");
        assert_eq!(r.to_string(), full, "full form of {input}");
        assert_eq!(r.familiar(), familiar, "familiar form of {input}");
    }

    #[test]
    fn docker_rules() {
        check("llama", "docker.io/library/llama:latest", "llama:latest");
        check("org/llama:8b", "docker.io/org/llama:8b", "org/llama:8b");
        check(
            "localhost:5000/llama",
            "localhost:5000/llama:latest",
            "localhost:5000/llama:latest",
        );
        check("localhost/a/b:v1", "localhost/a/b:v1", "localhost/a/b:v1");
        check(
            "ghcr.io/x/y:1.0-rc",
            "ghcr.io/x/y:1.0-rc",
            "ghcr.io/x/y:1.0-rc",
        );
        let d = format!("sha256:{}", "0".repeat(64));
        check(
            &format!("127.0.0.1:5000/m@{d}"),
            &format!("127.0.0.1:5000/m@{d}"),
            &format!("127.0.0.1:5000/m@{d}"),
        );
    }

    #[test]
    fn refuses_bad() {
        for bad in [
            "",
            "UPPER",
            "a:",
            "a:b:c",
            "a//b",
            "-a",
            "a@sha256:xyz",
            "reg.io/",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} accepted");
        }
    }
}
