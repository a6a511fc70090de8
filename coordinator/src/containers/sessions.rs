//! Client sessions: each docker-shim holds a `Containers/Session` stream,
//! and while it is open the coordinator renews the session's Lease in the
//! namespace. Containers made in a session carry its ID; once the Lease has
//! expired — the shim crashed, was killed, lost its network — the reaper
//! removes them. The Lease, not the stream, decides, so a coordinator
//! failover (the stream breaks, the shim reconnects within the TTL) costs
//! nothing.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use berth_proto::api as pb;
use futures::Stream;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use tonic::Status;
use tracing::info;

use super::record::SESSION_LABEL;

/// Metadata key naming the caller's session on every Containers call.
pub const SESSION_HEADER: &str = "x-berth-session";
/// A session's Lease lives this long after its last renewal unless the
/// client asks otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(20);
/// The field manager of the coordinator's Lease writes.
const MANAGER: &str = "berth-coordinator";

/// The session a call names in its metadata, checked.
pub fn session_of(metadata: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    let Some(v) = metadata.get(SESSION_HEADER) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| Status::invalid_argument(format!("{SESSION_HEADER} is not text")))?;
    check_session(s)?;
    Ok(Some(s.to_string()))
}

/// A session ID must be 8 to 32 lowercase hex digits.
pub fn check_session(s: &str) -> Result<(), Status> {
    let ok = (8..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "session {s:?}: want 8 to 32 lowercase hex digits"
        )))
    }
}

/// Name of a session's Lease.
pub fn lease_name(session: &str) -> String {
    format!("berth-session-{session}")
}

/// Whether the session of a record (a container's or a network's) made at
/// `created` (RFC 3339) is over: its Lease expired, or never showed within
/// `grace` of the record's creation. `now` and the times are unix seconds.
pub fn session_over(
    session: &str,
    created: &str,
    lease: Option<&Lease>,
    now: i64,
    grace: i64,
) -> bool {
    if session.is_empty() {
        return false;
    }
    let spec = lease.and_then(|l| l.spec.as_ref());
    match spec.and_then(|s| Some((s.renew_time.as_ref()?, s.lease_duration_seconds?))) {
        Some((renewed, ttl)) => renewed.0.as_second() + i64::from(ttl) < now,
        None => {
            let created = created
                .parse::<k8s_openapi::jiff::Timestamp>()
                .map(|t| t.as_second())
                .unwrap_or(0);
            created + grace < now
        }
    }
}

/// Renews `session`'s Lease every third of `ttl` until `closed` resolves
/// (the client went away), reporting each renewal on `tx`.
pub async fn hold(
    leases: Api<Lease>,
    session: String,
    ttl: Duration,
    tx: tokio::sync::mpsc::Sender<Result<pb::SessionState, Status>>,
) {
    let name = lease_name(&session);
    info!(%session, lease = %name, "client session opened");
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tx.closed() => break,
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    SESSION_LABEL.to_string(),
                    session.clone(),
                )])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(format!("docker-shim/{session}")),
                lease_duration_seconds: Some(ttl.as_secs().max(1) as i32),
                renew_time: Some(MicroTime(now)),
                ..Default::default()
            }),
        };
        let result = leases
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await;
        let msg = match result {
            Ok(_) => Ok(pb::SessionState {
                lease: name.clone(),
                renewed: now.to_string(),
            }),
            Err(e) => Err(super::api::kube_status("renewing the session's Lease", e)),
        };
        let failed = msg.is_err();
        if tx.send(msg).await.is_err() || failed {
            break;
        }
    }
    info!(%session, "client session closed; its Lease runs out");
}

/// The stream a `Session` call answers with.
pub type SessionStates = Pin<Box<dyn Stream<Item = Result<pb::SessionState, Status>> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::record::Record;

    fn record(session: &str, created: &str) -> Record {
        Record {
            namespace: "ci".into(),
            id: "ab".repeat(32),
            name: "web".into(),
            spec: pb::ContainerSpec::default(),
            runs: 0,
            run_started: String::new(),
            created: created.into(),
            uid: "u".into(),
            object_name: "o".into(),
            session: session.into(),
        }
    }

    fn lease(renewed: i64, ttl: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::from_second(renewed).unwrap(),
                )),
                lease_duration_seconds: Some(ttl),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_is_over_once_its_lease_has_run_out() {
        let r = record("abcdef12", "2026-11-25T00:00:00Z");
        let t0 = "2026-11-25T00:00:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_second();
        assert!(!session_over(
            &r.session,
            &r.created,
            Some(&lease(t0 + 100, 20)),
            t0 + 110,
            60
        ));
        assert!(session_over(
            &r.session,
            &r.created,
            Some(&lease(t0 + 100, 20)),
            t0 + 121,
            60
        ));
        // No Lease yet: only after the grace.
        assert!(!session_over(&r.session, &r.created, None, t0 + 30, 60));
        assert!(session_over(&r.session, &r.created, None, t0 + 61, 60));
        // Containers made outside a session are never reaped this way.
        assert!(!session_over(
            "",
            "2026-11-25T00:00:00Z",
            None,
            t0 + 1000,
            60
        ));
    }

    #[test]
    fn session_ids_are_short_lowercase_hex() {
        assert!(check_session("0123abcd").is_ok());
        assert!(check_session("0123ABCD").is_err());
        assert!(check_session("abc").is_err());
        assert!(check_session(&"a".repeat(33)).is_err());
        assert!(check_session("abcdefg1").is_err());
    }
}
