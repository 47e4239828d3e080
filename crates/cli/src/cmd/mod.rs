//! One module per subcommand; each turns parsed arguments into one library call and renders it.

pub mod attach;
pub mod build;
pub mod completion;
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
pub mod version;

use anyhow::Context as _;
use modelpack_spec::Reference;
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

/// Splits a `PATH[:MEDIATYPE]` argument (oras's form) into the path, its media type (`default`
/// when none is given) and its file name, the layer's title.
pub fn file_spec<'a>(
    spec: &'a str,
    default: &'a str,
) -> anyhow::Result<(&'a std::path::Path, &'a str, &'a str)> {
    let (path, media_type) = match spec.rsplit_once(':') {
        Some((p, m)) if m.contains('/') => (p, m),
        _ => (spec, default),
    };
    let title = std::path::Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{path}: not a file name"))?;
    Ok((std::path::Path::new(path), media_type, title))
}

/// A stored or remote artifact, loaded and validated.
pub type Loaded = modelpack_transfer::Artifact;

/// Fetches `text`'s manifest and config from its registry.
pub fn load_remote(registry: &crate::remote::RegistryArgs, text: &str) -> anyhow::Result<Loaded> {
    let (reference, repo) = registry.open(text)?;
    let rt = crate::remote::runtime()?;
    Ok(rt.block_on(Loaded::from_registry(&repo, &reference))?)
}

/// Resolves `text` in the store and loads its manifest and config.
pub fn load(store: &Store, text: &str) -> anyhow::Result<Loaded> {
    let reference = parse_reference(text)?;
    Ok(Loaded::from_store(store, &reference)?)
}
