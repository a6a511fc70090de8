//! Benchmark: ImageCache create → Ready on every real node, against the same
//! size of image pulled straight over CRI on every node at once, for a ~1 MB
//! image and a multi-layer ≥ 50 MB one. Each run uses fresh images, checked
//! absent through CRI on every node before it starts; Ready is the watch
//! event that carries it (no polling of a kubectl process) and is confirmed
//! through CRI on every node. Sides alternate which goes first.
//!
//! `cargo bench -p berth-e2e --bench imagecache` with the local cluster up and
//! Berth installed; `BERTH_BENCH_RUNS` sets the runs per size (default 7).

use std::time::{Duration, Instant};

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::bench::{
    Goal, confirm_on_nodes, direct_pull, median, ms, report, runs, watch_until,
};
use berth_e2e::{Cluster, eventually};
use kube::api::{Api, DeleteParams, PostParams};

/// Image sizes measured: name, and how to make one fresh image of it.
#[derive(Clone, Copy)]
enum Size {
    /// busybox plus a marker layer, ~1 MB.
    Small,
    /// 5 layers of 11 MB of random bytes.
    Big,
}

impl Size {
    fn name(self) -> &'static str {
        match self {
            Size::Small => "1mb",
            Size::Big => "55mb",
        }
    }

    async fn fresh(self, c: &Cluster) -> anyhow::Result<String> {
        match self {
            Size::Small => c.fresh_image("bench-ic").await,
            Size::Big => c.fresh_big_image("bench-ic-big", 5, 11 << 20).await,
        }
    }
}

fn cache(ns: &str, name: &str, image: &str) -> anyhow::Result<ImageCache> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ImageCache",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"images": [{"ref": image}], "deletionPolicy": "RemoveFromNodes"},
    }))?)
}

async fn measure(
    c: &Cluster,
    api: &Api<ImageCache>,
    size: Size,
    runs: usize,
) -> anyhow::Result<()> {
    let ns = api.namespace().unwrap_or_default().to_string();
    let (mut berth, mut direct, mut rollout) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (via, straight) = (size.fresh(c).await?, size.fresh(c).await?);
        confirm_on_nodes(c, &c.nodes, &via, false).await?;
        confirm_on_nodes(c, &c.nodes, &straight, false).await?;
        for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 1 {
                let t = Instant::now();
                direct_pull(c, &c.nodes, &straight).await?;
                direct.push(t.elapsed());
                for n in &c.nodes {
                    c.cri_remove(n, &straight).await?;
                }
                continue;
            }
            let name = format!("{}-{i}", size.name());
            let t = Instant::now();
            api.create(&PostParams::default(), &cache(&ns, &name, &via)?)
                .await?;
            let nodes = c.nodes.len() as u32;
            let (ready, at) = watch_until(api, &name, Duration::from_secs(300), |ic| {
                ic.status
                    .as_ref()
                    .is_some_and(|s| s.phase == "Ready" && s.nodes.ready == nodes)
            })
            .await?;
            berth.push(at - t);
            confirm_on_nodes(c, &c.nodes, &via, true).await?;
            if let Some(s) = ready
                .status
                .and_then(|s| s.last_rollout)
                .and_then(|r| r.seconds)
            {
                rollout.push(Duration::from_secs_f64(s));
            }
            api.delete(&name, &DeleteParams::default()).await?;
            eventually(
                Duration::from_secs(120),
                "the cache and its image gone",
                || async {
                    for n in &c.nodes {
                        if c.cri_has_image(n, &via).await? {
                            return Ok(None);
                        }
                    }
                    Ok(api.get_opt(&name).await?.is_none().then_some(()))
                },
            )
            .await?;
        }
    }
    anyhow::ensure!(
        rollout.len() == runs,
        "status.lastRollout.seconds missing on a Ready cache"
    );
    let (b, d, r) = (median(berth), median(direct), median(rollout));
    let n = size.name();
    println!(
        "{n} image on {} nodes, {runs} runs each, fresh images, alternating:",
        c.nodes.len()
    );
    report(
        &format!("imagecache.{n}.direct_cri.median"),
        ms(d),
        "ms",
        Goal::Baseline,
    )?;
    report(
        &format!("imagecache.{n}.create_to_ready.median"),
        ms(b),
        "ms",
        Goal::Baseline,
    )?;
    report(
        &format!("imagecache.{n}.status_last_rollout.median"),
        ms(r),
        "ms",
        Goal::Baseline,
    )?;
    report(
        &format!("imagecache.{n}.ratio"),
        b.as_secs_f64() / d.as_secs_f64(),
        "x",
        Goal::AtMost(1.1),
    )?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs = runs(7);
    let c = Cluster::from_env().await?;
    anyhow::ensure!(
        c.local,
        "this benchmark needs the local cluster's node sockets"
    );
    let ns = format!("bench-ic-{}", berth_e2e::registry::unique_suffix());
    c.kubectl(&["create", "namespace", &ns])?;
    let api: Api<ImageCache> = Api::namespaced(c.client.clone(), &ns);
    let result = async {
        measure(&c, &api, Size::Small, runs).await?;
        measure(&c, &api, Size::Big, runs).await
    }
    .await;
    let _ = c.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    result
}
