//! ImageBackup: the images of running workloads copied to a backup
//! registry, and the workloads rolled onto the copies.
//!
//! - [`crd`]: the `BackupPolicy` and `ImageBackup` resources.
//! - [`naming`]: pure rules (copy names, ImageBackup names, coverage, reasons).
//! - [`workloads`]: Deployments, DaemonSets and StatefulSets in one shape,
//!   and the patches that roll them onto their copies and back.
//! - [`plan`]: the pure decisions of a pass (what to create, copy, expire, roll).
//! - [`copies`]: routes the agents' copy progress to the controller.
//! - [`controller`]: the loop that feeds the plan, carries it out, and
//!   verifies copies in the target before a roll.
//!
//! The copy itself is agent work (`node-agent`'s `tasks::copy`): registry
//! to registry, every platform of an index, digests preserved.

pub mod controller;
pub mod copies;
pub mod crd;
pub mod naming;
pub mod plan;
pub mod workloads;
