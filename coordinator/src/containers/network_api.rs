//! The `berth.v1.Networks` service over [`super::networks`]: network
//! records, and the container specs and Services that connect containers
//! to them.

use berth_proto::api as pb;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use tonic::{Request, Response, Status};
use tracing::info;

use super::api::{ContainersApi, SEE_WRITE, kube_status};
use super::networks::{self, Network, PREDEFINED};
use super::record::{self, Record};
use super::store::Space;

/// The `Networks` service; it shares the containers' mirrors.
#[derive(Clone)]
pub struct NetworksApi {
    containers: ContainersApi,
}

impl NetworksApi {
    /// Serves networks next to `containers`.
    pub fn new(containers: ContainersApi) -> Self {
        NetworksApi { containers }
    }

    fn config_maps(&self, ns: &str) -> Api<ConfigMap> {
        Api::namespaced(self.containers.client().clone(), ns)
    }

    /// Makes the names of a connected container resolvable, and waits for
    /// DNS to have them while it runs.
    async fn publish(&self, space: &Space, record: &Record) -> Result<(), Status> {
        let client = self.containers.client();
        networks::ensure_services(client, record).await?;
        if let Ok(pod) = space.running_pod(record) {
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            networks::wait_resolvable(client, record, &ip).await;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::networks_server::Networks for NetworksApi {
    async fn create(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::NetworkInfo>, Status> {
        let space = self
            .containers
            .session_space(request.metadata(), &request.get_ref().namespace)
            .await?;
        let req = request.into_inner();
        if PREDEFINED.contains(&req.name.as_str()) {
            return Err(Status::permission_denied(format!(
                "{} is a pre-defined network and cannot be created",
                req.name
            )));
        }
        if !record::valid_name(&req.name) {
            return Err(Status::invalid_argument(format!(
                "invalid network name {:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at most 63",
                req.name
            )));
        }
        let network = Network {
            namespace: req.namespace.clone(),
            id: record::new_id(),
            name: req.name.clone(),
            driver: if req.driver.is_empty() {
                "bridge".into()
            } else {
                req.driver
            },
            created: k8s_openapi::jiff::Timestamp::now().to_string(),
            labels: req.labels.into_iter().collect(),
            session: space.session().unwrap_or_default().to_string(),
            object_name: String::new(),
        };
        self.config_maps(&req.namespace)
            .create(&PostParams::default(), &networks::to_config_map(&network))
            .await
            .map_err(|e| match e {
                kube::Error::Api(ae) if ae.code == 409 => Status::already_exists(format!(
                    "network with name {} already exists",
                    network.name
                )),
                e => kube_status("creating the network", e),
            })?;
        info!(namespace = %req.namespace, network = %network.name, "network created");
        let made = space
            .wait_for(SEE_WRITE, |s| s.find_network(&network.id).ok())
            .await
            .ok_or_else(|| Status::unavailable("the new network did not show in the watch"))?;
        Ok(Response::new(networks::info(&space, &made)))
    }

    async fn inspect(
        &self,
        request: Request<pb::NetworkRequest>,
    ) -> Result<Response<pb::NetworkInfo>, Status> {
        let space = self
            .containers
            .session_space(request.metadata(), &request.get_ref().namespace)
            .await?;
        let network = space.find_network(&request.get_ref().id)?;
        Ok(Response::new(networks::info(&space, &network)))
    }

    async fn list(
        &self,
        request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let space = self
            .containers
            .session_space(request.metadata(), &request.get_ref().namespace)
            .await?;
        let req = request.into_inner();
        let networks = space
            .networks()
            .iter()
            .filter(|n| networks::matches(&req, n))
            .map(|n| networks::info(&space, n))
            .collect();
        Ok(Response::new(pb::ListNetworksResponse { networks }))
    }

    async fn remove(
        &self,
        request: Request<pb::NetworkRequest>,
    ) -> Result<Response<pb::RemoveNetworkResponse>, Status> {
        let space = self
            .containers
            .session_space(request.metadata(), &request.get_ref().namespace)
            .await?;
        let network = space.find_network(&request.get_ref().id)?;
        let members = networks::info(&space, &network).members;
        if !members.is_empty() {
            let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            return Err(Status::failed_precondition(format!(
                "error while removing network: network {} id {} has active endpoints ({})",
                network.name,
                network.id,
                names.join(", ")
            )));
        }
        self.containers.delete_network(&space, &network).await?;
        space
            .wait_for(SEE_WRITE, |s| {
                s.find_network(&network.id).is_err().then_some(())
            })
            .await
            .ok_or_else(|| Status::unavailable("the removal did not show in the watch"))?;
        Ok(Response::new(pb::RemoveNetworkResponse {}))
    }

    async fn connect_container(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<pb::NetworkInfo>, Status> {
        let space = self
            .containers
            .session_space(request.metadata(), &request.get_ref().namespace)
            .await?;
        let req = request.into_inner();
        let network = space.find_network(&req.network)?;
        let record = space.find(&req.container)?;
        for alias in &req.aliases {
            networks::check_alias(alias)?;
        }
        let mut spec = record.spec.clone();
        if spec.networks.contains(&network.name) && req.aliases.is_empty() {
            return Err(Status::permission_denied(format!(
                "endpoint with name {} already exists in network {}",
                record.name, network.name
            )));
        }
        if !spec.networks.contains(&network.name) {
            spec.networks.push(network.name.clone());
        }
        for alias in req.aliases {
            if !spec.aliases.contains(&alias) {
                spec.aliases.push(alias);
            }
        }
        let before = record.clone();
        let record = self.containers.rewrite(&space, &record, spec).await?;
        if let Err(e) = self.publish(&space, &record).await {
            // Put the spec and the names back as they were.
            let keep = networks::dns_names(&before.spec);
            let _ = networks::drop_services(self.containers.client(), &record, &keep).await;
            let _ = self.containers.rewrite(&space, &record, before.spec).await;
            return Err(e);
        }
        info!(namespace = %space.namespace, network = %network.name, container = %record.name, "connected");
        Ok(Response::new(networks::info(&space, &network)))
    }

    async fn disconnect_container(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<pb::NetworkInfo>, Status> {
        let space = self
            .containers
            .session_space(request.metadata(), &request.get_ref().namespace)
            .await?;
        let req = request.into_inner();
        let network = space.find_network(&req.network)?;
        let record = space.find(&req.container)?;
        if !record.spec.networks.contains(&network.name) {
            return Err(Status::not_found(format!(
                "container {} is not connected to network {}",
                record.name, network.name
            )));
        }
        let mut spec = record.spec.clone();
        spec.networks.retain(|n| n != &network.name);
        if spec.networks.is_empty() {
            spec.aliases.clear();
        }
        let keep = networks::dns_names(&spec);
        let record = self.containers.rewrite(&space, &record, spec).await?;
        networks::drop_services(self.containers.client(), &record, &keep).await?;
        info!(namespace = %space.namespace, network = %network.name, container = %record.name, "disconnected");
        Ok(Response::new(networks::info(&space, &network)))
    }
}
