//! Berth's node agent: one per node, next to the node's container runtime.
//!
//! - [`cri`] talks CRI gRPC to containerd or CRI-O over the runtime's unix socket
//!   and turns the runtime's failures into [`cri::CriError`]s that say what to do.
//! - [`runtime`] is the [`runtime::ImageRuntime`] trait those calls sit behind,
//!   with an in-memory fake for tests.
//! - [`cli`] is the operator's crictl-like command line (`node-agent images …`).
//! - [`session`] keeps the agent's stream to the coordinator alive and fed with
//!   the node's [`inventory`], and [`tasks`] carries out the coordinator's work,
//!   pulls only as far as the [`disk`] guard allows.
//! - [`logs`] answers the coordinator's log requests from the containers'
//!   CRI log files, found through the runtime.
//! - [`health`] watches whether the runtime answers, for the kubelet's
//!   probes (`/readyz`, `/healthz`) and for the session's reconnects.
//! - [`debloat`] is the debloat engine (profile with fanotify, filter the
//!   layers, push `<ref>-baffs`) and `node-agent baffs`.
//! - [`vnode`] is `node-agent virtual-node`: a host without a kubelet as a
//!   Node whose pods run as systemd units.
//! - [`testing`] lets tests that need something of the machine fail in CI
//!   and say SKIPPED elsewhere.

pub mod cli;
pub mod cri;
pub mod debloat;
pub mod disk;
pub mod health;
pub mod inventory;
pub mod logs;
pub mod runtime;
pub mod session;
pub mod tasks;
pub mod testing;
pub mod vnode;
