//! Berth's wire contracts, shared by every binary of the workspace.
//!
//! - [`agent`]: `berth.agent.v1`, the session between a node agent and the coordinator.
//! - [`containerd`]: the subset of containerd's own API the agent calls.
//! - [`api`]: `berth.v1`, the public API the coordinator serves (grpcurl, docker-shim).
//! - [`backoff`]: the one retry backoff policy (doubling, capped, jittered).
//! - [`docker_config`]: registry credentials from Docker config files and Secrets.
//! - [`failure`]: the names of failure reasons, shared by statuses, the API and metrics.
//! - `oci` (feature `oci`): Berth's references and registry errors in `oci-client`'s terms.
//! - [`reference`]: the container image reference grammar, so that every component
//!   accepts and normalises `busybox`, `host:5000/a/b:tag` and `…@sha256:…` alike.
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, for gRPC reflection.
//! - [`DEFAULT_PULL_TIMEOUT`]: the one default deadline of a pull, shared by the
//!   coordinator (ImageCache `pullTimeout`) and the agent (`PullTask` without one).

pub mod backoff;
pub mod docker_config;
pub mod failure;
#[cfg(feature = "oci")]
pub mod oci;
pub mod reference;

/// Generated code, nested as the proto packages are so cross-package paths resolve.
#[allow(missing_docs, clippy::all)]
pub mod berth {
    /// `berth.agent.*`
    pub mod agent {
        /// `berth.agent.v1`
        pub mod v1 {
            tonic::include_proto!("berth.agent.v1");
        }
    }
    /// `berth.v1`
    pub mod v1 {
        tonic::include_proto!("berth.v1");
    }
}

/// containerd's own API, the subset Berth calls (content and image
/// services), nested as its packages are.
#[allow(missing_docs, clippy::all)]
pub mod containerd {
    /// `containerd.types`
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`
    pub mod services {
        /// `containerd.services.content`
        pub mod content {
            /// `containerd.services.content.v1`
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        /// `containerd.services.images`
        pub mod images {
            /// `containerd.services.images.v1`
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
    }
}

/// `berth.agent.v1`: the agent ↔ coordinator session protocol.
pub use berth::agent::v1 as agent;
/// `berth.v1`: the coordinator's public API.
pub use berth::v1 as api;

/// Encoded `FileDescriptorSet` of every Berth proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("berth_descriptor");

/// Deadline of one pull attempt when nothing names one: an ImageCache image
/// without `pullTimeout`, a `PullTask` with `timeout_seconds` 0.
pub const DEFAULT_PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);
