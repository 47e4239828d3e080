//! One module per subcommand; each turns parsed arguments into one library call and renders it.

pub mod attach;
pub mod build;
pub mod containerd;
pub mod copy;
pub mod extract;
pub mod inspect;
pub mod login;
pub mod ls;
pub mod modelfile;
pub mod mount;
pub mod prune;
pub mod pull;
pub mod push;
pub mod remote_ops;
pub mod rm;
pub mod store;
pub mod tag;
pub mod validate;

use anyhow::Context as _;
use modelpack_spec::oci_spec::image::Descriptor;
use modelpack_spec::{Digest, Model, ModelManifest, Reference};
use modelpack_store::Store;

use crate::args::GlobalArgs;

/// Opens the store the flags (or the environment) name.
pub fn open_store(global: &GlobalArgs) -> anyhow::Result<Store> {
    let root = global
        .store
        .clone()
        .unwrap_or_else(modelpack_store::default_root);
    Store::open(&root).with_context(|| format!("cannot open the store at {}", root.display()))
}

/// Parses a reference as the user typed it.
pub fn parse_reference(text: &str) -> anyhow::Result<Reference> {
    text.parse::<Reference>().map_err(anyhow::Error::from)
}

/// A stored artifact, loaded and validated.
pub struct Loaded {
    pub reference: Reference,
    pub descriptor: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ModelManifest,
    pub config_bytes: Vec<u8>,
    pub config: Model,
}

/// Fetches `text`'s manifest and config from its registry.
pub fn load_remote(registry: &crate::remote::RegistryArgs, text: &str) -> anyhow::Result<Loaded> {
    let reference = parse_reference(text)?;
    let client = registry.client()?;
    let repo = crate::remote::repository(&client, &reference);
    let rt = crate::remote::runtime()?;
    let fetched = rt.block_on(repo.get_manifest(&reference.tag_or_digest()))?;
    let manifest = ModelManifest::from_slice(&fetched.bytes).map_err(|report| {
        anyhow::anyhow!(
            "{} is not a valid ModelPack manifest: {}",
            reference.familiar(),
            report.error_summary()
        )
    })?;
    let config_bytes = rt.block_on(
        repo.read_blob_capped(manifest.config_digest(), modelpack_spec::MAX_DOCUMENT_SIZE),
    )?;
    let config = Model::from_slice(&config_bytes)
        .with_context(|| format!("config of {}", reference.familiar()))?;
    let descriptor = modelpack_transfer::manifest_descriptor(&fetched.bytes)?;
    Ok(Loaded {
        reference,
        descriptor,
        manifest_bytes: fetched.bytes.to_vec(),
        manifest,
        config_bytes: config_bytes.to_vec(),
        config,
    })
}

/// Resolves `text` in the store and loads its manifest and config.
pub fn load(store: &Store, text: &str) -> anyhow::Result<Loaded> {
    let reference = parse_reference(text)?;
    let descriptor = store.resolve(&reference)?;
    let digest: Digest = descriptor.digest().to_string().parse()?;
    let manifest_bytes = store.read_blob(&digest, modelpack_spec::MAX_DOCUMENT_SIZE as u64)?;
    let manifest = ModelManifest::from_slice(&manifest_bytes).map_err(|report| {
        anyhow::anyhow!(
            "{} is not a valid ModelPack manifest: {}",
            reference.familiar(),
            report.error_summary()
        )
    })?;
    let config_bytes = store.read_blob(
        manifest.config_digest(),
        modelpack_spec::MAX_DOCUMENT_SIZE as u64,
    )?;
    let config = Model::from_slice(&config_bytes)
        .with_context(|| format!("config of {}", reference.familiar()))?;
    Ok(Loaded {
        reference,
        descriptor,
        manifest_bytes,
        manifest,
        config_bytes,
        config,
    })
}
