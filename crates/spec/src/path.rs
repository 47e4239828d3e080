//! Layer file paths: relative, normalised POSIX paths that can never leave the model root.

use std::fmt;

use crate::error::{Error, Result};

/// A checked relative POSIX path naming a file inside a model tree.
///
/// Refused: empty paths, absolute paths, `..` components, empty components (`a//b`), NUL bytes,
/// backslashes and Windows drive prefixes. A leading `./` and `.` components are removed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerPath(String);

fn unsafe_path(path: &str, reason: &'static str) -> Error {
    Error::UnsafePath {
        path: path.to_owned(),
        reason,
    }
}

impl LayerPath {
    /// Checks and normalises `path`.
    pub fn new(path: &str) -> Result<LayerPath> {
        if path.is_empty() {
            return Err(unsafe_path(path, "empty path"));
        }
        if path.contains('\0') {
            return Err(unsafe_path(path, "contains a NUL byte"));
        }
        if path.contains('\\') {
            return Err(unsafe_path(path, "contains a backslash"));
        }
        if path.starts_with('/') {
            return Err(unsafe_path(path, "absolute path"));
        }
        let bytes = path.as_bytes();
        if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
            return Err(unsafe_path(path, "drive-letter path"));
        }
        let trimmed = path.strip_suffix('/').unwrap_or(path);
        let mut parts = Vec::new();
        for component in trimmed.split('/') {
            match component {
                "" => return Err(unsafe_path(path, "empty path component")),
                "." => continue,
                ".." => return Err(unsafe_path(path, "'..' component")),
                other => parts.push(other),
            }
        }
        if parts.is_empty() {
            return Err(unsafe_path(path, "names the root itself"));
        }
        Ok(LayerPath(parts.join("/")))
    }

    /// The normalised path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The components, first to last.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerPath({:?})", self.0)
    }
}

/// True when `target`, the text of a symbolic link at `link` (a relative `/`-separated path in
/// the tree), resolves inside the tree and not to its root: it is relative, and its `..`
/// components never climb above the root.
pub fn link_stays_inside(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return false;
    }
    let mut dirs: Vec<&str> = link.split('/').collect();
    dirs.pop();
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if dirs.pop().is_none() {
                    return false;
                }
            }
            other => dirs.push(other),
        }
    }
    !dirs.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_that_stay_inside() {
        assert!(link_stays_inside("a/b/link", "../x"));
        assert!(link_stays_inside("a/link", "c/./d"));
        assert!(link_stays_inside("link", "x"));
        assert!(!link_stays_inside("a/link", "../../x"));
        assert!(!link_stays_inside("a/link", ".."));
        assert!(!link_stays_inside("a/link", "/etc/passwd"));
        assert!(!link_stays_inside("a/link", ""));
    }

    #[test]
    fn normalises() {
        assert_eq!(
            LayerPath::new("./a/./b.txt").expect("ok").as_str(),
            "a/b.txt"
        );
        assert_eq!(LayerPath::new("dir/").expect("ok").as_str(), "dir");
        assert_eq!(
            LayerPath::new("with space/ünï.bin")
                .expect("ok")
                .file_name(),
            "ünï.bin"
        );
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a\\b",
            "C:x",
            ".",
            "./",
            "a\0b",
        ] {
            assert!(LayerPath::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
