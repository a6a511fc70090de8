//! Benchmark: one pull on one node the way users get it — an ImageCache
//! naming that node, seen by the running coordinator, sent as a task to the
//! node's agent, pulled through CRI, done when the coordinator has the agent's
//! report (`berth.v1.Inventory/GetImageCache` says Ready) — against the same
//! size of image pulled straight over CRI on the same node. Every run uses
//! fresh images (absent from every node, checked through CRI); the two sides
//! alternate which goes first.
//!
//! `cargo bench -p berth-e2e --bench pull` with the local cluster up and
//! Berth installed; `BERTH_BENCH_RUNS` sets the runs of each (default 9).

use std::time::{Duration, Instant};

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::bench::{Goal, confirm_on_nodes, direct_pull, median, ms, report, runs};
use berth_e2e::{Cluster, eventually};
use berth_proto::api::GetImageCacheRequest;
use kube::api::{Api, DeleteParams, PostParams};

/// Polls the coordinator until it reports `image` Ready on `node`.
async fn wait_reported(
    api: &mut berth_e2e::ApiClient,
    ns: &str,
    name: &str,
    node: &str,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = match api
            .get_image_cache(GetImageCacheRequest {
                namespace: ns.into(),
                name: name.into(),
            })
            .await
        {
            Ok(r) => r.into_inner().nodes.iter().any(|n| {
                n.node == node
                    && !n.images.is_empty()
                    && n.images.iter().all(|i| i.state == "Ready")
            }),
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => return Err(s.into()),
        };
        if ready {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{ns}/{name} never Ready on {node}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn cache(ns: &str, name: &str, image: &str, node: &str) -> anyhow::Result<ImageCache> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ImageCache",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"images": [{"ref": image}], "nodeNames": [node], "deletionPolicy": "RemoveFromNodes"},
    }))?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs = runs(9);
    let c = Cluster::from_env().await?;
    anyhow::ensure!(
        c.local,
        "the pull benchmark needs the local cluster's node sockets"
    );
    let node = c.nodes[0].clone();
    let one = std::slice::from_ref(&node);
    let ns = format!("bench-pull-{}", berth_e2e::registry::unique_suffix());
    c.kubectl(&["create", "namespace", &ns])?;
    let caches: Api<ImageCache> = Api::namespaced(c.client.clone(), &ns);
    let pf = c.port_forward("berth-coordinator", 7070)?;
    let mut inventory = c.inventory_client(&pf.addr()).await?;

    let (mut berth, mut direct) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (via, straight) = (c.fresh_image("pull").await?, c.fresh_image("pull").await?);
        confirm_on_nodes(&c, &c.nodes, &via, false).await?;
        confirm_on_nodes(&c, &c.nodes, &straight, false).await?;
        for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let name = format!("p{i}");
                let t = Instant::now();
                caches
                    .create(&PostParams::default(), &cache(&ns, &name, &via, &node)?)
                    .await?;
                let done = wait_reported(&mut inventory, &ns, &name, &node).await?;
                berth.push(done - t);
                confirm_on_nodes(&c, one, &via, true).await?;
                // Removal finishes before the next measurement starts.
                caches.delete(&name, &DeleteParams::default()).await?;
                eventually(
                    Duration::from_secs(60),
                    "the cached image removed",
                    || async { Ok((!c.cri_has_image(&node, &via).await?).then_some(())) },
                )
                .await?;
            } else {
                let t = Instant::now();
                direct_pull(&c, one, &straight).await?;
                direct.push(t.elapsed());
                c.cri_remove(&node, &straight).await?;
            }
        }
    }
    let _ = c.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    let (b, d) = (median(berth), median(direct));
    println!("one ~1 MB image on {node}, {runs} runs each, fresh images, alternating:");
    report("pull.direct_cri.median", ms(d), "ms", Goal::Baseline)?;
    report("pull.via_coordinator.median", ms(b), "ms", Goal::Baseline)?;
    report(
        "pull.via_coordinator.overhead",
        ms(b) - ms(d),
        "ms",
        Goal::AtMost(100.0),
    )?;
    report(
        "pull.via_coordinator.ratio",
        b.as_secs_f64() / d.as_secs_f64(),
        "x",
        Goal::AtMost(1.1),
    )?;
    Ok(())
}
