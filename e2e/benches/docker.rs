//! Benchmark: `docker run --rm IMG true` through docker-shim and the
//! coordinator, wall time of the real docker CLI, against the floor on the
//! same cluster — a bare pod with the same image, created through the API
//! and watched until its container has terminated (not until the pod's
//! phase, which follows about a second later). Then testcontainers-python's
//! start-to-ready (`start()` with a log wait, in one client process) against
//! a bare pod watched until its container runs. The two sides alternate
//! which goes first; the image is on the nodes already (a warm-up run of
//! each side pulls it), as it is for a CI job's second container.
//!
//! `cargo bench -p berth-e2e --bench docker` with the local cluster up and
//! Berth installed; `BERTH_BENCH_RUNS` sets the runs of each (default 7).

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
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
    bare_pod_until(pods, image, &format!("floor-{n}"), &["true"], |s| {
        s.terminated.is_some()
    })
    .await
}

/// A bare pod running `command`, created and watched until its container's
/// state passes `done`; the time from the create call to that event.
async fn bare_pod_until(
    pods: &Api<Pod>,
    image: &str,
    name: &str,
    command: &[&str],
    done: fn(&k8s_openapi::api::core::v1::ContainerState) -> bool,
) -> anyhow::Result<Duration> {
    let name = name.to_string();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [{"name": "main", "image": image, "command": command}],
        },
    }))?;
    let start = Instant::now();
    pods.create(&PostParams::default(), &pod).await?;
    let (_, done) = watch_until(pods, &name, Duration::from_secs(120), |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.state.as_ref().is_some_and(done)))
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

    // Below the floor: a shim whose containers start in the coordinator's
    // pool of ready sandboxes. The command prints the pod's hostname, so
    // each run proves it ran in a pool sandbox (not a fresh pod).
    let pooled = ns
        .shim_with("ci", &["--start-mode", "sandbox-pool"])
        .await
        .context("starting the pool shim")?;
    let pool_run = || -> anyhow::Result<(Duration, bool)> {
        let start = Instant::now();
        let out = pooled.docker(&["run", "--rm", &image, "hostname"])?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "docker run --rm (pool): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((
            took,
            String::from_utf8_lossy(&out.stdout).starts_with("berth-pool-"),
        ))
    };
    // Warm-up: the first start fills the pool.
    pool_run()?;
    let mut in_pool = 0;
    let (mut pool, mut floor) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = 2000 + i;
        let (took, pooled_run) = if i % 2 == 0 {
            let r = pool_run()?;
            floor.push(bare_pod(&pods, &image, name).await?);
            r
        } else {
            floor.push(bare_pod(&pods, &image, name).await?);
            pool_run()?
        };
        if pooled_run {
            in_pool += 1;
            pool.push(took);
        }
    }
    if pool.is_empty() {
        bail!(
            "no run started in a pool sandbox\nshim log:\n{}",
            pooled.log()
        );
    }
    let (p, f) = (median(pool), median(floor));
    report(
        "docker.run_rm_true.runs_in_pool.mode=sandbox-pool",
        in_pool as f64,
        "runs",
        Goal::AtLeast(n as f64),
    )?;
    report(
        "docker.run_rm_true.mode=sandbox-pool",
        ms(p),
        "ms",
        Goal::Baseline,
    )?;
    report(
        "docker.run_rm_true.ratio_to_floor.mode=sandbox-pool",
        p.as_secs_f64() / f.as_secs_f64(),
        "x",
        Goal::AtMost(0.5),
    )?;

    // testcontainers-python: one client process, driven a run at a time.
    let mut client = shim
        .python_command(&["bench", &image])?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting testcontainers-python")?;
    let mut to = client.stdin.take().context("client stdin")?;
    let mut from = BufReader::new(client.stdout.take().context("client stdout")?);
    let mut line = String::new();
    from.read_line(&mut line)?;
    if line.trim() != "warm" {
        bail!(
            "testcontainers-python did not warm up: {line:?}\nshim log:\n{}",
            shim.log()
        );
    }
    let mut tc_run = || -> anyhow::Result<Duration> {
        to.write_all(b"go\n")?;
        line.clear();
        from.read_line(&mut line)?;
        let ms: f64 = line
            .trim()
            .parse()
            .with_context(|| format!("testcontainers-python answered {line:?}"))?;
        Ok(Duration::from_secs_f64(ms / 1000.0))
    };
    let running = |s: &k8s_openapi::api::core::v1::ContainerState| s.running.is_some();
    let ready = ["sh", "-c", "echo ready; exec sleep 600"];
    let (mut tc, mut floor) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("floor-ready-{i}");
        if i % 2 == 0 {
            tc.push(tc_run()?);
            floor.push(bare_pod_until(&pods, &image, &name, &ready, running).await?);
        } else {
            floor.push(bare_pod_until(&pods, &image, &name, &ready, running).await?);
            tc.push(tc_run()?);
        }
    }
    drop(to);
    let _ = client.wait();
    let (t, f) = (median(tc), median(floor));
    report(
        "docker.testcontainers_python_ready.mode=pod",
        ms(t),
        "ms",
        Goal::Baseline,
    )?;
    report(
        "docker.testcontainers_python_ready.floor_bare_pod_running",
        ms(f),
        "ms",
        Goal::Baseline,
    )?;
    report(
        "docker.testcontainers_python_ready.ratio_to_floor.mode=pod",
        t.as_secs_f64() / f.as_secs_f64(),
        "x",
        Goal::AtMost(1.1),
    )?;
    Ok(())
}
