//! Readiness and liveness probes of the systemd node's containers: exec
//! (run on the host, which is the container's world here), httpGet and
//! tcpSocket (to the host's loopback: pods share the host's network), on
//! the probe's own schedule, with its thresholds.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Where one probe of one container stands.
#[derive(Debug, Clone)]
pub struct ProbeState {
    /// The verdict after the thresholds (starts false for readiness).
    pub ok: bool,
    successes: i32,
    failures: i32,
    next: Instant,
}

/// The probes of every container, by `(pod uid, container, kind)`.
#[derive(Debug, Default)]
pub struct Probes {
    states: HashMap<(String, String, &'static str), ProbeState>,
}

/// What running a probe once said.
async fn run_once(p: &Probe) -> bool {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let port = |port: &IntOrString| match port {
        IntOrString::Int(n) => Some(*n as u16),
        IntOrString::String(s) => s.parse().ok(),
    };
    let work = async {
        if let Some(exec) = &p.exec {
            let argv = exec.command.clone().unwrap_or_default();
            let Some((first, rest)) = argv.split_first() else {
                return false;
            };
            return tokio::process::Command::new(first)
                .args(rest)
                .kill_on_drop(true)
                .status()
                .await
                .is_ok_and(|s| s.success());
        }
        if let Some(tcp) = &p.tcp_socket {
            let Some(port) = port(&tcp.port) else {
                return false;
            };
            return tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
        }
        if let Some(http) = &p.http_get {
            let Some(port) = port(&http.port) else {
                return false;
            };
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: berth-probe\r\n\r\n"
            );
            if s.write_all(req.as_bytes()).await.is_err() {
                return false;
            }
            let mut head = [0u8; 32];
            let Ok(n) = s.read(&mut head).await else {
                return false;
            };
            // "HTTP/1.x NNN": 200 to 399 is a success, as the kubelet counts.
            let code: u16 = std::str::from_utf8(&head[..n])
                .ok()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            return (200..400).contains(&code);
        }
        false
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(false)
}

impl Probes {
    /// Runs probe `kind` of `(uid, container)` if it is due (the container
    /// running since `started`), and returns its verdict: `ok` after
    /// `successThreshold` successes, not after `failureThreshold` failures.
    /// `default` is the verdict before the first run.
    pub async fn check(
        &mut self,
        key: (&str, &str, &'static str),
        probe: &Probe,
        started: Instant,
        default: bool,
    ) -> bool {
        let now = Instant::now();
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let initial = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let id = (key.0.to_string(), key.1.to_string(), key.2);
        let st = self.states.entry(id).or_insert_with(|| ProbeState {
            ok: default,
            successes: 0,
            failures: 0,
            next: started + initial,
        });
        if now < st.next {
            return st.ok;
        }
        st.next = now + period;
        if run_once(probe).await {
            st.failures = 0;
            st.successes += 1;
            if st.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                st.ok = true;
            }
        } else {
            st.successes = 0;
            st.failures += 1;
            if st.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                st.ok = false;
            }
        }
        st.ok
    }

    /// Forgets the probes of `(uid, container)` (it restarted, or went).
    pub fn reset(&mut self, uid: &str, container: &str) {
        self.states
            .retain(|(u, c, _), _| !(u == uid && c == container));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ExecAction, TCPSocketAction};

    fn exec(cmd: &[&str]) -> Probe {
        Probe {
            exec: Some(ExecAction {
                command: Some(cmd.iter().map(|s| s.to_string()).collect()),
            }),
            period_seconds: Some(1),
            failure_threshold: Some(2),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_probe_turns_after_its_thresholds_and_waits_its_period() {
        let mut p = Probes::default();
        let t0 = Instant::now();
        assert!(
            p.check(("u", "c", "live"), &exec(&["true"]), t0, true)
                .await
        );
        let fail = exec(&["false"]);
        let mut q = Probes::default();
        assert!(
            q.check(("u", "c", "live"), &fail, t0, true).await,
            "one failure of two"
        );
        // Not due again within its period: the verdict stands.
        assert!(q.check(("u", "c", "live"), &fail, t0, true).await);
        q.states.values_mut().for_each(|s| s.next = Instant::now());
        assert!(
            !q.check(("u", "c", "live"), &fail, t0, true).await,
            "two failures"
        );
    }

    #[tokio::test]
    async fn tcp_probes_see_a_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let probe = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(port.into()),
                host: None,
            }),
            ..Default::default()
        };
        assert!(run_once(&probe).await);
        drop(l);
        assert!(!run_once(&probe).await);
    }
}
