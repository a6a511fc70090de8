//! Security of Berth's own traffic and API on the real cluster: the
//! coordinator's port speaks TLS only, agents hold their sessions over it,
//! the public API is authenticated and authorized by Kubernetes RBAC, a
//! certificate the user puts in the Secret wins over the generated one, and
//! pull Secrets are read only in namespaces that allow it.
//!
//! Needs the cluster up and Berth installed. Run with `--test-threads=1`:
//! the certificate test restarts the coordinator.

use std::sync::Arc;
use std::time::Duration;

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::{Bearer, COORDINATOR_NAME, Cluster, NAMESPACE, eventually};
use berth_proto::api as pb;
use berth_proto::api::inventory_client::InventoryClient;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

const COORDINATOR_LABEL: &str = "app.kubernetes.io/name=berth-coordinator";
const AGENT_LABEL: &str = "app.kubernetes.io/name=berth-node-agent";
const TLS_SECRET: &str = "berth-coordinator-tls";

/// Names of the nodes the coordinator lists as connected, asked over TLS as
/// the viewer through a fresh port-forward.
async fn connected(c: &Cluster) -> anyhow::Result<Vec<String>> {
    let pf = c.port_forward("berth-coordinator", 7070)?;
    let mut api = c.inventory_client(&pf.addr()).await?;
    let nodes = api
        .list_nodes(pb::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    Ok(nodes
        .into_iter()
        .filter(|n| n.connected)
        .map(|n| n.name)
        .collect())
}

async fn wait_all_connected(c: &Cluster, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "every node connected over TLS", || async {
        let up = connected(c).await?;
        Ok(c.nodes.iter().all(|n| up.contains(n)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn plaintext_is_refused_on_the_coordinators_port_while_tls_is_answered() {
    let c = Cluster::from_env().await.unwrap();
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();

    let plain = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", pf.addr()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        InventoryClient::new(channel)
            .list_nodes(pb::ListNodesRequest::default())
            .await?;
        anyhow::Ok(())
    };
    let refused = tokio::time::timeout(Duration::from_secs(30), plain)
        .await
        .expect("a plaintext client is refused promptly, not left hanging");
    assert!(refused.is_err(), "a plaintext gRPC call got an answer");

    let out = std::process::Command::new(c.tool("grpcurl"))
        .args(["-plaintext", &pf.addr(), "list"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "grpcurl -plaintext got an answer");

    // The same port, over TLS and without a token: reflection is open.
    let (ok, services, err) = c.grpcurl_as(None, &[&pf.addr(), "list"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(services.contains("berth.v1.Inventory"), "{services}");
}

#[tokio::test]
async fn every_agent_holds_its_session_over_tls_to_the_services_name() {
    let c = Cluster::from_env().await.unwrap();
    let env = c
        .kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "ds/berth-node-agent",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"BERTH_COORDINATOR\")].value}",
        ])
        .unwrap();
    assert_eq!(env, "https://berth-coordinator.berth-system.svc:7070");
    // Plaintext is refused (test above), so a connected node is a TLS session.
    wait_all_connected(&c, Duration::from_secs(60))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    for p in pods
        .list(&ListParams::default().labels(AGENT_LABEL))
        .await
        .unwrap()
        .items
    {
        let name = p.metadata.name.unwrap();
        let logs = c.kubectl(&["-n", NAMESPACE, "logs", &name]).unwrap();
        assert!(logs.contains("session established"), "{name}:\n{logs}");
    }
}

#[tokio::test]
async fn grpcurl_over_tls_with_a_viewer_token_lists_every_node() {
    let c = Cluster::from_env().await.unwrap();
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();
    let out = c
        .api_grpcurl(&[&pf.addr(), "berth.v1.Inventory/ListNodes"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str())
        .collect();
    for n in &c.nodes {
        assert!(names.contains(&n.as_str()), "{n} missing from {out}");
    }
}

/// Creates a ServiceAccount with no permissions at all; returns its token.
fn powerless_token(c: &Cluster, name: &str) -> String {
    c.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n"
    ))
    .unwrap();
    c.create_token(name).unwrap()
}

#[tokio::test]
async fn anonymous_calls_are_unauthenticated_and_callers_without_rbac_are_denied() {
    let c = Cluster::from_env().await.unwrap();
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();
    let channel = c.coordinator_channel(&pf.addr()).await.unwrap();

    let anonymous = InventoryClient::new(channel.clone())
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        anonymous.code(),
        tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );
    assert!(
        anonymous.message().contains("authorization: Bearer"),
        "{}",
        anonymous.message()
    );

    let forged = Bearer("Bearer not-a-token".parse().unwrap());
    let e = InventoryClient::with_interceptor(channel.clone(), forged)
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    let token = powerless_token(&c, "berth-e2e-nobody");
    let bearer = Bearer(format!("Bearer {token}").parse().unwrap());
    let mut nobody = InventoryClient::with_interceptor(channel.clone(), bearer);
    let e = nobody
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("berth-e2e-nobody may not list nodes"),
        "{}",
        e.message()
    );

    // A Role in one namespace opens that namespace's caches and no other.
    let ns = format!("sec-rbac-{}", berth_e2e::registry::unique_suffix());
    c.kubectl(&["create", "namespace", &ns]).unwrap();
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "role",
        "cache-reader",
        "--verb=get",
        "--resource=imagecaches.berth.dev",
    ])
    .unwrap();
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "rolebinding",
        "cache-reader",
        "--role=cache-reader",
        &format!("--serviceaccount={NAMESPACE}:berth-e2e-nobody"),
    ])
    .unwrap();
    let get = |namespace: &str| pb::GetImageCacheRequest {
        namespace: namespace.into(),
        name: "absent".into(),
    };
    let e = eventually(Duration::from_secs(30), "the RoleBinding in effect", || {
        let mut nobody = nobody.clone();
        let req = get(&ns);
        async move {
            // Past the access check, the cache does not exist: NotFound.
            match nobody.get_image_cache(req).await {
                Err(e) if e.code() == tonic::Code::NotFound => Ok(Some(e)),
                Err(e) if e.code() == tonic::Code::PermissionDenied => Ok(None),
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(e.message().contains("absent"), "{}", e.message());
    let e = nobody.get_image_cache(get("default")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("get imagecaches.berth.dev") && e.message().contains("\"default\""),
        "{}",
        e.message()
    );
    let _ = c.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// The leaf certificate the coordinator at `addr` serves to a client that
/// trusts only `ca_pem` and checks [`COORDINATOR_NAME`].
async fn served_leaf(addr: &str, ca_pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(COORDINATOR_NAME)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no certificate served"))?;
    Ok(leaf.to_vec())
}

/// A CA and a certificate for the coordinator's names, made here as a user
/// (or cert-manager) would: (leaf DER, Secret data).
fn user_certificate() -> (Vec<u8>, std::collections::BTreeMap<String, ByteString>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "e2e user-provided CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![
        "berth-coordinator".to_string(),
        format!("berth-coordinator.{NAMESPACE}"),
        COORDINATOR_NAME.to_string(),
        format!("{COORDINATOR_NAME}.cluster.local"),
        "localhost".to_string(),
    ])
    .unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "e2e user-provided");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let b = |s: String| ByteString(s.into_bytes());
    let data = [
        ("tls.crt".to_string(), b(cert.pem())),
        ("tls.key".to_string(), b(key.serialize_pem())),
        ("ca.crt".to_string(), b(ca_cert.pem())),
    ]
    .into();
    (cert.der().to_vec(), data)
}

/// Deletes the coordinator's pods and waits for the replacement to be ready.
async fn restart_coordinator(c: &Cluster) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    for p in pods
        .list(&ListParams::default().labels(COORDINATOR_LABEL))
        .await?
        .items
    {
        pods.delete(
            &p.metadata.name.unwrap_or_default(),
            &DeleteParams::default().grace_period(0),
        )
        .await?;
    }
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "deploy/berth-coordinator",
        "--timeout=120s",
    ])?;
    Ok(())
}

