//! Berth's image references and registry errors in `oci-client`'s terms,
//! shared by the coordinator (tag tracking, the backup gate) and the agent
//! (registry-to-registry copies). `oci-client` is only a transport: its
//! reference is built from Berth's parsed one, never by parsing the string
//! again.

use crate::reference::Reference;

/// `reference` as `oci-client` names it: by digest when it has one (the tag
/// is then only a label), else by tag (`latest` when it names none).
pub fn oci_reference(reference: &Reference) -> oci_client::Reference {
    let (registry, repository) = (reference.domain.clone(), reference.path.clone());
    match (&reference.digest, &reference.tag) {
        (Some(digest), _) => {
            oci_client::Reference::with_digest(registry, repository, digest.clone())
        }
        (None, tag) => oci_client::Reference::with_tag(
            registry,
            repository,
            tag.clone().unwrap_or_else(|| "latest".into()),
        ),
    }
}

/// Whether the registry refused the credentials (or their absence).
pub fn refused(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => true,
        E::ServerError { code, .. } => *code == 401 || *code == 403,
        // A HEAD has no body to carry an error envelope: only its status.
        E::RequestError(e) => e
            .status()
            .is_some_and(|s| s.as_u16() == 401 || s.as_u16() == 403),
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, C::Unauthorized | C::Denied)),
        _ => false,
    }
}

/// Whether the registry said the manifest or blob does not exist.
pub fn not_found(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
    match e {
        E::ImageManifestNotFoundError(_) => true,
        E::ServerError { code, .. } => *code == 404,
        E::RequestError(e) => e.status().is_some_and(|s| s.as_u16() == 404),
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, C::ManifestUnknown | C::BlobUnknown | C::NameUnknown)),
        _ => false,
    }
}

/// A client speaking plain HTTP to `plain_http` (`host:port`) and HTTPS to
/// every other registry; pushes send each blob in one request.
pub fn client(plain_http: &[String]) -> oci_client::Client {
    oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(plain_http.to_vec()),
        use_monolithic_push: true,
        ..Default::default()
    })
}
