//! The coordinator's high availability on the real local cluster: two
//! replicas, one leader (the Lease holder, the pod the Service selects, the
//! one the agents are connected to), and a takeover when the leader is
//! killed in the middle of a rollout, checked through the Lease, CRI on each
//! node and the registry's own access log, not only through Berth's status.
//!
//! That health turns NOT_SERVING when the leader's controller dies or stalls
//! is tested in process (coordinator/src/health.rs and
//! coordinator/tests/leadership.rs): making a real controller stall on the
//! cluster would need a fault switch in production code.
//!
//! Run with `--test-threads=1`: the takeover test kills the leader.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use berth_e2e::{Cluster, NAMESPACE, RegistryLog, TestNamespace, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams};

const COORDINATOR_LABEL: &str = "app.kubernetes.io/name=berth-coordinator";
const LEADER_LABEL: &str = "berth.dev/leader";
const LEASE: &str = "berth-coordinator";
/// The longest a standby may take to hold the Lease after the leader died.
const TAKEOVER: Duration = Duration::from_secs(15);

/// The two coordinator replicas in their steady state.
struct Replicas {
    leader: String,
    standby: String,
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn lease_holder(c: &Cluster) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(c.client.clone(), NAMESPACE);
    Ok(leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// `berth_agents_connected` of one coordinator pod, through the apiserver's
/// pod proxy (plain HTTP on the metrics port).
fn agents_connected(c: &Cluster, pod: &str) -> anyhow::Result<u64> {
    let text = c.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:9090/proxy/metrics"),
    ])?;
    text.lines()
        .find_map(|l| l.strip_prefix("berth_agents_connected "))
        .context("no berth_agents_connected in the metrics")?
        .trim()
        .parse()
        .context("berth_agents_connected is not a number")
}

/// Checks the steady state once: exactly two live coordinator pods, both
/// Ready; one holds the Lease and alone carries the leader label; the
/// Service's ready endpoints are that pod only; every agent is connected to
/// it and none to the other. Says what is missing otherwise.
async fn steady(c: &Cluster) -> anyhow::Result<Replicas> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let live: Vec<Pod> = pods
        .list(&ListParams::default().labels(COORDINATOR_LABEL))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let names: Vec<String> = live
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    ensure!(live.len() == 2, "coordinator pods {names:?}, want two");
    ensure!(
        live.iter().all(ready),
        "not every coordinator pod is Ready: {names:?}"
    );
    let holder = lease_holder(c).await?.context("nobody holds the Lease")?;
    let leader = live
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(&holder))
        .with_context(|| format!("the Lease holder {holder} is none of {names:?}"))?;
    let standby = names.iter().find(|n| **n != holder).unwrap().clone();
    let labelled: Vec<&str> = live
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LEADER_LABEL))
                .is_some_and(|v| v == "true")
        })
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    ensure!(
        labelled == [holder.as_str()],
        "pods labelled {LEADER_LABEL}=true: {labelled:?}, want only the Lease holder {holder}"
    );

    let slices: Api<EndpointSlice> = Api::namespaced(c.client.clone(), NAMESPACE);
    let endpoints: BTreeSet<String> = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={LEASE}")))
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.target_ref?.name)
        .collect();
    ensure!(
        endpoints == BTreeSet::from([holder.clone()]),
        "the Service's ready endpoints are {endpoints:?}, want only {holder}"
    );
    let leader_ip = leader.status.as_ref().and_then(|s| s.pod_ip.clone());
    ensure!(leader_ip.is_some(), "the leader {holder} has no IP yet");

    let on_leader = agents_connected(c, &holder)?;
    ensure!(
        on_leader == c.nodes.len() as u64,
        "{on_leader} agents connected to the leader {holder}, want {}",
        c.nodes.len()
    );
    let on_standby = agents_connected(c, &standby)?;
    ensure!(
        on_standby == 0,
        "{on_standby} agents connected to the standby {standby}"
    );
    Ok(Replicas {
        leader: holder,
        standby,
    })
}

