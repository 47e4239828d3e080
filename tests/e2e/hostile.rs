//! Hostile artifacts: paths and links that try to leave the target, and corrupt blobs. Each must
//! fail with one clear error and write nothing.

use std::fs;
use std::io::{self, Read as _, Write};
use std::path::Path;

use serde_json::Value;

use crate::util::{self, Scratch};

/// A raw weight layer holding `bytes` at `path`.
fn raw_layer(store: &Path, bytes: &[u8], path: &str) -> (Value, String) {
    util::annotated_layer(
        store,
        "application/vnd.cncf.model.weight.v1.raw",
        bytes,
        path,
        None,
    )
}

/// A tar holding `entries` (name, type, link target, data) with names written as given, even
/// names a well-behaved tar writer would refuse.
fn crafted_tar(entries: &[TarEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_old();
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("finish")
}

/// A code layer holding the tar `bytes` at `code`.
fn tar_layer(store: &Path, bytes: &[u8]) -> (Value, String) {
    util::annotated_layer(
        store,
        "application/vnd.cncf.model.code.v1.tar",
        bytes,
        "code",
        None,
    )
}

/// Tags a crafted artifact, runs extract into a fresh target inside a sandbox folder, and checks
/// it failed with `needle` and left the sandbox exactly as it was.
fn extract_refused(s: &Scratch, layers: &[(Value, String)], needle: &str) {
    util::tag_crafted_model(s, "evil:v1", layers);
    let sandbox = s.path("sandbox");
    fs::create_dir_all(sandbox.join("target")).expect("mkdir");
    fs::write(sandbox.join("target/keep.txt"), b"user data").expect("write");
    let before = util::listing(&sandbox);
    let target = sandbox.join("target/out");
    let err = s.fails(&["extract", "evil:v1", target.to_str().expect("utf8")]);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(util::listing(&sandbox), before, "extract wrote something");
    assert_eq!(
        fs::read(sandbox.join("target/keep.txt")).expect("read"),
        b"user data"
    );
    // Extracting into the existing folder fails the same way and leaves it as it was.
    let err = s.fails(&[
        "extract",
        "evil:v1",
        sandbox.join("target").to_str().expect("utf8"),
    ]);
    assert!(err.contains(needle), "{err}");
    assert_eq!(util::listing(&sandbox), before, "extract wrote something");
    assert!(!s.path("escape.txt").exists());
}

#[test]
fn dotdot_filepath_annotation_is_refused() {
    let s = Scratch::new();
    let layer = raw_layer(&s.store(), b"x", "../../escape.txt");
    extract_refused(&s, &[layer], "'..' component");
}

#[test]
fn absolute_filepath_annotation_is_refused() {
    let s = Scratch::new();
    let abs = s.path("escape.txt");
    let layer = raw_layer(&s.store(), b"x", abs.to_str().expect("utf8"));
    extract_refused(&s, &[layer], "absolute path");
}

/// A tar entry for [`crafted_tar`]: name, type, link target, data.
type TarEntry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

/// A regular file entry.
fn file<'a>(name: &'a str, data: &'a [u8]) -> TarEntry<'a> {
    (name, tar::EntryType::Regular, "", data)
}

/// A symbolic link entry.
fn symlink<'a>(name: &'a str, target: &'a str) -> TarEntry<'a> {
    (name, tar::EntryType::Symlink, target, b"")
}

/// In a fresh store, a code layer of [`crafted_tar`] `entries` is refused by extract with
/// `needle` and writes nothing (see [`extract_refused`]).
fn crafted_tar_refused(entries: &[TarEntry<'_>], needle: &str) {
    let s = Scratch::new();
    let layer = tar_layer(&s.store(), &crafted_tar(entries));
    extract_refused(&s, &[layer], needle);
}

#[test]
fn tar_entry_with_dotdot_is_refused() {
    let entries = [file("ok.py", b"fine"), file("../../escape.txt", b"evil")];
    crafted_tar_refused(&entries, "'..' component");
}

#[test]
fn tar_symlink_escape_then_write_through_is_refused() {
    // A link out of the tree, then a file written through it.
    let escape = [
        symlink("link", "../../.."),
        file("link/escape.txt", b"evil"),
    ];
    crafted_tar_refused(&escape, "leaves the model tree");
    // A link inside the tree, then a file written through it.
    let through = [
        symlink("dir/link", "../inside"),
        file("dir/link/file", b"through a link"),
    ];
    crafted_tar_refused(&through, "is a symlink");
}

#[test]
fn tar_absolute_name_and_device_nodes_are_refused() {
    let cases: [(TarEntry<'_>, &str); 3] = [
        (file("/etc/evil", b"x"), "absolute path"),
        (
            ("dev", tar::EntryType::Char, "", b""),
            "unsupported entry type",
        ),
        (
            ("hard", tar::EntryType::Link, "/etc/passwd", b""),
            "hard link target",
        ),
    ];
    for (entry, needle) in cases {
        crafted_tar_refused(&[entry], needle);
    }
}

#[test]
fn corrupt_blob_is_never_written() {
    let s = Scratch::new();
    let (good, _) = raw_layer(&s.store(), b"good bytes", "good.bin");
    let (bad, digest) = raw_layer(&s.store(), b"original", "model.bin");
    // Replace the blob's bytes behind its digest, same length.
    let hex = digest.trim_start_matches("sha256:");
    fs::write(s.store().join("blobs/sha256").join(hex), b"tampered").expect("write");
    let good_digest = good["digest"].as_str().expect("digest").to_owned();
    extract_refused(&s, &[(good, good_digest), (bad, digest.clone())], &digest);
    let check = s.run(&["store", "check"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "store check must report the corrupt blob"
    );
}

/// One pax record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

/// A tar whose one file `w.bin` holds `data` while a pax header in front of it says `size`.
fn pax_lying_tar(size: u64, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let records = pax_record("size", &size.to_string());
    let mut pax = tar::Header::new_ustar();
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_path("PaxHeader/w.bin").expect("path");
    pax.set_size(records.len() as u64);
    pax.set_mode(0o644);
    pax.set_cksum();
    builder.append(&pax, records.as_bytes()).expect("append");
    util::append_tar_file(&mut builder, "w.bin", 0o644, data.len() as u64, data);
    builder.into_inner().expect("finish")
}

#[test]
fn pax_headers_that_lie_about_sizes_are_refused() {
    for (declared, data) in [
        // Longer than the data: the entry runs off the end of the layer.
        (1 << 30, b"ten bytes!".to_vec()),
        // Shorter than the data: the rest of the data is read as the next header.
        (2, vec![b'A'; 4096]),
    ] {
        let s = Scratch::new();
        let layer = tar_layer(&s.store(), &pax_lying_tar(declared, &data));
        let digest = layer.1.clone();
        extract_refused(&s, &[layer], &digest);
    }
}

/// A tar holding one file `w.bin` of `size` zero bytes, streamed (never `size` bytes in memory).
fn zero_tar<W: Write>(size: u64, out: W) -> W {
    let mut builder = tar::Builder::new(out);
    util::append_tar_file(&mut builder, "w.bin", 0o644, size, io::repeat(0).take(size));
    builder.into_inner().expect("finish")
}

#[test]
fn decompression_bombs_are_capped_at_the_declared_size() {
    // 64 MiB of zeros in a gzip layer whose file metadata declares a 1 KiB file:
    // refused from the tar header, before the bomb is unpacked.
    let s = Scratch::new();
    let gz = zero_tar(
        64 << 20,
        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
    )
    .finish()
    .expect("gzip");
    let layer = util::annotated_layer(
        &s.store(),
        "application/vnd.cncf.model.weight.v1.tar+gzip",
        &gz,
        "w.bin",
        Some(util::file_metadata("w.bin", 1024)),
    );
    extract_refused(&s, &[layer], "decompression bomb");

    // The same in zstd with no declared size: refused because it cannot fit in the target's
    // free space (a 4 MiB tmpfs), before a byte is written. Needs root for the tmpfs.
    if !util::root_or_skip("the bomb-into-a-small-disk test") {
        return;
    }
    let s = Scratch::new();
    let zst = zero_tar(
        64 << 20,
        zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd"),
    )
    .finish()
    .expect("zstd");
    let layer = util::annotated_layer(
        &s.store(),
        "application/vnd.cncf.model.weight.v1.tar+zstd",
        &zst,
        "w.bin",
        None,
    );
    let tiny = s.path("tiny");
    let _guard = util::Tmpfs::mount_small(&tiny);
    util::tag_crafted_model(&s, "bomb:v1", &[layer]);
    fs::write(tiny.join("keep.txt"), b"mine").expect("write");
    let before = util::listing(&tiny);
    let err = s.fails(&["extract", "bomb:v1", tiny.to_str().expect("utf8")]);
    assert!(err.contains("bytes free"), "{err}");
    assert_eq!(util::listing(&tiny), before, "extract wrote something");
}

#[test]
fn setuid_bits_are_dropped_and_a_raw_size_lie_is_refused() {
    // setuid, setgid and sticky bits in a tar layer never reach the target.
    let s = Scratch::new();
    let layer = tar_layer(
        &s.store(),
        &util::tar_of_one_file("run.sh", 0o6755, b"hi\n"),
    );
    util::tag_crafted_model(&s, "suid:v1", &[layer]);
    let out = s.path("out");
    s.ok(&["extract", "suid:v1", out.to_str().expect("utf8")]);
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(out.join("run.sh"))
            .expect("stat")
            .permissions()
            .mode()
    };
    assert_eq!(mode & 0o7777, 0o755, "mode {mode:o}");

    // A raw layer whose file metadata names another size is refused before writing.
    let s = Scratch::new();
    let (mut desc, digest) = raw_layer(&s.store(), b"four", "w.bin");
    desc["annotations"]["org.cncf.model.file.metadata+json"] =
        Value::String(util::file_metadata("w.bin", 1u64 << 40).to_string());
    extract_refused(&s, &[(desc, digest)], "file metadata says");
}
