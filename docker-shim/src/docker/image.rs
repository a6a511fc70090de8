//! Images as Docker shows them: the reference a pull asks for
//! (`fromImage` + `tag`), an `ImageInfo` as Docker's `ImageInspect`, and
//! pull progress as Docker's JSON message lines.

use std::collections::BTreeMap;

use berth_proto::api::ImageInfo;
use serde_json::{Value, json};

/// The reference `POST /images/create?fromImage=…&tag=…` asks for: the tag
/// is appended (`@` for a digest) unless `fromImage` already carries one.
pub fn pull_reference(from_image: &str, tag: &str) -> Result<String, String> {
    if from_image.is_empty() {
        return Err(
            "fromImage is empty: Berth pulls images only (import with fromSrc is not supported)"
                .into(),
        );
    }
    if tag.is_empty() {
        return Ok(from_image.to_string());
    }
    let last = from_image.rsplit('/').next().unwrap_or(from_image);
    if from_image.contains('@') || last.contains(':') {
        return Ok(from_image.to_string());
    }
    if tag.contains(':') {
        Ok(format!("{from_image}@{tag}"))
    } else {
        Ok(format!("{from_image}:{tag}"))
    }
}

/// The short form Docker shows: `busybox:1` for `docker.io/library/busybox:1`.
pub fn familiar(reference: &str) -> String {
    let short = reference.strip_prefix("docker.io/").unwrap_or(reference);
    match short.strip_prefix("library/") {
        Some(rest) if !rest.contains('/') => rest.to_string(),
        _ => short.to_string(),
    }
}

/// Docker's `ImageInspect` answer.
pub fn inspect(info: &ImageInfo) -> Value {
    let tagged = !info.reference.contains('@');
    let repo_tags: Vec<String> = if tagged {
        vec![familiar(&info.reference)]
    } else {
        vec![]
    };
    let repo_digests: Vec<String> = if info.repo_digest.is_empty() {
        vec![]
    } else {
        vec![familiar(&info.repo_digest)]
    };
    let exposed: BTreeMap<&str, Value> = info
        .exposed_ports
        .iter()
        .map(|p| (p.as_str(), json!({})))
        .collect();
    let list_or_null = |v: &[String]| if v.is_empty() { Value::Null } else { json!(v) };
    json!({
        "Id": info.id,
        "RepoTags": repo_tags,
        "RepoDigests": repo_digests,
        "Parent": "",
        "Comment": "",
        "Created": super::time::or_zero(&info.created),
        "DockerVersion": "",
        "Author": "",
        "Config": {
            "Hostname": "", "Domainname": "", "User": info.user,
            "AttachStdin": false, "AttachStdout": false, "AttachStderr": false,
            "ExposedPorts": if exposed.is_empty() { Value::Null } else { json!(exposed) },
            "Tty": false, "OpenStdin": false, "StdinOnce": false,
            "Env": info.env,
            "Cmd": list_or_null(&info.cmd),
            "Image": "",
            "Volumes": null,
            "WorkingDir": info.working_dir,
            "Entrypoint": list_or_null(&info.entrypoint),
            "OnBuild": null,
            "Labels": info.labels.iter().collect::<BTreeMap<_, _>>(),
        },
        "Architecture": info.architecture,
        "Os": info.os,
        "Size": info.size_bytes,
        "GraphDriver": {"Name": super::container::DRIVER, "Data": null},
        "RootFS": {"Type": "layers"},
        "Metadata": {"LastTagTime": super::time::ZERO_TIME},
    })
}

/// One line of Docker's JSON message stream: `{"status": …}`.
pub fn progress_line(status: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({ "status": status })).unwrap_or_default();
    line.extend_from_slice(b"\r\n");
    line
}

/// A failure inside a 200 pull stream, as Docker writes it.
pub fn error_line(message: &str) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({ "errorDetail": { "message": message }, "error": message }))
            .unwrap_or_default();
    line.extend_from_slice(b"\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_references_join_image_and_tag_as_docker_does() {
        assert_eq!(pull_reference("busybox", "1.36").unwrap(), "busybox:1.36");
        assert_eq!(pull_reference("busybox", "").unwrap(), "busybox");
        assert_eq!(
            pull_reference("host:5000/a/b", "v1").unwrap(),
            "host:5000/a/b:v1"
        );
        assert_eq!(
            pull_reference("busybox", "sha256:abc").unwrap(),
            "busybox@sha256:abc"
        );
        assert_eq!(pull_reference("busybox:1", "latest").unwrap(), "busybox:1");
        assert!(pull_reference("", "x").is_err());
    }

    #[test]
    fn docker_hub_names_are_shown_short() {
        assert_eq!(familiar("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(familiar("docker.io/grafana/grafana:1"), "grafana/grafana:1");
        assert_eq!(familiar("host:5000/library/x:1"), "host:5000/library/x:1");
    }

    #[test]
    fn image_inspect_has_the_fields_clients_read() {
        let info = ImageInfo {
            reference: "docker.io/library/redis:7".into(),
            id: "sha256:cfg".into(),
            repo_digest: "docker.io/library/redis@sha256:man".into(),
            size_bytes: 42,
            os: "linux".into(),
            architecture: "amd64".into(),
            created: "2024-01-01T00:00:00Z".into(),
            cmd: vec!["redis-server".into()],
            env: vec!["PATH=/bin".into()],
            exposed_ports: vec!["6379/tcp".into()],
            ..Default::default()
        };
        let v = inspect(&info);
        assert_eq!(v["Id"], "sha256:cfg");
        assert_eq!(v["RepoTags"], json!(["redis:7"]));
        assert_eq!(v["RepoDigests"], json!(["redis@sha256:man"]));
        assert_eq!(v["Size"], 42);
        assert_eq!(
            (v["Os"].as_str(), v["Architecture"].as_str()),
            (Some("linux"), Some("amd64"))
        );
        assert_eq!(v["Config"]["Cmd"], json!(["redis-server"]));
        assert_eq!(v["Config"]["Entrypoint"], Value::Null);
        assert_eq!(v["Config"]["ExposedPorts"], json!({"6379/tcp": {}}));
        assert_eq!(v["Created"], "2024-01-01T00:00:00Z");
    }

    #[test]
    fn progress_and_errors_are_json_lines() {
        assert_eq!(
            progress_line("Digest: sha256:x"),
            b"{\"status\":\"Digest: sha256:x\"}\r\n"
        );
        let e: Value = serde_json::from_slice(&error_line("denied")).unwrap();
        assert_eq!(
            e,
            json!({"errorDetail": {"message": "denied"}, "error": "denied"})
        );
    }
}
