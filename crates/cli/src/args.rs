//! Command-line arguments: the clap types, shared flag groups, and the conversions from what was
//! typed to checked library values.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Pack, inspect and extract AI models as OCI artifacts (CNCF ModelPack).
#[derive(Debug, Parser)]
#[command(name = "modelpack", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Local store folder (an OCI image layout) [default: $XDG_DATA_HOME/modelpack]
    #[arg(long, global = true, env = "MODELPACK_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print only errors (and the result a script needs)
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a model artifact from a directory (with or without a Modelfile) into the store
    Build(BuildArgs),
    /// Work with Modelfiles
    #[command(subcommand)]
    Modelfile(ModelfileCommand),
    /// List the artifacts in the store
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show an artifact's manifest, config and layers
    Inspect(InspectArgs),
    /// Give a stored artifact another name
    Tag(TagArgs),
    /// Remove names from the store (blobs go at the next prune)
    #[command(alias = "remove")]
    Rm(RmArgs),
    /// Delete blobs no name reaches, and stale temporary files
    Prune(PruneArgs),
    /// Validate a config or manifest JSON file, or a stored artifact
    Validate(ValidateArgs),
    /// Restore an artifact's file tree into a directory
    Extract(ExtractArgs),
    /// Inspect the store itself
    #[command(subcommand)]
    Store(StoreCommand),
    /// Log in to a registry (credentials go to the Docker config)
    Login(crate::cmd::login::LoginArgs),
    /// Remove a registry's credentials
    Logout(crate::cmd::login::LogoutArgs),
    /// Push a stored artifact (or plain files) to a registry
    Push(crate::cmd::push::PushArgs),
    /// Pull an artifact into the store, or with -o straight into a folder
    Pull(crate::cmd::pull::PullArgs),
    /// Download only the files matching a pattern, straight into a folder
    Fetch(crate::cmd::pull::FetchArgs),
    /// Copy an artifact between registries, OCI layout folders and the store
    #[command(alias = "cp")]
    Copy(crate::cmd::copy::CopyArgs),
    /// Print the digest a reference points at
    Resolve(crate::cmd::remote_ops::ResolveArgs),
    /// Repository operations
    #[command(subcommand)]
    Repo(crate::cmd::remote_ops::RepoCommand),
    /// Manifest operations on a registry
    #[command(subcommand)]
    Manifest(crate::cmd::remote_ops::ManifestCommand),
    /// Blob operations on a registry
    #[command(subcommand)]
    Blob(crate::cmd::remote_ops::BlobCommand),
    /// Attach files to an artifact as a referrer
    Attach(crate::cmd::attach::AttachArgs),
    /// List the artifacts that refer to a manifest
    Discover(crate::cmd::attach::DiscoverArgs),
    /// Serve a model from its registry as a lazy, read-only folder (FUSE)
    Mount(crate::cmd::mount::MountArgs),
    /// Unmount a folder `mount` serves
    Umount(crate::cmd::mount::UmountArgs),
    /// Make a chunk-digest index for an artifact built elsewhere and attach it as a referrer
    Index(crate::cmd::mount::IndexArgs),
    /// Pull models into containerd lazily and mount them for containers
    #[command(subcommand)]
    Containerd(crate::cmd::containerd::ContainerdCommand),
    /// Ask a running modelpack-snapshotter how it is doing
    #[command(subcommand)]
    Snapshotter(crate::cmd::containerd::SnapshotterCommand),
    /// Print a shell completion script (bash, zsh, fish) on stdout
    Completion(crate::cmd::completion::CompletionArgs),
    /// Print the version, the git commit and the target this binary was built for
    Version(crate::cmd::version::VersionArgs),
}

/// Model metadata flags; they win over the Modelfile and over guesses.
#[derive(Debug, Args, Clone, Default)]
pub struct MetadataArgs {
    /// Model name (descriptor.name)
    #[arg(long)]
    pub name: Option<String>,
    /// Model family, e.g. llama3 (descriptor.family)
    #[arg(long)]
    pub family: Option<String>,
    /// Architecture, e.g. transformer (config.architecture)
    #[arg(long)]
    pub arch: Option<String>,
    /// Weight format, e.g. safetensors, gguf (config.format)
    #[arg(long)]
    pub format: Option<String>,
    /// Parameter count, e.g. 8b (config.paramSize)
    #[arg(long)]
    pub param_size: Option<String>,
    /// Precision, e.g. bfloat16 (config.precision)
    #[arg(long)]
    pub precision: Option<String>,
    /// Quantization, e.g. awq (config.quantization)
    #[arg(long)]
    pub quantization: Option<String>,
}

