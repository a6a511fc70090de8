//! Berth's coordinator: decides what every node should hold and tells the
//! node agents; serves what it knows on the public gRPC API.
//!
//! Data flow: agents dial in ([`session`]), prove who they are ([`auth`]) and
//! report their runtime's images into the live [`nodes`] view, which the public
//! `berth.v1.Inventory` service ([`api`]) reads. The ImageCache controller
//! ([`imagecache`]) plans from that view and publishes per-node detail; the
//! views they share are plain data in [`domain`], so the gRPC layer depends on
//! no controller and no Kubernetes type. [`server`] wires the gRPC
//! services (with health and reflection) onto one port; [`metrics`] serves
//! Prometheus metrics on another. Both accept through [`listener`] (caps,
//! handshake timeout, survival of accept errors); token checks go through
//! [`review`] (cached, bounded in flight); [`limits`] raises the open-file
//! limit at start. Of the replicas, only the holder of the Lease
//! ([`leader`]) accepts agents and runs the ImageCache controller;
//! [`health`] tells the probes whether this replica is a standby, a working
//! leader, or one whose controller died or stalled.

pub mod access;
pub mod api;
pub mod auth;
pub mod containers;
pub mod deadline;
pub mod domain;
pub mod health;
pub mod imagecache;
pub mod leader;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod nodes;
pub mod review;
pub mod server;
pub mod session;
pub mod tls;
