//! What the benchmarks share: medians, the one-line `BENCH` figure format
//! that `e2e/bench-table.sh` reads, CRI pulls on several nodes at once, and
//! waits that watch instead of polling.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_cri::v1 as cri;

use crate::Cluster;

/// Runs per side of a benchmark: `BERTH_BENCH_RUNS`, else `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("BERTH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (upper median for an even count).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Milliseconds, for figures.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How a figure is judged.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// Met when the value is at most this.
    AtMost(f64),
    /// Met when the value is at least this.
    AtLeast(f64),
    /// A baseline or context figure: printed for comparison, always "met".
    Baseline,
}

/// One figure as one line a script reads:
/// `BENCH name=… value=… unit=… goal=… verdict=met|missed`.
pub fn figure(name: &str, value: f64, unit: &str, goal: Goal) -> String {
    let (goal_text, met) = match goal {
        Goal::AtMost(max) => (format!("<={max}"), value <= max),
        Goal::AtLeast(min) => (format!(">={min}"), value >= min),
        Goal::Baseline => ("baseline".to_string(), true),
    };
    let verdict = if met { "met" } else { "missed" };
    format!("BENCH name={name} value={value:.3} unit={unit} goal={goal_text} verdict={verdict}")
}

/// Prints [`figure`]; a value that is not finite means nothing was measured,
/// which is an error, not a figure.
pub fn report(name: &str, value: f64, unit: &str, goal: Goal) -> anyhow::Result<()> {
    if !value.is_finite() {
        bail!("benchmark figure {name} could not be measured ({value})");
    }
    println!("{}", figure(name, value, unit, goal));
    Ok(())
}

/// Pulls `image` straight over CRI on every node in `nodes` at once (not
/// Berth's client); returns when all are done.
pub async fn direct_pull(c: &Cluster, nodes: &[String], image: &str) -> anyhow::Result<()> {
    let mut pulls = Vec::new();
    for n in nodes {
        let mut client = c.cri(n).await?;
        let spec = cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        let node = n.clone();
        pulls.push(tokio::spawn(async move {
            client
                .pull_image(cri::PullImageRequest {
                    image: Some(spec),
                    auth: None,
                    sandbox_config: None,
                })
                .await
                .with_context(|| format!("direct pull on {node}"))
        }));
    }
    for p in pulls {
        p.await??;
    }
    Ok(())
}

/// Fails unless every node in `nodes` holds `image` (`present`) or none does.
pub async fn confirm_on_nodes(
    c: &Cluster,
    nodes: &[String],
    image: &str,
    present: bool,
) -> anyhow::Result<()> {
    for n in nodes {
        let has = c.cri_has_image(n, image).await?;
        if has != present {
            bail!("CRI on {n}: {image} present={has}, expected {present}");
        }
    }
    Ok(())
}

/// Watches one object of `api` until `done` holds for it, or `timeout`.
/// Returns the object and when the deciding event arrived.
pub async fn watch_until<K>(
    api: &kube::Api<K>,
    name: &str,
    timeout: Duration,
    done: impl Fn(&K) -> bool,
) -> anyhow::Result<(K, Instant)>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    use kube::runtime::{WatchStreamExt, watcher};
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api.clone(), cfg).applied_objects());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .with_context(|| format!("timed out after {timeout:?} watching {name}"))?;
        match next {
            Some(Ok(obj)) if done(&obj) => return Ok((obj, Instant::now())),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("watching {name}: {e}"),
            None => bail!("the watch of {name} ended"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_one_line_with_its_verdict() {
        assert_eq!(
            figure("pull.ratio", 1.04, "x", Goal::AtMost(1.1)),
            "BENCH name=pull.ratio value=1.040 unit=x goal=<=1.1 verdict=met"
        );
        assert!(figure("a", 2.0, "s", Goal::AtMost(1.0)).ends_with("verdict=missed"));
        assert!(report("a", f64::NAN, "s", Goal::Baseline).is_err());
    }
}