impl MetadataArgs {
    pub fn into_metadata(self) -> modelpack_build::Metadata {
        modelpack_build::Metadata {
            name: self.name,
            arch: self.arch,
            family: self.family,
            format: self.format,
            param_size: self.param_size,
            precision: self.precision,
            quantization: self.quantization,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayerFormat {
    /// One file's bytes as they are (seekable; the default)
    Raw,
    /// One file in a tar archive
    Tar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// No compression
    None,
    /// gzip
    Gzip,
    /// zstd, as independent frames with a seek table (stays randomly readable)
    Zstd,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The directory holding the model's files
    pub context: PathBuf,
    /// Name of the artifact, NAME[:TAG]
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    pub tag: String,
    /// Modelfile selecting the files (default: classify every file)
    #[arg(short = 'f', long = "file", value_name = "MODELFILE")]
    pub modelfile: Option<PathBuf>,
    /// Layer encoding
    #[arg(long, value_enum, default_value_t = LayerFormat::Raw)]
    pub layer_format: LayerFormat,
    /// Compression of tar layers
    #[arg(long, value_enum, default_value_t = Compression::None)]
    pub compress: Compression,
    /// Spelling of the ModelPack names: the spec's `cncf`, or the legacy `cnai` for registries
    /// that only know those (as modctl writes them)
    #[arg(long, value_enum, default_value_t = MediaTypePrefix::Cncf)]
    pub media_type_prefix: MediaTypePrefix,
    /// Leave out paths matching this glob (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Omit descriptor.createdAt (reproducible config)
    #[arg(long)]
    pub no_creation_time: bool,
    /// Reflink (or hard-link) raw files into the store instead of copying them
    #[arg(long)]
    pub link: bool,
    /// Files packed at once [default: number of CPUs]
    #[arg(short = 'c', long)]
    pub concurrency: Option<usize>,
    /// Push to the registry the tag names instead of keeping a local copy: raw files are hashed
    /// where they are and uploaded from there
    #[arg(long, conflicts_with = "link")]
    pub push: bool,
    #[command(flatten)]
    pub metadata: MetadataArgs,
    #[command(flatten)]
    pub connection: crate::remote::ConnectionArgs,
}

/// The `--media-type-prefix` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MediaTypePrefix {
    /// application/vnd.cncf.model.*, org.cncf.model.* (the spec)
    Cncf,
    /// application/vnd.cnai.model.*, org.cnai.model.* (legacy)
    Cnai,
}

impl From<MediaTypePrefix> for modelpack_spec::NameSpelling {
    fn from(prefix: MediaTypePrefix) -> Self {
        match prefix {
            MediaTypePrefix::Cncf => modelpack_spec::NameSpelling::Cncf,
            MediaTypePrefix::Cnai => modelpack_spec::NameSpelling::Cnai,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelfileCommand {
    /// Write the Modelfile `build` would use for a directory
    Generate(ModelfileGenerateArgs),
}

#[derive(Debug, Args)]
pub struct ModelfileGenerateArgs {
    /// The model directory
    pub context: PathBuf,
    /// Where to write it ('-' for standard output) [default: CONTEXT/Modelfile]
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace an existing Modelfile
    #[arg(long)]
    pub overwrite: bool,
    /// Leave out paths matching this glob (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    #[command(flatten)]
    pub metadata: MetadataArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// NAME[:TAG] or NAME@DIGEST in the store (or in a registry with --remote)
    pub reference: String,
    /// Read the artifact from its registry instead of the store
    #[arg(long)]
    pub remote: bool,
    #[command(flatten)]
    pub registry: crate::remote::RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct TagArgs {
    /// Existing name
    pub source: String,
    /// New names (with --remote: new tags in the same repository)
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Tag in the registry instead of the store (as `oras tag`)
    #[arg(long)]
    pub remote: bool,
    #[command(flatten)]
    pub registry: crate::remote::RegistryArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Names to remove
    #[arg(required = true)]
    pub references: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only say what would be removed
    #[arg(long)]
    pub dry_run: bool,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// A config or manifest JSON file, or NAME[:TAG] in the store
    pub target: String,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// NAME[:TAG] in the store
    pub reference: String,
    /// Directory to restore the tree into (created if missing)
    pub dir: PathBuf,
    /// Only files matching this glob (repeatable; `**` crosses folders)
    #[arg(long, value_name = "GLOB")]
    pub pattern: Vec<String>,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Verify every blob against its digest and every name against the blobs it needs
    Check(StoreCheckArgs),
    /// Print the store's folder
    Path,
}

#[derive(Debug, Args)]
pub struct StoreCheckArgs {
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn clap_definitions_are_consistent() {
        super::Cli::command().debug_assert();
    }
}
