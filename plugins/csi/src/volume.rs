//! What a NodePublishVolume request asks for, checked once: the model reference, the target
//! path, the options, the credentials. Everything after this works on a [`Publish`].

use std::collections::HashMap;
use std::path::PathBuf;

use modelpack_spec::Reference;

use crate::error::Error;
use crate::proto::NodePublishVolumeRequest;
use crate::proto::volume_capability::AccessType;
use crate::proto::volume_capability::access_mode::Mode;

/// `volumeAttributes` key naming the model (`REGISTRY/REPO:TAG` or `REGISTRY/REPO@DIGEST`).
pub const ATTR_REFERENCE: &str = "reference";
/// `volumeAttributes` key: `"true"` fetches the whole model in the background once mounted.
pub const ATTR_PREFETCH: &str = "prefetch";
/// The key kubelet sets to `"true"` in the volume context of a CSI ephemeral inline volume.
pub const CTX_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// The prefix of every key kubelet adds itself (pod name and namespace, ephemeral flag).
pub const CTX_KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
/// The key of a `kubernetes.io/dockerconfigjson` secret given by `nodePublishSecretRef`.
pub const SECRET_DOCKER_CONFIG: &str = ".dockerconfigjson";

/// A checked NodePublishVolume request.
pub struct Publish {
    /// The CO's volume ID.
    pub volume_id: String,
    /// Where the volume is to appear (absolute).
    pub target: PathBuf,
    /// The model, as asked for (a tag is resolved to a digest at publish).
    pub reference: Reference,
    /// Fetch the whole model in the background.
    pub prefetch: bool,
    /// A CSI ephemeral inline volume (else a persistent one).
    pub ephemeral: bool,
    /// `namespace/name` of the pod, when kubelet says (the CSIDriver's `podInfoOnMount`).
    pub pod: Option<String>,
    /// The content of a `.dockerconfigjson` secret, if one was given.
    pub docker_config: Option<String>,
}

impl std::fmt::Debug for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: only whether there is one.
        f.debug_struct("Publish")
            .field("volume_id", &self.volume_id)
            .field("target", &self.target)
            .field("reference", &self.reference.to_string())
            .field("prefetch", &self.prefetch)
            .field("ephemeral", &self.ephemeral)
            .field("pod", &self.pod)
            .field(
                "docker_config",
                &self.docker_config.as_ref().map(|_| "<secret>"),
            )
            .finish()
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Checks `request` as the CSI specification and this plugin require.
pub fn check_publish(request: &NodePublishVolumeRequest) -> Result<Publish, Error> {
    if request.volume_id.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    let target = check_target(&request.target_path)?;
    let capability = request
        .volume_capability
        .as_ref()
        .ok_or_else(|| invalid("volume_capability is required"))?;
    match &capability.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => {
            return Err(invalid(
                "block volumes are not supported: a model volume is a folder (volumeMode: Filesystem)",
            ));
        }
        None => return Err(invalid("volume_capability.access_type is required")),
    }
    let mode = capability
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    let context = &request.volume_context;
    let ephemeral = context.get(CTX_EPHEMERAL).is_some_and(|v| v == "true");
    check_mode(mode, ephemeral, request.readonly)?;
    for key in context.keys() {
        if key != ATTR_REFERENCE && key != ATTR_PREFETCH && !key.starts_with(CTX_KUBELET_PREFIX) {
            return Err(invalid(format!(
                "unknown volume attribute {key:?} (known: {ATTR_REFERENCE}, {ATTR_PREFETCH})"
            )));
        }
    }
    let text = match context.get(ATTR_REFERENCE) {
        Some(r) => r.as_str(),
        // A static PersistentVolume may name the model by its volumeHandle alone.
        None if !ephemeral => request.volume_id.as_str(),
        None => {
            return Err(invalid(format!(
                "volumeAttributes.{ATTR_REFERENCE} is required (REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST)"
            )));
        }
    };
    let reference: Reference = text
        .trim()
        .parse()
        .map_err(|e| invalid(format!("reference {text:?} is not a model reference: {e}")))?;
    let prefetch = match context.get(ATTR_PREFETCH).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(invalid(format!(
                "volumeAttributes.{ATTR_PREFETCH} is {other:?}; use \"true\" or \"false\""
            )));
        }
    };
    Ok(Publish {
        volume_id: request.volume_id.clone(),
        target,
        reference,
        prefetch,
        ephemeral,
        pod: pod_of(context),
        docker_config: docker_config(&request.secrets)?,
    })
}

/// A target or volume path: required and absolute.
pub fn check_target(path: &str) -> Result<PathBuf, Error> {
    if path.is_empty() {
        return Err(invalid("target_path is required"));
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(invalid(format!(
            "target_path {} is not absolute",
            path.display()
        )));
    }
    Ok(path)
}

/// The volume is always served read-only. A persistent volume must say so (a read-only access
/// mode, or `readOnly: true`); kubelet gives every inline volume `SINGLE_NODE_WRITER` whatever
/// the pod says, so an inline volume is accepted with any mode and mounted read-only.
fn check_mode(mode: Mode, ephemeral: bool, readonly: bool) -> Result<(), Error> {
    match mode {
        Mode::Unknown => Err(invalid("volume_capability.access_mode is required")),
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Ok(()),
        _ if ephemeral || readonly => Ok(()),
        other => Err(invalid(format!(
            "a model volume is read-only: access mode {} needs readOnly: true (or accessModes [ReadOnlyMany])",
            other.as_str_name()
        ))),
    }
}

