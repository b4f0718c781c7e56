//! Builds the eBPF probes from source with aya-build when the eBPF toolchain (nightly with rust-src and
//! bpf-linker) is present, and otherwise uses the committed `ebpf/prebuilt/` object. Either way the object
//! lands in `$OUT_DIR/vigil-probes`, where `probes.rs` embeds it.
//!
//! `VIGIL_PROBES_PREBUILT=1` forces the committed object; `VIGIL_UPDATE_PREBUILT=1` (scripts/build-probes)
//! copies a fresh build back into `ebpf/prebuilt/` with the hash of its sources.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

#[path = "src/probe_sources.rs"]
#[allow(dead_code)]
mod probe_sources;

/// Why the eBPF toolchain cannot build here, or None when it can.
fn toolchain_missing() -> Option<String> {
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output();
    let sysroot = match sysroot {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        _ => return Some("no nightly toolchain (`rustup run nightly rustc` failed)".into()),
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some("nightly has no rust-src component".into());
    }
    match Command::new("bpf-linker").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("bpf-linker is not on PATH".into()),
    }
}

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest.parent().context("collector has no parent directory")?.to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("vigil-probes");
    for dir in probe_sources::SOURCE_DIRS {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).join("src").display());
        println!("cargo:rerun-if-changed={}", workspace.join(dir).join("Cargo.toml").display());
    }
    println!("cargo:rerun-if-changed={}", workspace.join(probe_sources::PREBUILT_OBJECT).display());
    println!("cargo:rerun-if-env-changed=VIGIL_PROBES_PREBUILT");
    println!("cargo:rerun-if-env-changed=VIGIL_UPDATE_PREBUILT");

    let forced = std::env::var("VIGIL_PROBES_PREBUILT").is_ok_and(|v| v == "1");
    let missing = if forced { Some("VIGIL_PROBES_PREBUILT=1".to_string()) } else { toolchain_missing() };
    if let Some(why) = missing {
        return use_prebuilt(&workspace, &out, &why);
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "vigil-probes",
            root_dir: &workspace.join("ebpf/probes").to_string_lossy(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
    .context("building the eBPF probes (set VIGIL_PROBES_PREBUILT=1 to use the committed object)")?;
    if !out.is_file() {
        bail!("aya-build produced no {}", out.display());
    }
    if std::env::var("VIGIL_UPDATE_PREBUILT").is_ok_and(|v| v == "1") {
        std::fs::copy(&out, workspace.join(probe_sources::PREBUILT_OBJECT))?;
        let hash = probe_sources::sources_hash(&workspace)?;
        std::fs::write(workspace.join(probe_sources::PREBUILT_HASH), format!("{hash}\n"))?;
        println!("cargo:warning=updated ebpf/prebuilt/ (sources {hash})");
    }
    Ok(())
}

fn use_prebuilt(workspace: &Path, out: &Path, why: &str) -> anyhow::Result<()> {
    let object = workspace.join(probe_sources::PREBUILT_OBJECT);
    std::fs::copy(&object, out).with_context(|| {
        format!("the eBPF toolchain is unavailable ({why}) and {} cannot be copied", object.display())
    })?;
    let recorded = std::fs::read_to_string(workspace.join(probe_sources::PREBUILT_HASH)).unwrap_or_default();
    let current = probe_sources::sources_hash(workspace)?;
    if recorded.trim() == current {
        println!("cargo:warning=using the prebuilt eBPF probes ({why})");
    } else {
        println!(
            "cargo:warning=using STALE prebuilt eBPF probes ({why}): the sources changed since it was built; \
             run scripts/build-probes on a machine with the eBPF toolchain"
        );
    }
    Ok(())
}
