//! containerd snapshot labels: the contract between `modelpack containerd pull` (which prepares
//! snapshots through containerd) and `modelpack-snapshotter` (which serves them lazily).
//!
//! containerd forwards to a snapshotter only `containerd.io/snapshot.ref` and keys under
//! `containerd.io/snapshot/`, and refuses a label whose key plus value exceeds
//! [`MAX_LABEL_LEN`] bytes.

use crate::Digest;

/// The chain ID the snapshot is committed under (set by the client on Prepare).
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Repository reference the layer comes from (e.g. `registry:5000/models/m`).
pub const REFERENCE: &str = "containerd.io/snapshot/modelpack.reference";
/// Manifest digest.
pub const MANIFEST_DIGEST: &str = "containerd.io/snapshot/modelpack.manifest-digest";
/// Layer digest.
pub const LAYER_DIGEST: &str = "containerd.io/snapshot/modelpack.layer-digest";
/// Layer media type.
pub const MEDIA_TYPE: &str = "containerd.io/snapshot/modelpack.media-type";
/// The layer's file path inside the model.
pub const FILE_PATH: &str = "containerd.io/snapshot/modelpack.file-path";
/// Marks a snapshot the snapshotter serves remotely (set by the snapshotter on commit).
pub const REMOTE: &str = "containerd.io/snapshot/modelpack.remote";
/// On a View made by `modelpack containerd mount`: the folder it is mounted at.
pub const MOUNT: &str = "containerd.io/snapshot/modelpack.mount";
/// containerd's GC root label.
pub const GC_ROOT: &str = "containerd.io/gc.root";
/// containerd's GC reference from content to the config blob (on a manifest).
pub const GC_REF_CONFIG: &str = "containerd.io/gc.ref.content.config";
/// Prefix of containerd's GC reference from content to a snapshot; the snapshotter name follows.
pub const GC_REF_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
/// containerd's lease expiry label (RFC 3339).
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Longest key plus value containerd accepts for one label.
pub const MAX_LABEL_LEN: usize = 4096;

/// The chain ID of a layer stack from its diff IDs, as OCI defines it:
/// `chain(0) = diff(0)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(prev) => Digest::sha256_of(format!("{prev} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// True when `key` and `value` fit containerd's label limit.
pub fn fits(key: &str, value: &str) -> bool {
    key.len() + value.len() <= MAX_LABEL_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a: Digest = format!("sha256:{}", "a".repeat(64))
            .parse()
            .expect("digest");
        let b: Digest = format!("sha256:{}", "b".repeat(64))
            .parse()
            .expect("digest");
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        let expected = Digest::sha256_of(format!("{a} {b}").as_bytes());
        assert_eq!(chain[1], expected);
        assert_ne!(chain[1], b);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn label_limit_counts_key_and_value() {
        assert!(fits(FILE_PATH, "a/b"));
        assert!(!fits(FILE_PATH, &"x".repeat(MAX_LABEL_LEN)));
    }
}
