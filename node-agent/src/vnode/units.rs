//! Pure rules of the systemd provider: unit names, and a pod container's
//! command, restart policy, resources and image in systemd's terms.

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Prefix of every unit the provider makes.
pub const PREFIX: &str = "berth_";

/// The unit of one container: `berth_<namespace>_<pod>_<container>.service`.
/// Namespace, pod and container names are DNS labels (no `_`), so the name
/// reads back unambiguously ([`parse_unit`]).
pub fn unit_name(namespace: &str, pod: &str, container: &str) -> String {
    format!("{PREFIX}{namespace}_{pod}_{container}.service")
}

/// `(namespace, pod, container)` of a unit [`unit_name`] made.
pub fn parse_unit(unit: &str) -> Option<(String, String, String)> {
    let rest = unit.strip_prefix(PREFIX)?.strip_suffix(".service")?;
    let mut parts = rest.splitn(3, '_');
    let (ns, pod, container) = (parts.next()?, parts.next()?, parts.next()?);
    if container.contains('_') {
        return None;
    }
    Some((ns.into(), pod.into(), container.into()))
}

/// What a container's image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// A Debian package, installed on the host (`deb://redis-server`).
    Deb(String),
    /// An OCI image from a registry.
    Oci(String),
}

/// The image kind of `image`.
pub fn image_of(image: &str) -> Result<Image, String> {
    if let Some(pkg) = image.strip_prefix("deb://") {
        let ok = !pkg.is_empty()
            && pkg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        return if ok {
            Ok(Image::Deb(pkg.into()))
        } else {
            Err(format!("{image:?} is not a Debian package name"))
        };
    }
    berth_proto::reference::Reference::parse(image)
        .map(|r| Image::Oci(r.to_string()))
        .map_err(|e| e.to_string())
}

/// The directories a bare command is looked up in.
const PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// `ExecStart`: the program (absolute, looked up in [`PATH`] when bare, by
/// `exists`) and its argv (command then args).
pub fn exec_start(
    c: &Container,
    exists: impl Fn(&str) -> bool,
) -> Result<(String, Vec<String>), String> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let Some(first) = argv.first() else {
        return Err(format!(
            "container {} has no command: a systemd node runs the pod's command (and args)",
            c.name
        ));
    };
    let path = if first.starts_with('/') {
        first.clone()
    } else {
        PATH.iter()
            .map(|d| format!("{d}/{first}"))
            .find(|p| exists(p))
            .ok_or_else(|| format!("{first} is not in {}", PATH.join(":")))?
    };
    Ok((path, argv))
}

/// `Restart=` for the pod's restart policy.
pub fn restart(pod: &Pod) -> &'static str {
    match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
        Some("Never") => "no",
        Some("OnFailure") => "on-failure",
        _ => "always",
    }
}

/// Bytes of a memory quantity (`64Mi`, `1G`, `1e6`, `512`).
pub fn bytes(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let m: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "m" => 1e-3,
        _ => return None,
    };
    Some((n * m) as u64)
}

/// CPU time per second, in microseconds, of a CPU quantity (`500m`, `2`).
pub fn cpu_usec_per_sec(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    let cores: f64 = match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok()? / 1000.0,
        None => s.parse().ok()?,
    };
    Some((cores * 1_000_000.0) as u64)
}

/// `MemoryMax=` and `CPUQuotaPerSecUSec=` from the container's limits.
pub fn limits(c: &Container) -> (Option<u64>, Option<u64>) {
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
    let memory = limits.and_then(|l| l.get("memory")).and_then(bytes);
    let cpu = limits.and_then(|l| l.get("cpu")).and_then(cpu_usec_per_sec);
    (memory, cpu)
}

