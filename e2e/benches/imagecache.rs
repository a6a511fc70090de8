//! Benchmark: ImageCache create → Ready for one image on every real node,
//! against the same image pulled straight over CRI on each node at once.
//! Runs alternate; the image is removed from every node before each run.
//! Prints medians and the ratio.
//!
//! `cargo bench -p berth-e2e --bench imagecache` with the local cluster up and
//! Berth installed; `BERTH_BENCH_RUNS` sets the runs of each (default 5).

use std::time::{Duration, Instant};

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::{Cluster, bench_runs, eventually, median};
use k8s_cri::v1 as cri;
use kube::api::{Api, DeleteParams};

async fn clear(c: &Cluster, image: &str) -> anyhow::Result<()> {
    for n in &c.nodes {
        c.cri_remove(n, image).await?;
    }
    // The agents report the removal within their 2 s poll.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs = bench_runs(5);
    let c = Cluster::from_env().await?;
    anyhow::ensure!(
        c.local,
        "this benchmark needs the local cluster's node sockets"
    );
    let image = format!("{}/busybox:1.36", c.registry());
    let ns = "berth-bench";
    let _ = c.kubectl(&["create", "namespace", ns]);
    let api: Api<ImageCache> = Api::namespaced(c.client.clone(), ns);

    let (mut cache, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        clear(&c, &image).await?;
        let t = Instant::now();
        let mut pulls = Vec::new();
        for n in &c.nodes {
            let mut client = c.cri(n).await?;
            let spec = cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            };
            pulls.push(tokio::spawn(async move {
                client
                    .pull_image(cri::PullImageRequest {
                        image: Some(spec),
                        auth: None,
                        sandbox_config: None,
                    })
                    .await
            }));
        }
        for p in pulls {
            p.await??;
        }
        direct.push(t.elapsed());

        clear(&c, &image).await?;
        let t = Instant::now();
        c.apply(&format!(
            "apiVersion: berth.dev/v1alpha1\nkind: ImageCache\nmetadata: {{name: bench, namespace: {ns}}}\nspec:\n  images: [{{ref: \"{image}\"}}]\n"
        ))?;
        // Poll finely: the benchmark measures the controller, not the poll.
        loop {
            let ic = api.get("bench").await?;
            let ready = ic
                .status
                .as_ref()
                .is_some_and(|s| s.phase == "Ready" && s.nodes.ready as usize == c.nodes.len());
            if ready {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "the cache never became Ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cache.push(t.elapsed());
        api.delete("bench", &DeleteParams::default()).await?;
        eventually(Duration::from_secs(60), "the cache gone", || async {
            Ok(api.get_opt("bench").await?.is_none().then_some(()))
        })
        .await?;
    }
    let _ = c.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    let (a, d) = (median(cache), median(direct));
    println!(
        "{image} on {} nodes, {runs} runs each, alternating:",
        c.nodes.len()
    );
    println!(
        "  ImageCache create → Ready : median {:>8.1} ms",
        a.as_secs_f64() * 1e3
    );
    println!(
        "  direct CRI pull, all nodes: median {:>8.1} ms",
        d.as_secs_f64() * 1e3
    );
    println!(
        "  ratio cache/direct        : {:.2}",
        a.as_secs_f64() / d.as_secs_f64()
    );
    Ok(())
}