/// Replaces the TLS Secret's data with `data`.
async fn put_secret(
    c: &Cluster,
    data: std::collections::BTreeMap<String, ByteString>,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), NAMESPACE);
    let _ = secrets.delete(TLS_SECRET, &DeleteParams::default()).await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(TLS_SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    eventually(Duration::from_secs(30), "the Secret recreated", || async {
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(Some(())),
            // The delete may not have finished.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// Waits until the coordinator behind a fresh port-forward serves `leaf`,
/// and `berth-ca` holds `ca_pem`.
async fn wait_serving(c: &Cluster, leaf: &[u8], ca_pem: &str, what: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(90), what, || async {
        let pf = c.port_forward("berth-coordinator", 7070)?;
        let served = served_leaf(&pf.addr(), ca_pem).await?;
        let published = c.ca_pem().await?;
        Ok((served == leaf && published == ca_pem).then_some(()))
    })
    .await
}

#[tokio::test]
async fn a_user_provided_certificate_in_the_secret_is_served_at_once_and_after_a_restart() {
    let c = Cluster::from_env().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), NAMESPACE);
    let original = secrets.get(TLS_SECRET).await.unwrap().data.unwrap();
    let (leaf, data) = user_certificate();
    let user_ca = String::from_utf8(data["ca.crt"].0.clone()).unwrap();

    let outcome = async {
        put_secret(&c, data).await?;
        // Reloaded by the running coordinator (its watch on the Secret)…
        wait_serving(&c, &leaf, &user_ca, "the user's certificate, live").await?;
        // …and chosen over generating one when the coordinator starts.
        restart_coordinator(&c).await?;
        wait_serving(
            &c,
            &leaf,
            &user_ca,
            "the user's certificate after a restart",
        )
        .await?;
        // The agents follow the new CA (the kubelet refreshes berth-ca).
        wait_all_connected(&c, Duration::from_secs(180)).await
    }
    .await;

    // Put the cluster back as it was, whatever happened above.
    let original_ca = String::from_utf8(original["ca.crt"].0.clone()).unwrap();
    let original_leaf = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&original["tls.crt"].0)
            .unwrap()
            .to_vec()
    };
    put_secret(&c, original).await.unwrap();
    wait_serving(
        &c,
        &original_leaf,
        &original_ca,
        "the original certificate back",
    )
    .await
    .unwrap();
    wait_all_connected(&c, Duration::from_secs(180))
        .await
        .unwrap();
    outcome.unwrap();
}

