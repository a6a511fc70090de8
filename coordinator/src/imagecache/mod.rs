//! ImageCache: images pre-pulled onto chosen nodes, kept, removed on request.
//!
//! [`crd`] holds the resource types; [`plan`] decides, as a pure function of
//! caches, nodes and agent reports, what every node should pull or remove and
//! what each cache's counts are; [`view`] turns one cache's spec into the
//! planner's view and lists what it could not use; [`status`] turns the counts
//! into phase, conditions and rollout times, and [`detail`] into per-node
//! detail for the public API (both pure, beside the planner); [`controller`]
//! is the thin loop that feeds them from the apiserver and the agent sessions
//! and carries the plan out; [`tags`] follows the digests of tracked tags;
//! [`sizes`] learns from the registry how much disk a first pull takes;
//! [`access`] keeps one tenant's pull Secret from deciding another tenant's
//! pulls and readiness; [`problems`] keeps a lasting problem to one Warning
//! Event; [`pull_secrets`] shows a pull Secret the coordinator may not read
//! (and the RoleBinding to create); [`watch`] mirrors the apiserver and wakes
//! the loop only for news.

pub mod access;
pub mod controller;
pub mod crd;
pub mod detail;
pub mod plan;
pub mod problems;
pub mod pull_secrets;
pub mod sizes;
pub mod status;
pub mod tags;
pub mod view;
pub mod watch;
