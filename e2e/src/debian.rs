//! Realistic, bloated test images built offline from Debian packages: a
//! `mmdebstrap` minbase with the packages a test names, as one gzip layer,
//! pushed to a test registry. The root filesystem tar is kept in
//! `/var/cache/berth/images` (keyed by the package list), so a rebuild is a
//! push; without the cache, building it takes ~20 s from Debian's mirror.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use sha2::Digest;

use crate::registry::Registry;

/// Where root filesystem tars are cached.
pub const CACHE: &str = "/var/cache/berth/images";

/// The tar of a bookworm minbase with `packages` (no device nodes: image
/// layers have none), built once and cached.
pub fn rootfs(packages: &[&str]) -> anyhow::Result<PathBuf> {
    let key: String = sha2::Sha256::digest(packages.join(",").as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = PathBuf::from(CACHE).join(format!("bookworm-minbase-{key}.tar"));
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(CACHE)?;
    let tmp = out.with_extension("part.tar");
    let status = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--format=tar",
            "--skip=output/dev",
            "--quiet",
        ])
        .arg(format!("--include={}", packages.join(",")))
        .args(["bookworm"])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian")
        .status()
        .context("mmdebstrap (apt install mmdebstrap; e2e/cluster.sh installs it)")?;
    if !status.success() {
        bail!("mmdebstrap {packages:?} failed: {status}");
    }
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Pushes the minbase with `packages` to `repo:tag` of `registry` as one
/// gzip layer with run configuration `run`; returns the manifest digest.
pub async fn push(
    registry: &Registry,
    repo: &str,
    tag: &str,
    packages: &[&str],
    run: serde_json::Value,
) -> anyhow::Result<String> {
    let tar = std::fs::read(rootfs(packages)?)?;
    registry.push_gzip_image(repo, tag, vec![tar], run).await
}