/// The `Degraded` condition of ImageCache `ns/name`, as (status, reason, message).
async fn degraded(c: &Cluster, ns: &str, name: &str) -> anyhow::Result<(String, String, String)> {
    let api: Api<ImageCache> = Api::namespaced(c.client.clone(), ns);
    let cond = api
        .get(name)
        .await?
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"))
        .ok_or_else(|| anyhow::anyhow!("no Degraded condition yet"))?;
    Ok((cond.status, cond.reason, cond.message))
}

#[tokio::test]
async fn a_pull_secret_is_read_only_where_a_rolebinding_allows_it_and_the_cache_says_which() {
    let c = Cluster::from_env().await.unwrap();
    let private = c.fresh_private_image("forbidden").await.unwrap();
    let node = &c.nodes[0];
    let ns = format!("sec-secret-{}", berth_e2e::registry::unique_suffix());
    c.kubectl(&["create", "namespace", &ns]).unwrap();
    c.kubectl(&[
        "-n",
        &ns,
        "create",
        "secret",
        "docker-registry",
        "regcred",
        "--docker-server",
        c.auth_registry(),
        "--docker-username",
        c.var("BERTH_AUTH_USER"),
        "--docker-password",
        c.var("BERTH_AUTH_PASSWORD"),
    ])
    .unwrap();
    c.apply(&format!(
        r#"
apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {{name: private, namespace: {ns}}}
spec:
  images: [{{ref: "{private}"}}]
  nodeNames: [{node}]
  imagePullSecrets: [{{name: regcred}}]
"#
    ))
    .unwrap();

    // No RoleBinding yet: the coordinator may not read the Secret, and says
    // so with the command that fixes it.
    let command = format!(
        "kubectl -n {ns} create rolebinding berth-pull-secret-reader --clusterrole=berth-pull-secret-reader --serviceaccount={NAMESPACE}:berth-coordinator"
    );
    let (_, _, message) = eventually(
        Duration::from_secs(60),
        "Degraded with reason PullSecretForbidden",
        || async {
            let d = degraded(&c, &ns, "private").await?;
            Ok((d.0 == "True" && d.1 == "PullSecretForbidden").then_some(d))
        },
    )
    .await
    .unwrap();
    assert!(message.contains(&format!("{ns}/regcred")), "{message}");
    assert!(message.contains(&command), "{message}");
    assert!(!c.cri_has_image(node, &private).await.unwrap());

    // The namespace's owner allows it, exactly as the message says.
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    c.kubectl(&args).unwrap();
    // A failed pull is retried with backoff (at most 60 s apart).
    let api: Api<ImageCache> = Api::namespaced(c.client.clone(), &ns);
    eventually(
        Duration::from_secs(180),
        "the private image cached",
        || async {
            let phase = api.get("private").await?.status.map(|s| s.phase);
            Ok((phase.as_deref() == Some("Ready")).then_some(()))
        },
    )
    .await
    .unwrap();
    assert!(c.cri_has_image(node, &private).await.unwrap());
    let (status, reason, _) = degraded(&c, &ns, "private").await.unwrap();
    assert_eq!(status, "False", "{reason}");
    assert_ne!(reason, "PullSecretForbidden");

    api.delete("private", &DeleteParams::default())
        .await
        .unwrap();
    let _ = c.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}
