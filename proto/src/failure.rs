//! Names of `berth.agent.v1.FailureReason`, as statuses, the public API and
//! metrics show them (`AuthFailed`, `DiskPressure`, …).
//!
//! The one table of failure reasons is the proto enum; this is its one name
//! mapping. The agent maps its own errors onto the enum; the coordinator turns
//! the enum into these names. A new reason is one proto line and one arm here.

use crate::agent::FailureReason;

impl FailureReason {
    /// The reason's name in statuses, the public API and metric labels;
    /// `Unknown` for an unspecified reason.
    pub fn name(self) -> &'static str {
        match self {
            FailureReason::Unspecified => "Unknown",
            FailureReason::ImageNotFound => "ImageNotFound",
            FailureReason::RegistryUnreachable => "RegistryUnreachable",
            FailureReason::AuthFailed => "AuthFailed",
            FailureReason::PullTimeout => "PullTimeout",
            FailureReason::BadReference => "BadReference",
            FailureReason::RuntimeError => "RuntimeError",
            FailureReason::InUse => "InUse",
            FailureReason::NotManaged => "NotManaged",
            FailureReason::DiskPressure => "DiskPressure",
            FailureReason::SharedImage => "SharedImage",
            FailureReason::SourceAuthFailed => "SourceAuthFailed",
            FailureReason::TargetAuthFailed => "TargetAuthFailed",
            FailureReason::TargetFailed => "TargetFailed",
        }
    }

    /// The reason carried in a message's `reason` field; `Unspecified` for a
    /// number this build does not know (a newer agent).
    pub fn from_wire(value: i32) -> Self {
        FailureReason::try_from(value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FAILURE_REASON_AUTH_FAILED` → `AuthFailed`.
    fn camel_case(proto_name: &str) -> String {
        proto_name
            .trim_start_matches("FAILURE_REASON_")
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                let first = c.next().map(|f| f.to_string()).unwrap_or_default();
                first + &c.as_str().to_lowercase()
            })
            .collect()
    }

    #[test]
    fn every_reason_is_named_after_its_proto_value() {
        for v in 1..64 {
            let Ok(r) = FailureReason::try_from(v) else {
                continue;
            };
            assert_eq!(r.name(), camel_case(r.as_str_name()), "{r:?}");
        }
    }

    #[test]
    fn an_unknown_or_unspecified_reason_is_named_unknown() {
        assert_eq!(FailureReason::from_wire(0).name(), "Unknown");
        assert_eq!(FailureReason::from_wire(9999).name(), "Unknown");
        assert_eq!(FailureReason::from_wire(3).name(), "AuthFailed");
    }
}
