//! Benchmark: copying one multi-layer image (4 × 16 MiB of random bytes)
//! from one registry to another through Berth — an ImageBackup created,
//! seen by the coordinator, run as a copy task by an agent, done when its
//! status says `Done` — against `skopeo copy` (Debian's) between the same
//! two kinds of registry. Each run copies into a fresh, empty target
//! registry, so neither side finds a blob already there; the two sides
//! alternate which goes first. Besides the times, each side's bytes stored
//! in the target are printed (what it had to send).
//!
//! `cargo bench -p berth-e2e --bench backup` with the local cluster up and
//! Berth installed; `BERTH_BENCH_RUNS` sets the runs of each (default 5).

use std::process::Command;
use std::time::{Duration, Instant};

use berth_coordinator::backup::crd::ImageBackup;
use berth_e2e::bench::{Goal, median, ms, report, runs, watch_until};
use berth_e2e::registry::{tar_layer, unique_suffix};
use berth_e2e::scratch::ScratchRegistry;
use berth_e2e::{Cluster, NAMESPACE};
use kube::api::{Api, DeleteParams, PostParams};

const LAYERS: usize = 4;
const LAYER_BYTES: usize = 16 << 20;

/// Berth: a policy for `target`, an ImageBackup by hand, until Done.
async fn through_berth(
    c: &Cluster,
    source: &str,
    target: &ScratchRegistry,
) -> anyhow::Result<(Duration, u64)> {
    let name = format!("bench-backup-{}", unique_suffix());
    // A policy that covers no workload: it only names the target.
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: BackupPolicy\nmetadata: {{name: {name}}}\nspec:\n  target: {{registry: \"{}\"}}\n  copyOnly: true\n  namespaces: {{include: [{name}-none]}}\n",
        target.host
    ))?;
    let api: Api<ImageBackup> = Api::all(c.client.clone());
    let b: ImageBackup = serde_json::from_value(serde_json::json!({
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ImageBackup",
        "metadata": {"name": name},
        "spec": {"source": source, "target": format!("{}/bench:1", target.host), "policy": name},
    }))?;
    let start = Instant::now();
    api.create(&PostParams::default(), &b).await?;
    let (done, at) = watch_until(&api, &name, Duration::from_secs(300), |b| {
        b.status
            .as_ref()
            .is_some_and(|s| s.phase == "Done" || s.phase == "Failed")
    })
    .await?;
    let st = done.status.unwrap_or_default();
    anyhow::ensure!(
        st.phase == "Done",
        "the copy failed: {:?} {:?}",
        st.reason,
        st.message
    );
    api.delete(&name, &DeleteParams::default()).await?;
    c.kubectl(&["delete", "backuppolicy", &name])?;
    Ok((at - start, target.stored_bytes()))
}

/// skopeo copy from `source` into `target`.
fn through_skopeo(source: &str, target: &ScratchRegistry) -> anyhow::Result<(Duration, u64)> {
    let start = Instant::now();
    let out = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{source}"))
        .arg(format!("docker://{}/bench:1", target.host))
        .output()?;
    let took = start.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((took, target.stored_bytes()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let c = Cluster::from_env().await?;
    let _ = c.kubectl(&["-n", NAMESPACE, "get", "deploy/berth-coordinator"])?;
    let source = ScratchRegistry::start(&c, None).await?;
    let repo = format!("bench/big-{}", unique_suffix());
    let mut tars = Vec::new();
    for i in 0..LAYERS {
        let data: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
            .take(LAYER_BYTES)
            .collect();
        tars.push(tar_layer(&[(&format!("data/layer{i}"), &data)])?);
    }
    source.client().push_image(&repo, "1", None, tars).await?;
    let image = format!("{}/{repo}:1", source.host);
    let n = runs(5);
    let (mut berth, mut skopeo) = (Vec::new(), Vec::new());
    let (mut berth_bytes, mut skopeo_bytes) = (0, 0);
    for i in 0..n {
        for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let target = ScratchRegistry::start(&c, None).await?;
            if side == 0 {
                let (t, b) = through_berth(&c, &image, &target).await?;
                berth.push(t);
                berth_bytes = b;
            } else {
                let (t, b) = through_skopeo(&image, &target)?;
                skopeo.push(t);
                skopeo_bytes = b;
            }
        }
    }
    let (b, s) = (ms(median(berth)), ms(median(skopeo)));
    report("backup_copy_64mb_berth", b, "ms", Goal::Baseline)?;
    report("backup_copy_64mb_skopeo", s, "ms", Goal::Baseline)?;
    report("backup_copy_64mb_ratio", b / s, "x", Goal::AtMost(1.0))?;
    report(
        "backup_copy_64mb_berth_bytes",
        berth_bytes as f64,
        "bytes",
        Goal::Baseline,
    )?;
    report(
        "backup_copy_64mb_skopeo_bytes",
        skopeo_bytes as f64,
        "bytes",
        Goal::Baseline,
    )?;
    Ok(())
}
