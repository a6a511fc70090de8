//! Berth's coordinator: decides what every node should hold and tells the
//! node agents; serves what it knows on the public gRPC API.
//!
//! Data flow: agents dial in ([`session`]), prove who they are ([`auth`]) and
//! report their runtime's images into the live [`nodes`] view, which the public
//! `berth.v1.Inventory` service ([`api`]) reads. [`server`] wires the gRPC
//! services (with health and reflection) onto one port; [`metrics`] serves
//! Prometheus metrics on another.

pub mod access;
pub mod api;
pub mod auth;
pub mod imagecache;
pub mod metrics;
pub mod nodes;
pub mod server;
pub mod session;
pub mod tls;
