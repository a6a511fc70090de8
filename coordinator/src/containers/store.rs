//! The coordinator's mirror of Docker containers: per namespace, a reflector
//! of container records (ConfigMaps) and one of their pods, both selected by
//! [`CONTAINER_LABEL`], one of network records ([`NETWORK_LABEL`]) and one
//! of session Leases. A namespace is mirrored from its first call on, so
//! the coordinator needs rights only where containers run (the
//! `berth-container-runner` ClusterRole, bound per namespace). Every change
//! bumps a counter that waiters (`Wait`, `Start`, attach) watch: state comes
//! from watch events, never from polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tonic::Status;
use tracing::warn;

use super::networks::{self, NETWORK_LABEL, Network};
use super::record::{CONTAINER_LABEL, RUN_LABEL, Record, SESSION_LABEL, from_config_map};

/// How long the first call in a namespace waits for its mirror to fill.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// One namespace's mirror.
#[derive(Clone)]
pub struct Space {
    /// The namespace.
    pub namespace: String,
    records: Store<ConfigMap>,
    networks: Store<ConfigMap>,
    pods: Store<Pod>,
    leases: Store<Lease>,
    changed: watch::Receiver<u64>,
    /// Only this client session's containers, if set.
    session: Option<String>,
}

impl Space {
    /// This mirror as one client session sees it: only the containers that
    /// session made (`None`: every container, as a caller without a
    /// session sees them).
    pub fn for_session(&self, session: Option<String>) -> Space {
        Space {
            session,
            ..self.clone()
        }
    }

    /// The session this view is limited to, if any.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// Every well-formed record in the namespace (of this view's session).
    pub fn records(&self) -> Vec<Record> {
        self.records
            .state()
            .iter()
            .filter_map(|cm| from_config_map(cm))
            .filter(|r| self.session.as_ref().is_none_or(|s| &r.session == s))
            .collect()
    }

    /// Every well-formed network record in the namespace (of this view's
    /// session), oldest first.
    pub fn networks(&self) -> Vec<Network> {
        let mut all: Vec<Network> = self
            .networks
            .state()
            .iter()
            .filter_map(|cm| networks::from_config_map(cm))
            .filter(|n| self.session.as_ref().is_none_or(|s| &n.session == s))
            .collect();
        all.sort_by(|a, b| a.created.cmp(&b.created));
        all
    }

    /// The network `key` names: a full ID, a name, or an ID prefix only one
    /// network has.
    pub fn find_network(&self, key: &str) -> Result<Network, Status> {
        find_by(self.networks(), key, |n| (&n.id, &n.name)).map_err(|e| match e {
            Lookup::None => Status::not_found(format!("network {key} not found")),
            Lookup::Many => {
                Status::invalid_argument(format!("multiple networks match the ID prefix {key}"))
            }
        })
    }

    /// The Lease of a client session, as last seen.
    pub fn session_lease(&self, session: &str) -> Option<Arc<Lease>> {
        self.leases.state().into_iter().find(|l| {
            l.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SESSION_LABEL))
                .map(String::as_str)
                == Some(session)
        })
    }

    /// The record `key` names: a full ID, a name (with or without a leading
    /// `/`), or an ID prefix only one container has.
    pub fn find(&self, key: &str) -> Result<Record, Status> {
        let key = key.strip_prefix('/').unwrap_or(key);
        find_by(self.records(), key, |r| (&r.id, &r.name)).map_err(|e| match e {
            Lookup::None => Status::not_found(format!("No such container: {key}")),
            Lookup::Many => {
                Status::invalid_argument(format!("multiple containers match the ID prefix {key}"))
            }
        })
    }

    /// The record's ConfigMap as last seen.
    pub fn records_object(&self, name: &str) -> Option<Arc<ConfigMap>> {
        self.records
            .state()
            .into_iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(name))
    }

    /// Whether the record with this ID still exists.
    pub fn exists(&self, id: &str) -> bool {
        self.records().iter().any(|r| r.id == id)
    }

    /// The pod of the record's latest start, if it exists.
    pub fn current_pod(&self, record: &Record) -> Option<Arc<Pod>> {
        self.pod_of_run(record, record.runs)
    }

    /// The pod of the record's latest start if its container runs, else
    /// Docker's "not running" refusal.
    pub fn running_pod(&self, record: &Record) -> Result<Arc<Pod>, Status> {
        self.current_pod(record)
            .filter(|p| super::pod::state_of(Some(p)).running)
            .ok_or_else(|| {
                Status::failed_precondition(format!("Container {} is not running", record.id))
            })
    }

    /// The pod of one start of the record, if it exists.
    pub fn pod_of_run(&self, record: &Record, run: u32) -> Option<Arc<Pod>> {
        let run = run.to_string();
        let mut of_run: Vec<Arc<Pod>> = self
            .pods_of(record)
            .into_iter()
            .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get(RUN_LABEL)) == Some(&run))
            .collect();
        // A pool pod given up on while its fresh replacement runs: the live one.
        of_run.sort_by_key(|p| p.metadata.deletion_timestamp.is_some());
        of_run.into_iter().next()
    }

    /// The pods whose label `key` is `value`.
    fn pods_labelled(&self, key: &str, value: &str) -> Vec<Arc<Pod>> {
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(key))
                    .map(String::as_str)
                    == Some(value)
            })
            .collect()
    }

    /// The idle pods of the sandbox pool ([`super::pool`]).
    pub fn pool_pods(&self) -> Vec<Arc<Pod>> {
        self.pods_labelled(super::pool::POOL_LABEL, "idle")
    }

    /// Every pod of the record, any run.
    pub fn pods_of(&self, record: &Record) -> Vec<Arc<Pod>> {
        self.pods_labelled(CONTAINER_LABEL, record.short_id())
    }

    /// A receiver that sees every later change of this mirror.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// Waits until `done` holds over this mirror, re-checking on every
    /// change, for at most `limit`. `done` answers `Some` to finish.
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        mut done: impl FnMut(&Space) -> Option<T>,
    ) -> Option<T> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            changed.borrow_and_update();
            if let Some(t) = done(self) {
                return Some(t);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return done(self),
            }
        }
    }
}

