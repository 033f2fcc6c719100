//! `kestrel image build`: the guest kernel and initramfs, cached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kestrel_guest_image::{self as image, Progress};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build vmlinux, bzImage and initrd.img (and manifest.json), or reuse
    /// them when nothing changed.
    Build(BuildArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Output directory [default: ~/.cache/kestrel/image].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Parallel compile jobs [default: the number of CPUs].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// The static kestrel-agent to put in as /init [default: found next to
    /// this binary, in the workspace's static build, or /usr/local/bin].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// The kernel source tarball.
    #[arg(long, default_value = image::kernel::SOURCE_TARBALL)]
    pub source: PathBuf,
    /// Print one JSON object with the output paths instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ImageCommand) -> Result<ExitCode> {
    match cmd {
        ImageCommand::Build(args) => build(args),
    }
}

fn build(args: BuildArgs) -> Result<ExitCode> {
    let cache = image::default_cache();
    let opts = image::Options {
        agent: match args.agent {
            Some(path) => path,
            None => find_agent()?,
        },
        out: args.out.unwrap_or_else(|| cache.join("image")),
        cache,
        tarball: args.source,
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
    };
    let started = Instant::now();
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut progress = |p: Progress| match p {
        Progress::Extracting => bar.set_message("extracting the kernel source"),
        Progress::Configuring => bar.set_message("configuring the kernel (tinyconfig + fragments)"),
        Progress::Compiling { objects, last } => {
            bar.set_message(format!("compiling the kernel: {objects} objects, {last}"))
        }
    };
    let built = image::build(&opts, &mut progress);
    bar.finish_and_clear();
    let built = built?;
    if args.json {
        println!("{}", serde_json::to_string(&built.outputs)?);
        return Ok(ExitCode::SUCCESS);
    }
    if built.reused {
        println!(
            "nothing changed: reused the cache ({:.2?})",
            started.elapsed()
        );
    } else {
        println!("built in {:.1?}", started.elapsed());
    }
    let m = &built.manifest;
    println!(
        "kernel {} (fragments {}), agent {}",
        m.kernel_version,
        &m.fragments_sha256[..12],
        m.agent_version
    );
    for (path, info) in [
        (&built.outputs.vmlinux, &m.vmlinux),
        (&built.outputs.bzimage, &m.bzimage),
        (&built.outputs.initrd, &m.initrd),
    ] {
        println!(
            "{:<10} {:>8.2} MiB  {}",
            info.file,
            info.size as f64 / (1024.0 * 1024.0),
            path.display()
        );
    }
    println!(
        "{:<10} {:>12}  {}",
        "manifest",
        "",
        built.outputs.manifest.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The first static kestrel-agent among the usual places.
fn find_agent() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("kestrel-agent"));
        // target/{debug,release}/kestrel → target/x86_64-unknown-linux-gnu/release/kestrel-agent
        if let Some(target) = dir.parent() {
            candidates.push(target.join("x86_64-unknown-linux-gnu/release/kestrel-agent"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/bin/kestrel-agent"));
    for path in &candidates {
        if std::fs::read(path)
            .map(|b| image::is_static_elf(&b))
            .unwrap_or(false)
        {
            return Ok(path.clone());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "no static kestrel-agent found (looked at {}); build one with \
         RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p kestrel-agent, \
         or pass --agent",
        looked.join(", ")
    )
}
