//! Benchmark: PullImage through the node agent's CRI client against the same
//! pull sent straight to containerd over CRI — same node, same image, runs
//! alternating, the image removed before each. Prints medians and the ratio
//! (goal: agent / direct ≤ 1.05).
//!
//! `cargo bench -p berth-e2e --bench pull` with the local cluster up;
//! `BERTH_BENCH_RUNS` sets the number of runs of each (default 15).

use std::time::Instant;

use berth_e2e::{Cluster, bench_runs, median};
use berth_node_agent::cri::CriRuntime;
use berth_node_agent::runtime::ImageRuntime;
use berth_proto::reference::Reference;
use k8s_cri::v1 as cri;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs = bench_runs(15);
    let c = Cluster::from_env().await?;
    anyhow::ensure!(
        c.local,
        "the pull benchmark needs the local cluster's node sockets"
    );
    let node = &c.nodes[0];
    let image = Reference::parse(&format!("{}/busybox:1.36", c.registry()))?;
    let agent = CriRuntime::connect(c.node_socket(node)).await?;
    let mut direct = c.cri(node).await?;
    let spec = || {
        Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        })
    };

    let (mut via_agent, mut straight) = (Vec::new(), Vec::new());
    for i in 0..runs * 2 {
        c.cri_remove(node, &image.to_string()).await?;
        let t = Instant::now();
        if i % 2 == 0 {
            agent.pull(&image, None).await?;
            via_agent.push(t.elapsed());
        } else {
            direct
                .pull_image(cri::PullImageRequest {
                    image: spec(),
                    auth: None,
                    sandbox_config: None,
                })
                .await?;
            straight.push(t.elapsed());
        }
    }
    let (a, d) = (median(via_agent), median(straight));
    println!("PullImage {image} on {node}, {runs} runs each, alternating:");
    println!(
        "  through the agent : median {:>8.2} ms",
        a.as_secs_f64() * 1e3
    );
    println!(
        "  straight over CRI : median {:>8.2} ms",
        d.as_secs_f64() * 1e3
    );
    println!(
        "  ratio agent/direct: {:.3} (goal ≤ 1.05)",
        a.as_secs_f64() / d.as_secs_f64()
    );
    Ok(())
}
