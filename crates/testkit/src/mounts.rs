//! The mount table as the kernel gives it (`/proc/self/mountinfo`), with its octal escapes
//! (space, tab, newline, backslash) undone, and lazy detaching of what a test left mounted.

use std::path::{Path, PathBuf};

use rustix::mount::{UnmountFlags, unmount};

/// Every mount point, in table order.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// True when `path` (resolved) is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mount_points().contains(&path)
}

/// Detaches the mount at `path` (lazy unmount).
pub fn detach(path: &Path) -> std::io::Result<()> {
    unmount(path, UnmountFlags::DETACH).map_err(std::io::Error::from)
}

/// Detaches every mount under `dir`, deepest first.
pub fn detach_all(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = detach(&m);
    }
}

/// Detaches every mount under (and at) its folder when dropped: a test that fails half-way
/// leaves no mount behind.
#[derive(Debug)]
pub struct DetachOnDrop(pub PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        detach_all(&self.0);
    }
}

/// Undoes mountinfo's `\ooo` escapes.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_every_octal_escape_and_nothing_else() {
        assert_eq!(unescape(r"/a\040b\011c\012d\134e"), "/a b\tc\nd\\e");
        assert_eq!(unescape(r"/plain/path"), "/plain/path");
        assert_eq!(unescape(r"/short\04"), r"/short\04");
        assert_eq!(unescape(r"/not\999octal"), r"/not\999octal");
    }

    #[test]
    fn the_root_is_mounted() {
        assert!(is_mounted(Path::new("/")));
    }
}
