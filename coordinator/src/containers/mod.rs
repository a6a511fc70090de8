//! Docker containers as pods: the coordinator's side of the Docker API
//! (`berth.v1.Containers` and `berth.v1.Images`, which docker-shim calls).
//!
//! - [`record`]: a container's durable record, a ConfigMap per container.
//! - [`pod`]: record → pod, and pod → Docker state; plain functions.
//! - [`pool`]: ready pod sandboxes a container starts in as an ephemeral
//!   container (`start_mode: sandbox-pool`).
//! - [`placement`]: which node a pod should prefer (one holding its image,
//!   else one that starts pulling it at once).
//! - [`store`]: per-namespace mirrors of records and pods, from watches.
//! - [`api`]: the `Containers` service over those.
//! - [`exec`]: `Containers/Exec`, through the pod exec API.
//! - [`events`]: `Containers/Events`, Docker's events as differences
//!   between snapshots of the mirror.
//! - [`logs`]: log lines from the node agent that reads the CRI log file
//!   (stdout and stderr kept apart) to the API caller.
//! - [`sessions`]: client sessions (one per shim), their Leases, and the
//!   removal of a vanished client's containers.
//! - [`tunnel`]: `Containers/Tunnel`, a TCP connection to a container's
//!   port carried over gRPC (published ports).
//! - [`images`]: the `Images` service, reading registries.
//! - [`uploads`]: files copied into a container before it runs, kept in
//!   a ConfigMap and mounted into each run.
//! - [`networks`]: Docker's user-defined networks as records and headless
//!   Services; [`network_api`]: the `Networks` service over them.
//!
//! Callers are checked by the access layer as themselves: the verb on pods
//! in the request's namespace ([`crate::access::policy`]).

pub mod api;
pub mod events;
pub mod exec;
pub mod images;
pub mod logs;
pub mod network_api;
pub mod networks;
pub mod placement;
pub mod pod;
pub mod pool;
pub mod record;
pub mod sessions;
pub mod store;
pub mod tunnel;
pub mod uploads;
