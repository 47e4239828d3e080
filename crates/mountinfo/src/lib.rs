//! The host's mount table (`/proc/self/mountinfo`), read without touching any mount: a stat of a
//! FUSE mount point would wait for its server, which may be the caller.
//!
//! A crate of its own, on `std` alone, so that the lazy file system, the daemons and the test kit
//! read the table with one parser.

use std::path::{Path, PathBuf};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's device number (`major:minor`).
    pub dev: (u32, u32),
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Its file system type (`fuse.modelpack`, `overlay`, ...).
    pub fs_type: String,
}

/// Every mount of this process's namespace, in mount order (later mounts over earlier ones).
pub fn entries() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|table| table.lines().filter_map(parse).collect())
        .unwrap_or_default()
}

/// The mount on top at `path`, if `path` is a mount point.
pub fn at(path: &Path) -> Option<MountEntry> {
    entries().into_iter().rev().find(|e| e.mount_point == path)
}

/// Mount points at or under `dir`, deepest first, each once.
pub fn under(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = entries()
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// True when `path` is a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    entries().iter().any(|e| e.mount_point == path)
}

/// One mountinfo line: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE ...`.
fn parse(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let dev = fields.nth(2)?;
    let (major, minor) = dev.split_once(':')?;
    let mount_point = fields.nth(1)?;
    let fs_type = fields.skip_while(|f| *f != "-").nth(1)?;
    Some(MountEntry {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        mount_point: PathBuf::from(unescape(mount_point)),
        fs_type: fs_type.to_owned(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> std::ffi::OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    std::os::unix::ffi::OsStringExt::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_parsed_and_unescaped() {
        let e = parse(
            "36 35 0:61 / /var/lib/a\\040b rw,nosuid shared:1 master:2 - fuse.modelpack modelpack ro",
        )
        .expect("a well-formed line");
        assert_eq!(e.dev, (0, 61));
        assert_eq!(e.mount_point, Path::new("/var/lib/a b"));
        assert_eq!(e.fs_type, "fuse.modelpack");
        assert_eq!(unescape("/end\\04"), "/end\\04");
        assert!(parse("garbage").is_none());
    }

    #[test]
    fn unescapes_every_octal_escape_and_nothing_else() {
        assert_eq!(unescape(r"/a\040b\011c\012d\134e"), "/a b\tc\nd\\e");
        assert_eq!(unescape(r"/plain/path"), "/plain/path");
        assert_eq!(unescape(r"/short\04"), r"/short\04");
        assert_eq!(unescape(r"/not\999octal"), r"/not\999octal");
    }

    #[test]
    fn the_root_is_mounted() {
        assert!(at(Path::new("/")).is_some());
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/no/such/dir")));
        assert_eq!(
            under(Path::new("/")).last().map(PathBuf::as_path),
            Some(Path::new("/"))
        );
    }
}
