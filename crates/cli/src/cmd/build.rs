//! `modelpack build`: pack a directory into an artifact in the store.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use modelpack_build::{BuildEvent, BuildOptions, LayerPlacement, Modelfile, Placement};
use modelpack_spec::Encoding;
use modelpack_store::Store;

use crate::args::{BuildArgs, Compression, GlobalArgs, LayerFormat};
use crate::display;

/// `SOURCE_DATE_EPOCH`, if set, as a time.
pub fn source_date_epoch() -> anyhow::Result<Option<DateTime<FixedOffset>>> {
    let Some(value) = std::env::var_os("SOURCE_DATE_EPOCH") else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let secs: i64 = text
        .trim()
        .parse()
        .with_context(|| format!("SOURCE_DATE_EPOCH={text:?} is not a number of seconds"))?;
    let time = Utc
        .timestamp_opt(secs, 0)
        .single()
        .with_context(|| format!("SOURCE_DATE_EPOCH={secs} is out of range"))?;
    Ok(Some(time.fixed_offset()))
}

pub fn run(global: &GlobalArgs, args: BuildArgs) -> anyhow::Result<ExitCode> {
    let reference = super::parse_reference(&args.tag)?;
    let encoding = match (args.layer_format, args.compress) {
        (LayerFormat::Raw, Compression::None) => Encoding::Raw,
        (LayerFormat::Raw, _) => {
            bail!("--compress needs --layer-format tar (raw layers are never compressed)")
        }
        (LayerFormat::Tar, Compression::None) => Encoding::Tar,
        (LayerFormat::Tar, Compression::Gzip) => Encoding::TarGzip,
        (LayerFormat::Tar, Compression::Zstd) => Encoding::TarZstd,
    };
    if args.link && encoding != Encoding::Raw {
        bail!("--link works with raw layers only");
    }
    let modelfile = match &args.modelfile {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read Modelfile {}", path.display()))?;
            Some(Modelfile::parse(&text).with_context(|| path.display().to_string())?)
        }
        None => None,
    };
    let sde = source_date_epoch()?;
    let created = if args.no_creation_time {
        None
    } else {
        Some(sde.unwrap_or_else(|| {
            let now = Utc::now();
            Utc.timestamp_opt(now.timestamp(), 0)
                .single()
                .unwrap_or(now)
                .fixed_offset()
        }))
    };
    let store = super::open_store(global)?;
    let _gc = store.gc_guard()?;
    let concurrency = args
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZero::get));
    let excludes = args.exclude.clone();
    let opts = BuildOptions {
        context: &args.context,
        modelfile: modelfile.as_ref(),
        excludes: &excludes,
        encoding,
        created,
        source_date_epoch: sde,
        metadata: args.metadata.into_metadata(),
        placement: if args.push {
            LayerPlacement::InPlace
        } else if args.link {
            LayerPlacement::Link
        } else {
            LayerPlacement::Copy
        },
        concurrency,
        spelling: args.media_type_prefix.into(),
    };
    let started = Instant::now();
    let bar = display::byte_bar(0, global.quiet, "building");
    let on_event = |event: BuildEvent<'_>| match event {
        BuildEvent::Planned { bytes, .. } => bar.set_length(bytes),
        BuildEvent::Progress(n) => bar.inc(n),
        BuildEvent::Packed(file, layer) => {
            if let Some(reason) = &layer.link_fallback {
                bar.suspend(|| eprintln!("warning: {}: {reason}; copied instead", file.path));
            }
        }
    };
    let output = modelpack_build::build(&store, &opts, &on_event)
        .with_context(|| format!("cannot build {}", args.context.display()))?;
    bar.finish_and_clear();
    let total: u64 = output.layers.iter().map(|l| l.descriptor.size()).sum();
    if args.push {
        return push_built(
            global,
            &args.connection,
            concurrency,
            &reference,
            &store,
            &output,
            started,
        );
    }
    store.tag(&reference, &output.manifest)?;
    if global.quiet {
        println!("{}", output.manifest.digest());
    } else {
        let linked = output
            .layers
            .iter()
            .filter(|l| matches!(l.placement, Placement::Reflinked | Placement::HardLinked))
            .count();
        println!(
            "Built {} {} ({} layers, {})",
            Store::name_of(&reference),
            output.manifest.digest(),
            output.layers.len(),
            display::summary(total, started.elapsed()),
        );
        if linked > 0 {
            println!("{linked} layers linked into the store without copying");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Uploads a build made with raw files left in place: those from their paths, the rest (config,
/// manifest, tar layers) from the store, where they stay unnamed for `prune` to collect.
fn push_built(
    global: &GlobalArgs,
    registry: &crate::remote::ConnectionArgs,
    concurrency: usize,
    reference: &modelpack_spec::Reference,
    store: &Store,
    output: &modelpack_build::BuildOutput,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let sources: std::collections::HashMap<modelpack_spec::Digest, std::path::PathBuf> = output
        .layers
        .iter()
        .filter_map(|l| {
            Some((
                l.descriptor.digest().as_ref().parse().ok()?,
                l.source.clone()?,
            ))
        })
        .collect();
    let digest: modelpack_spec::Digest = output.manifest.digest().as_ref().parse()?;
    let client = registry.client()?;
    let repo = crate::remote::repository(&client, reference);
    let renderer = crate::remote::Renderer::new(global.quiet, "pushing");
    let opts = registry.transfer_options(concurrency.max(4), renderer.progress());
    let source = modelpack_transfer::WithFiles::new(store, &sources);
    let pushed = crate::remote::push_artifact(&source, &digest, &repo, reference, &opts)?;
    let summary = renderer.finish();
    if global.quiet {
        println!("{pushed}");
    } else {
        println!(
            "Built and pushed {} {pushed} ({} layers; {summary}; {:.2}s in all)",
            reference.familiar(),
            output.layers.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