/// Why a lookup by ID, name or ID prefix found no single object.
enum Lookup {
    None,
    Many,
}

/// The one of `all` that `key` names: by full ID or name, else by an ID
/// prefix only one has. `id_name` reads an object's ID and name.
fn find_by<T>(
    all: Vec<T>,
    key: &str,
    id_name: impl Fn(&T) -> (&String, &String),
) -> Result<T, Lookup> {
    let exact = all.iter().position(|t| {
        let (id, name) = id_name(t);
        id == key || name == key
    });
    let hex = !key.is_empty() && key.bytes().all(|b| b.is_ascii_hexdigit());
    let mut by_prefix = all.into_iter().enumerate().filter(|(i, t)| {
        Some(*i) == exact || (exact.is_none() && hex && id_name(t).0.starts_with(key))
    });
    match (by_prefix.next(), by_prefix.next()) {
        (Some((_, one)), None) => Ok(one),
        (None, _) => Err(Lookup::None),
        (Some(_), Some(_)) => Err(Lookup::Many),
    }
}

/// Every namespace's mirror, started on first use.
#[derive(Clone)]
pub struct Spaces {
    client: kube::Client,
    spaces: Arc<Mutex<HashMap<String, Space>>>,
}

impl Spaces {
    /// No namespace mirrored yet.
    pub fn new(client: kube::Client) -> Self {
        Spaces {
            client,
            spaces: Arc::default(),
        }
    }

    /// The kube client the mirrors use (for writes).
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The mirror of `namespace`, started (and filled) on first use, and
    /// whether this call started it. Refused with a hint if the coordinator
    /// may not read containers there.
    pub async fn get(&self, namespace: &str) -> Result<(Space, bool), Status> {
        if namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        if let Some(s) = self.spaces.lock().unwrap().get(namespace) {
            return Ok((s.clone(), false));
        }
        let selector = ListParams::default().labels(CONTAINER_LABEL).limit(1);
        let records: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let networks: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        for check in [
            records.list_metadata(&selector).await.map(|_| ()),
            pods.list_metadata(&selector).await.map(|_| ()),
            leases.list_metadata(&selector).await.map(|_| ()),
        ] {
            check.map_err(|e| refusal(namespace, e))?;
        }
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let space = Space {
            namespace: namespace.to_string(),
            records: mirror(records, CONTAINER_LABEL, tx.clone()),
            networks: mirror(networks, NETWORK_LABEL, tx.clone()),
            pods: mirror(pods, CONTAINER_LABEL, tx.clone()),
            leases: mirror(
                Api::namespaced(self.client.clone(), namespace),
                SESSION_LABEL,
                tx,
            ),
            changed,
            session: None,
        };
        let ready = async {
            space.records.wait_until_ready().await.ok();
            space.networks.wait_until_ready().await.ok();
            space.pods.wait_until_ready().await.ok();
            space.leases.wait_until_ready().await.ok();
        };
        if tokio::time::timeout(SYNC_TIMEOUT, ready).await.is_err() {
            return Err(Status::unavailable(format!(
                "the mirror of namespace {namespace} did not fill within {SYNC_TIMEOUT:?}"
            )));
        }
        let mut spaces = self.spaces.lock().unwrap();
        if let Some(s) = spaces.get(namespace) {
            // Another call got there first; this mirror's watches end with it.
            return Ok((s.clone(), false));
        }
        spaces.insert(namespace.to_string(), space.clone());
        Ok((space, true))
    }
}

fn refusal(namespace: &str, e: kube::Error) -> Status {
    match e {
        kube::Error::Api(ae) if ae.code == 403 => Status::failed_precondition(format!(
            "Berth may not run containers in namespace {namespace}; an administrator can allow it: \
             kubectl -n {namespace} create rolebinding berth-container-runner \
             --clusterrole=berth-container-runner --serviceaccount=berth-system:berth-coordinator"
        )),
        kube::Error::Api(ae) if ae.code == 404 => {
            Status::not_found(format!("namespace {namespace} not found"))
        }
        e => Status::unavailable(format!("reading containers of namespace {namespace}: {e}")),
    }
}

fn mirror<K>(api: Api<K>, label: &str, changed: Arc<watch::Sender<u64>>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&());
    let config = watcher::Config::default().labels(label);
    tokio::spawn(
        watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .for_each(move |e| {
                match e {
                    Ok(_) => changed.send_modify(|n| *n += 1),
                    Err(e) => warn!(error = %e, "container {kind} watch failed; retrying"),
                }
                futures::future::ready(())
            }),
    );
    store
}