/// The host ports a pod wants: every `hostPort`, and every `containerPort`
/// (its containers share the host's network), per protocol.
fn host_ports(pod: &Pod) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for p in c.ports.iter().flatten() {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            out.push((proto, p.host_port.unwrap_or(p.container_port)));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Pods (by UID) that want a host port an older live pod holds, each with
/// the message that names the holder. The oldest (then by name) keeps it.
pub fn port_conflicts(pods: &[std::sync::Arc<Pod>]) -> std::collections::HashMap<String, String> {
    use kube::ResourceExt;
    let mut live: Vec<&Pod> = pods
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded") | Some("Failed"))
        })
        .collect();
    live.sort_by_key(|p| {
        (
            p.creation_timestamp().map(|t| t.0),
            p.namespace(),
            p.name_any(),
        )
    });
    let mut held: std::collections::HashMap<(String, i32), String> = Default::default();
    let mut out = std::collections::HashMap::new();
    for p in live {
        let me = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
        let ports = host_ports(p);
        if let Some((proto, port, holder)) = ports
            .iter()
            .find_map(|k| held.get(k).map(|h| (k.0.clone(), k.1, h.clone())))
        {
            out.insert(
                p.uid().unwrap_or_default(),
                format!("host port {port}/{proto} is taken on this node by pod {holder} (pods share the host's network here)"),
            );
            continue;
        }
        for k in ports {
            held.insert(k, me.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_older_pod_keeps_a_host_port_and_the_newer_is_told_who_holds_it() {
        use k8s_openapi::api::core::v1::{ContainerPort, PodSpec};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
        let pod = |name: &str, secs: i64, port: i32| {
            std::sync::Arc::new(Pod {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("ns".into()),
                    uid: Some(format!("uid-{name}")),
                    creation_timestamp: Some(Time(
                        k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
                    )),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "main".into(),
                        ports: Some(vec![ContainerPort {
                            container_port: port,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: None,
            })
        };
        let c = port_conflicts(&[
            pod("second", 20, 8080),
            pod("first", 10, 8080),
            pod("other", 30, 9090),
        ]);
        assert_eq!(c.len(), 1);
        assert!(
            c["uid-second"].contains("8080/TCP") && c["uid-second"].contains("ns/first"),
            "{c:?}"
        );
    }

    #[test]
    fn unit_names_read_back() {
        let u = unit_name("team-a", "web-0", "main");
        assert_eq!(u, "berth_team-a_web-0_main.service");
        assert_eq!(
            parse_unit(&u),
            Some(("team-a".into(), "web-0".into(), "main".into()))
        );
        assert_eq!(parse_unit("sshd.service"), None);
        assert_eq!(parse_unit("berth_a_b.service"), None);
    }

    #[test]
    fn images_are_packages_or_references() {
        assert_eq!(
            image_of("deb://redis-server"),
            Ok(Image::Deb("redis-server".into()))
        );
        assert!(image_of("deb://Bad Name").is_err());
        assert!(image_of("deb://").is_err());
        assert_eq!(
            image_of("busybox"),
            Ok(Image::Oci("docker.io/library/busybox:latest".into()))
        );
    }

    #[test]
    fn commands_resolve_on_the_path_and_need_one() {
        let c = Container {
            name: "main".into(),
            command: Some(vec!["sleep".into()]),
            args: Some(vec!["60".into()]),
            ..Default::default()
        };
        let (path, argv) = exec_start(&c, |p| p == "/bin/sleep").unwrap();
        assert_eq!(
            (path.as_str(), argv),
            ("/bin/sleep", vec!["sleep".to_string(), "60".into()])
        );
        assert!(exec_start(&c, |_| false).unwrap_err().contains("not in"));
        let bare = Container {
            name: "main".into(),
            ..Default::default()
        };
        assert!(
            exec_start(&bare, |_| true)
                .unwrap_err()
                .contains("no command")
        );
    }

    #[test]
    fn quantities_become_systemd_limits() {
        assert_eq!(bytes(&Quantity("64Mi".into())), Some(64 << 20));
        assert_eq!(bytes(&Quantity("1G".into())), Some(1_000_000_000));
        assert_eq!(bytes(&Quantity("512".into())), Some(512));
        assert_eq!(cpu_usec_per_sec(&Quantity("250m".into())), Some(250_000));
        assert_eq!(cpu_usec_per_sec(&Quantity("2".into())), Some(2_000_000));
        assert_eq!(bytes(&Quantity("12Q".into())), None);
    }
}
