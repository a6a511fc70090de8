//! Where the serving certificate lives in Kubernetes.
//!
//! [`bootstrap`]: the Secret [`SECRET`] in the coordinator's namespace wins if
//! it exists (a user's certificate, e.g. cert-manager's); otherwise a new one
//! is generated and created — create-if-absent, so when two replicas race,
//! the loser reads and uses the winner's. The CA bundle then goes to the
//! ConfigMap [`CA_CONFIGMAP`]. [`watch`] follows the Secret and swaps the
//! served certificate (and the published bundle) whenever it changes.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};

use super::{
    CA_CONFIGMAP, CA_KEY, CERT_KEY, KEY_KEY, Material, SECRET, TlsAcceptor, TlsError, certs,
};

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> TlsError {
    let action = action.into();
    move |source| TlsError::Api { action, source }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The certificate in a kubernetes.io/tls Secret. Without `ca.crt` the
/// chain itself is published as the bundle (its last certificate should
/// then be the issuing CA).
pub fn from_secret(secret: &Secret, namespace: &str) -> Result<Material, TlsError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &'static str| -> Result<String, TlsError> {
        data.get(key)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| TlsError::MissingKey {
                secret: format!("{namespace}/{SECRET}"),
                key,
            })
    };
    let cert_pem = text(CERT_KEY)?;
    let key_pem = text(KEY_KEY)?;
    let ca_pem = text(CA_KEY).unwrap_or_else(|_| cert_pem.clone());
    Ok(Material {
        cert_pem,
        key_pem,
        ca_pem,
    })
}

/// A kubernetes.io/tls Secret holding `m`.
pub fn to_secret(m: &Material, namespace: &str) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "berth".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_string(), bytes(&m.cert_pem)),
            (KEY_KEY.to_string(), bytes(&m.key_pem)),
            (CA_KEY.to_string(), bytes(&m.ca_pem)),
        ])),
        ..Default::default()
    }
}

/// The serving certificate: the Secret's if it exists, else a generated one
/// stored there; its CA bundle is published before this returns.
pub async fn bootstrap(client: &kube::Client, namespace: &str) -> Result<Material, TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |what: &str| format!("{what} Secret {namespace}/{SECRET}");
    let material = match secrets
        .get_opt(SECRET)
        .await
        .map_err(api_err(read("reading")))?
    {
        Some(s) => {
            info!(secret = SECRET, "serving the certificate from the Secret");
            from_secret(&s, namespace)?
        }
        None => {
            let generated = certs::generate(namespace)?;
            match secrets
                .create(&PostParams::default(), &to_secret(&generated, namespace))
                .await
            {
                Ok(_) => {
                    info!(secret = SECRET, "generated a CA and a serving certificate");
                    generated
                }
                Err(e) if is_conflict(&e) => {
                    info!(
                        secret = SECRET,
                        "another replica created the certificate first"
                    );
                    let s = secrets
                        .get(SECRET)
                        .await
                        .map_err(api_err(read("reading")))?;
                    from_secret(&s, namespace)?
                }
                Err(e) => return Err(api_err(read("creating"))(e)),
            }
        }
    };
    // Refuse a broken certificate at start rather than at the first client.
    material.server_config()?;
    publish_ca(client, namespace, &material.ca_pem).await?;
    Ok(material)
}

/// Makes the ConfigMap [`CA_CONFIGMAP`] hold `ca_pem` under `ca.crt`.
pub async fn publish_ca(
    client: &kube::Client,
    namespace: &str,
    ca_pem: &str,
) -> Result<(), TlsError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let action = |what: &str| format!("{what} ConfigMap {namespace}/{CA_CONFIGMAP}");
    // Two tries: a conflict means another replica wrote in between.
    for _ in 0..2 {
        let current = maps
            .get_opt(CA_CONFIGMAP)
            .await
            .map_err(api_err(action("reading")))?;
        let result = match current {
            Some(cm) => {
                let data = cm.data.clone().unwrap_or_default();
                if data.get(CA_KEY).map(String::as_str) == Some(ca_pem) {
                    return Ok(());
                }
                let mut cm = cm;
                cm.data
                    .get_or_insert_default()
                    .insert(CA_KEY.into(), ca_pem.into());
                maps.replace(CA_CONFIGMAP, &PostParams::default(), &cm)
                    .await
                    .map(|_| ())
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(CA_CONFIGMAP.into()),
                        namespace: Some(namespace.into()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/part-of".to_string(),
                            "berth".to_string(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(CA_KEY.into(), ca_pem.into())])),
                    ..Default::default()
                };
                maps.create(&PostParams::default(), &cm).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                info!(configmap = CA_CONFIGMAP, "published the CA bundle");
                return Ok(());
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_err(action("writing"))(e)),
        }
    }
    Err(TlsError::Api {
        action: action("writing"),
        source: kube::Error::Api(Box::new(kube::core::Status::failure(
            "conflict twice in a row",
            "Conflict",
        ))),
    })
}

/// Serves `next` from now on if it differs from `current`; `Ok(true)` if it
/// was swapped in. A certificate rustls refuses leaves the old one serving.
pub fn reload(
    acceptor: &TlsAcceptor,
    current: &mut Material,
    next: Material,
) -> Result<bool, TlsError> {
    if *current == next {
        return Ok(false);
    }
    acceptor.replace(next.server_config()?);
    *current = next;
    Ok(true)
}

/// Follows the Secret until the process ends: each change is served to new
/// connections and its CA bundle published. A deleted Secret keeps the
/// current certificate serving (a restart then makes a new one).
pub async fn watch(
    client: kube::Client,
    namespace: String,
    acceptor: TlsAcceptor,
    mut current: Material,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={SECRET}"));
    let mut events = watcher(secrets, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, secret = SECRET, "watching the certificate Secret");
                continue;
            }
        };
        let swapped =
            from_secret(&secret, &namespace).and_then(|next| reload(&acceptor, &mut current, next));
        match swapped {
            Ok(false) => {}
            Ok(true) => {
                info!(secret = SECRET, "serving the renewed certificate");
                if let Err(e) = publish_ca(&client, &namespace, &current.ca_pem).await {
                    warn!(error = %e, "the new CA bundle is not published");
                }
            }
            Err(e) => warn!(error = %e, secret = SECRET, "keeping the old certificate"),
        }
    }
}
