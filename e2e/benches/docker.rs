//! Benchmark: `docker run --rm IMG true` through docker-shim and the
//! coordinator, wall time of the real docker CLI, against the floor on the
//! same cluster — a bare pod with the same image, created through the API
//! and watched until its container has terminated (not until the pod's
//! phase, which follows about a second later). The two sides alternate
//! which goes first; the image is on the nodes already (a warm-up run of
//! each side pulls it), as it is for a CI job's second container.
//!
//! `cargo bench -p berth-e2e --bench docker` with the local cluster up and
//! Berth installed; `BERTH_BENCH_RUNS` sets the runs of each (default 7).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_e2e::Cluster;
use berth_e2e::bench::{Goal, median, ms, report, runs, watch_until};
use berth_e2e::docker::DockerNamespace;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};

/// A bare pod running `true`, created and watched until its container
/// terminated; the time from the create call to that event.
async fn bare_pod(pods: &Api<Pod>, image: &str, n: usize) -> anyhow::Result<Duration> {
    let name = format!("floor-{n}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [{"name": "main", "image": image, "command": ["true"]}],
        },
    }))?;
    let start = Instant::now();
    pods.create(&PostParams::default(), &pod).await?;
    let (_, done) = watch_until(pods, &name, Duration::from_secs(120), |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
            })
    })
    .await?;
    let took = done - start;
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    pods.delete(&name, &now).await?;
    Ok(took)
}

fn docker_run(shim: &berth_e2e::docker::Shim, image: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = shim.docker(&["run", "--rm", image, "true"])?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "docker run --rm {image} true: {}\nshim log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            shim.log()
        );
    }
    Ok(took)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let c = Cluster::from_env().await?;
    let image = c.fresh_docker_image("docker-bench").await?;
    let ns = DockerNamespace::new(&c, "docker-bench")?;
    let shim = ns.shim("ci").await.context("starting the shim")?;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.ns.name);

    // Warm up: both paths pull the image onto whichever nodes they land on.
    for n in 0..c.nodes.len() * 2 {
        docker_run(&shim, &image)?;
        bare_pod(&pods, &image, 1000 + n).await?;
    }
    let n = runs(7);
    let (mut berth, mut floor) = (Vec::new(), Vec::new());
    for i in 0..n {
        if i % 2 == 0 {
            berth.push(docker_run(&shim, &image)?);
            floor.push(bare_pod(&pods, &image, i).await?);
        } else {
            floor.push(bare_pod(&pods, &image, i).await?);
            berth.push(docker_run(&shim, &image)?);
        }
    }
    let (b, f) = (median(berth), median(floor));
    report("docker.run_rm_true.mode=pod", ms(b), "ms", Goal::Baseline)?;
    report(
        "docker.run_rm_true.floor_bare_pod",
        ms(f),
        "ms",
        Goal::Baseline,
    )?;
    report(
        "docker.run_rm_true.ratio_to_floor.mode=pod",
        b.as_secs_f64() / f.as_secs_f64(),
        "x",
        Goal::AtMost(1.1),
    )?;
    Ok(())
}
