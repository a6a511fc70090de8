//! Benchmark: debloating the redis image built from Debian's packages
//! (minbase + redis-server + redis-tools + iputils-ping, ~175 MB unpacked,
//! ~67 MB gzip) on a node of the local cluster with `node-agent baffs`.
//!
//! - `stop_to_pushed`: wall time from SIGINT to `baffs shadow` to the
//!   debloated image's manifest in the registry (the profile saved, the
//!   layers read from containerd, filtered, compressed and pushed). The
//!   first run pushes into a repository without the new blobs (the figure
//!   with the goal); later ones find them there (context). Baseline: `skopeo
//!   copy` of the original image into a fresh, empty registry, the time
//!   merely to move the image once.
//! - `size_reduction`: from the registry's manifests, original vs `-baffs`.
//! - `throughput`: redis-benchmark (SET+GET) in the pod with and
//!   without profiling, alternating which goes first; the overhead is the
//!   difference of the medians.
//!
//! `cargo bench -p berth-e2e --bench debloat` with the local cluster up;
//! `BERTH_BENCH_RUNS` sets the runs of each (default 3).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_e2e::bench::{Goal, median, report, runs};
use berth_e2e::debloat::{REDIS, Shadow, exercise, redis_pod, redis_run, throughput};
use berth_e2e::registry::unique_suffix;
use berth_e2e::scratch::ScratchRegistry;
use berth_e2e::{Cluster, TestNamespace, debian};

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let c = Cluster::from_env().await?;
    if !c.local {
        bail!("the debloat benchmark reaches a node's runtime socket: local cluster only");
    }
    let node = c.nodes[0].clone();
    let reg = ScratchRegistry::start(&c, None).await?;
    let client = reg.client();
    let repo = format!("bench/redis-{}", unique_suffix());
    debian::push(&client, &repo, "7", REDIS, redis_run()).await?;
    let image = format!("{}/{repo}:7", reg.host);
    let ns = TestNamespace::new(&c, "bench-debloat");
    c.apply(&redis_pod(&ns.name, "redis", &node, &image))?;
    c.kubectl(&[
        "-n",
        &ns.name,
        "wait",
        "--for=condition=Ready",
        "pod/redis",
        "--timeout",
        "180s",
    ])?;
    let profiles = tempfile::tempdir()?;
    let profiles_dir = profiles.path().to_str().context("temp dir")?;
    let n = runs(3);

    // Throughput with and without profiling, alternating.
    let (mut plain, mut profiled) = (Vec::new(), Vec::new());
    throughput(&c, &ns.name, "redis", 10_000)?; // warm-up
    for i in 0..n {
        for with in if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            if with {
                let s = Shadow::start(&c, &node, &image, profiles_dir)?;
                profiled.push(throughput(&c, &ns.name, "redis", 50_000)?);
                s.stop()?;
            } else {
                plain.push(throughput(&c, &ns.name, "redis", 50_000)?);
            }
        }
    }
    let (plain, profiled) = (median_f(plain), median_f(profiled));
    println!("redis-benchmark SET+GET, {n} runs each, alternating:");
    report(
        "debloat.redis.throughput.plain",
        plain,
        "req/s",
        Goal::Baseline,
    )?;
    report(
        "debloat.redis.throughput.profiled",
        profiled,
        "req/s",
        Goal::Baseline,
    )?;
    report(
        "debloat.redis.throughput.profiling_overhead",
        100.0 * (plain - profiled) / plain,
        "%",
        Goal::AtMost(5.0),
    )?;

    // Stop profiling -> debloated image pushed.
    let mut times = Vec::new();
    let mut summary = serde_json::Value::Null;
    for _ in 0..n {
        let s = Shadow::start(&c, &node, &image, profiles_dir)?;
        exercise(&c, &ns.name, "redis")?;
        let t0 = Instant::now();
        s.stop()?;
        let stopped = t0.elapsed();
        summary = berth_e2e::debloat::debloat(&c, &node, &image, profiles_dir, &reg.host)?;
        let build = summary["buildAndPushSeconds"].as_f64().context("summary")?;
        times.push(Duration::from_secs_f64(secs(stopped) + build));
    }
    let mut copies = Vec::new();
    for _ in 0..n {
        let empty = ScratchRegistry::start(&c, None).await?;
        let t0 = Instant::now();
        let out = Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
            ])
            .arg(format!("docker://{image}"))
            .arg(format!("docker://{}/{repo}:7", empty.host))
            .output()
            .context("skopeo")?;
        if !out.status.success() {
            bail!("skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
        }
        copies.push(t0.elapsed());
    }
    println!(
        "stop profiling -> debloated image pushed, {n} runs; skopeo copy of the original as the baseline:"
    );
    report(
        "debloat.redis.stop_to_pushed.first",
        secs(times[0]),
        "s",
        Goal::AtMost(15.0),
    )?;
    report(
        "debloat.redis.stop_to_pushed.median",
        secs(median(times.clone())),
        "s",
        Goal::Baseline,
    )?;
    report(
        "debloat.redis.skopeo_copy.median",
        secs(median(copies.clone())),
        "s",
        Goal::Baseline,
    )?;
    report(
        "debloat.redis.stop_to_pushed_vs_copy",
        secs(times[0]) / secs(median(copies)),
        "x",
        Goal::Baseline,
    )?;

    // Size, as the registry holds it.
    let size = |tag: &str| {
        let client = &client;
        let repo = &repo;
        let tag = tag.to_string();
        async move {
            let (_, raw) = client.get_manifest(repo, &tag).await?;
            let m: serde_json::Value = serde_json::from_slice(&raw)?;
            anyhow::Ok(
                m["layers"]
                    .as_array()
                    .context("layers")?
                    .iter()
                    .filter_map(|l| l["size"].as_u64())
                    .sum::<u64>(),
            )
        }
    };
    let (before, after) = (size("7").await?, size("7-baffs").await?);
    if summary["sizeAfter"].as_u64() != Some(after) {
        bail!(
            "the summary says {} bytes, the registry holds {after}",
            summary["sizeAfter"]
        );
    }
    println!("image size in the registry (gzip layers): {before} -> {after} bytes");
    report(
        "debloat.redis.size_before",
        before as f64 / 1e6,
        "MB",
        Goal::Baseline,
    )?;
    report(
        "debloat.redis.size_after",
        after as f64 / 1e6,
        "MB",
        Goal::Baseline,
    )?;
    report(
        "debloat.redis.size_reduction",
        100.0 * (1.0 - after as f64 / before as f64),
        "%",
        Goal::AtLeast(80.0),
    )?;
    Ok(())
}
