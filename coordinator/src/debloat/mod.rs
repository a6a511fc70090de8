//! ImageDebloat: a workload's image profiled on its node, rebuilt from the
//! files it used, pushed as `<ref>-baffs`, rolled out, and rolled back if
//! the new pods fail.
//!
//! - [`crd`]: the `ImageDebloat` resource.
//! - [`plan`]: the pure next step from spec, status and what was seen.
//! - [`controller`]: the loop that feeds the plan and carries it out.
//!
//! Profiling and building are the node's (`node-agent debloater`, in the
//! privileged `berth-debloater` DaemonSet); this side decides the phases and
//! owns the workload patches.

pub mod controller;
pub mod crd;
pub mod plan;