/// Waits (up to `timeout`) for the steady state.
async fn wait_steady(c: &Cluster, timeout: Duration) -> Replicas {
    eventually(
        timeout,
        "two coordinators, one leading with every agent",
        || async { Ok(Some(steady(c).await?)) },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn one_of_two_coordinators_holds_the_lease_is_the_services_endpoint_and_has_every_agent() {
    let c = Cluster::from_env().await.unwrap();
    let r = wait_steady(&c, Duration::from_secs(120)).await;
    assert_ne!(r.leader, r.standby);
}

#[tokio::test]
async fn killing_the_leader_mid_rollout_hands_over_within_15s_and_every_node_pulls_once() {
    let c = Cluster::from_env().await.unwrap();
    let before = wait_steady(&c, Duration::from_secs(120)).await;
    let s = TestNamespace::new(&c, "ha");
    // 128 MiB of random layers, one node at a time: the rollout is still
    // going when the leader dies.
    let img = c.fresh_big_image("ha", 8, 16 << 20).await.unwrap();
    // The registry's access log counts the pulls that reach it.
    let log = RegistryLog::mark(&c);
    c.apply(&format!(
        r#"apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {{name: ha, namespace: {ns}}}
spec:
  images: [{{ref: "{img}"}}]
  rollout: {{maxConcurrentNodes: 1}}
"#,
        ns = s.name
    ))
    .unwrap();
    let caches = s.caches();
    // The first status the leader writes (a watch event, not a poll that
    // could miss a short state) shows the rollout under way: not every node
    // is ready yet. The leader dies right then.
    let nodes = c.nodes.len() as u32;
    berth_e2e::bench::watch_until(&caches, "ha", Duration::from_secs(60), |ic| {
        ic.status
            .as_ref()
            .is_some_and(|st| st.phase == "Progressing" && st.nodes.ready < nodes)
    })
    .await
    .unwrap();

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    pods.delete(&before.leader, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let killed = Instant::now();
    let holder = eventually(
        TAKEOVER,
        "another coordinator to hold the Lease",
        || async { Ok(lease_holder(&c).await?.filter(|h| *h != before.leader)) },
    )
    .await
    .unwrap();
    let took = killed.elapsed();
    // The standby, or the replacement pod if it won the race for the
    // expired Lease: either way another coordinator leads in time.
    assert!(took <= TAKEOVER, "takeover took {took:?}");
    eprintln!("{holder} took over {took:?} after {} died", before.leader);

    eventually(
        Duration::from_secs(120),
        "the cache Ready on every node",
        || async {
            let ic = caches.get("ha").await?;
            let st = ic.status.context("no status yet")?;
            if st.phase == "Ready" && st.nodes.ready as usize == c.nodes.len() {
                return Ok(Some(()));
            }
            bail!("phase {} with {:?}", st.phase, st.nodes)
        },
    )
    .await
    .unwrap();
    for node in &c.nodes {
        assert!(
            c.cri_has_image(node, &img).await.unwrap(),
            "{img} is not in {node}'s runtime"
        );
    }

    // Every node resolved the image's tag once: the new leader's resent
    // pull joined the one still running, and no node pulled twice.
    if !c.local {
        berth_e2e::missing_prerequisite(&format!(
            "{} counts pulls in the registry's access log, which only the local cluster exposes",
            "the takeover test"
        ));
    } else {
        for node in &c.nodes {
            let pulls = log.manifest_fetches(&c, node, &img).await.unwrap();
            assert_eq!(pulls, 1, "{node} fetched {img}'s manifest {pulls} times");
        }
    }

    // Steady again, led by a replica that is not the one killed (the old
    // standby or the Deployment's replacement, whichever won the Lease).
    let after = wait_steady(&c, Duration::from_secs(120)).await;
    assert_ne!(after.leader, before.leader);
    // Gone first, so that no controller pulls the image back.
    caches.delete("ha", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(60), "the cache deleted", || async {
        Ok(caches.get_opt("ha").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    for node in &c.nodes {
        let _ = c.cri_remove(node, &img).await;
    }
}