fn pod_of(context: &HashMap<String, String>) -> Option<String> {
    let name = context.get("csi.storage.k8s.io/pod.name")?;
    let namespace = context
        .get("csi.storage.k8s.io/pod.namespace")
        .map_or("default", String::as_str);
    Some(format!("{namespace}/{name}"))
}

fn docker_config(secrets: &HashMap<String, String>) -> Result<Option<String>, Error> {
    match secrets.get(SECRET_DOCKER_CONFIG) {
        Some(config) => Ok(Some(config.clone())),
        None if secrets.is_empty() => Ok(None),
        // Name the keys, never the values.
        None => Err(invalid(format!(
            "nodePublishSecretRef must name a kubernetes.io/dockerconfigjson secret (key {SECRET_DOCKER_CONFIG}); it has {:?}",
            {
                let mut keys: Vec<_> = secrets.keys().collect();
                keys.sort();
                keys
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::VolumeCapability;
    use crate::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    /// A request shaped as kubelet sends it for an inline volume.
    fn inline(reference: &str) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "csi-0123abcd".into(),
            target_path: "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/model/mount".into(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }),
            volume_context: [
                (ATTR_REFERENCE, reference),
                (CTX_EPHEMERAL, "true"),
                ("csi.storage.k8s.io/pod.name", "loader"),
                ("csi.storage.k8s.io/pod.namespace", "ml"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..Default::default()
        }
    }

    fn check(request: &NodePublishVolumeRequest, expected: Result<&str, &str>) {
        match (check_publish(request), expected) {
            (Ok(p), Ok(reference)) => assert_eq!(p.reference.to_string(), reference),
            (Err(Error::InvalidArgument(m)), Err(text)) => {
                assert!(m.contains(text), "{m:?} lacks {text:?}")
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn an_inline_volume_is_accepted_with_kubelets_writer_mode() {
        let r = inline("reg.example/models/llama:8b");
        check(&r, Ok("reg.example/models/llama:8b"));
        let p = check_publish(&r).expect("valid");
        assert!(p.ephemeral && !p.prefetch);
        assert_eq!(p.pod.as_deref(), Some("ml/loader"));
    }

    #[test]
    fn a_static_volume_names_the_model_by_its_handle_and_must_be_read_only() {
        let mut r = inline("x");
        r.volume_context.clear();
        r.volume_id = "reg.example/models/llama@sha256:".to_owned() + &"a".repeat(64);
        check(&r, Err("needs readOnly: true"));
        r.readonly = true;
        check(&r, Ok(&r.volume_id.clone()));
        r.readonly = false;
        r.volume_capability = Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeReaderOnly as i32,
            }),
        });
        check(&r, Ok(&r.volume_id.clone()));
    }

    #[test]
    fn malformed_requests_are_invalid_arguments() {
        let mut r = inline("reg.example/m:1");
        r.volume_id.clear();
        check(&r, Err("volume_id is required"));
        let mut r = inline("reg.example/m:1");
        r.target_path.clear();
        check(&r, Err("target_path is required"));
        let mut r = inline("reg.example/m:1");
        r.target_path = "relative/path".into();
        check(&r, Err("is not absolute"));
        let mut r = inline("reg.example/m:1");
        r.volume_capability = None;
        check(&r, Err("volume_capability is required"));
        let mut r = inline("reg.example/m:1");
        if let Some(c) = r.volume_capability.as_mut() {
            c.access_type = Some(AccessType::Block(BlockVolume {}));
        }
        check(&r, Err("block volumes are not supported"));
        check(&inline("Not A Reference!"), Err("is not a model reference"));
        let mut r = inline("reg.example/m:1");
        r.volume_context.remove(ATTR_REFERENCE);
        check(&r, Err("volumeAttributes.reference is required"));
        let mut r = inline("reg.example/m:1");
        r.volume_context.insert("prefech".into(), "true".into());
        check(&r, Err("unknown volume attribute \"prefech\""));
        let mut r = inline("reg.example/m:1");
        r.volume_context.insert(ATTR_PREFETCH.into(), "yes".into());
        check(&r, Err("use \"true\" or \"false\""));
    }

    #[test]
    fn secrets_other_than_a_docker_config_are_refused_without_their_values() {
        let mut r = inline("reg.example/m:1");
        r.secrets.insert("password".into(), "hunter2".into());
        let Err(Error::InvalidArgument(m)) = check_publish(&r) else {
            panic!("accepted");
        };
        assert!(m.contains("\"password\"") && !m.contains("hunter2"), "{m}");
        r.secrets.clear();
        r.secrets
            .insert(SECRET_DOCKER_CONFIG.into(), "{\"auths\":{}}".into());
        let p = check_publish(&r).expect("valid");
        assert!(!format!("{p:?}").contains("auths"));
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("auths") && shown.contains(SECRET_DOCKER_CONFIG),
            "{shown}"
        );
    }
}
