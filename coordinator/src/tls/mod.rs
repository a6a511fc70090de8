//! TLS on the coordinator's gRPC port.
//!
//! Data flow: [`store::bootstrap`] finds the serving certificate (the Secret
//! `berth-coordinator-tls`: a user's, e.g. from cert-manager, or one
//! [`certs::generate`]d and stored on first start) and publishes its CA bundle
//! in the ConfigMap `berth-ca` that the agents mount. The [`Material`] becomes
//! a rustls `ServerConfig` inside a [`TlsAcceptor`], which is the
//! [`crate::listener::Handshake`] of the main port: every connection the
//! accept loop admits goes through [`TlsAcceptor::accept`] (within the
//! handshake timeout, ALPN `h2`) before gRPC sees it, so plaintext is
//! refused. [`store::watch`] swaps the config when the Secret
//! changes: new connections get the new certificate, open ones keep theirs.

pub mod certs;
pub mod store;

use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Name of the Secret holding the serving certificate (type kubernetes.io/tls).
pub const SECRET: &str = "berth-coordinator-tls";
/// Name of the ConfigMap holding the CA bundle agents verify against.
pub const CA_CONFIGMAP: &str = "berth-ca";
/// Key of the CA bundle in [`CA_CONFIGMAP`] (and of the CA in [`SECRET`]).
pub const CA_KEY: &str = "ca.crt";
/// Key of the certificate chain in [`SECRET`].
pub const CERT_KEY: &str = "tls.crt";
/// Key of the private key in [`SECRET`].
pub const KEY_KEY: &str = "tls.key";

/// Why a certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The Secret lacks a key.
    #[error("Secret {secret} has no {key}: a kubernetes.io/tls Secret needs tls.crt and tls.key")]
    MissingKey {
        /// `namespace/name` of the Secret.
        secret: String,
        /// The missing key.
        key: &'static str,
    },
    /// A PEM block does not parse.
    #[error("{what} is not valid PEM: {source}")]
    Pem {
        /// Which part.
        what: &'static str,
        /// The parser's complaint.
        source: rustls::pki_types::pem::Error,
    },
    /// The PEM holds no certificate.
    #[error("tls.crt holds no certificate")]
    NoCertificate,
    /// rustls refuses the certificate and key (e.g. they do not match).
    #[error("certificate and key unusable: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The apiserver could not be asked or refused a write.
    #[error("{action}: {source}")]
    Api {
        /// What was tried, on which object.
        action: String,
        /// The client's error.
        source: kube::Error,
    },
}

/// A serving certificate: PEM chain, PEM key, and the CA bundle clients trust.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The certificate chain, leaf first (`tls.crt`).
    pub cert_pem: String,
    /// The private key (`tls.key`).
    pub key_pem: String,
    /// What clients should trust (`ca.crt`).
    pub ca_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

impl Material {
    /// A rustls server config for this certificate, speaking HTTP/2 only
    /// (gRPC clients such as grpc-go insist on ALPN `h2`).
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                what: "tls.crt",
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|source| {
            TlsError::Pem {
                what: "tls.key",
                source,
            }
        })?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The DER of the leaf certificate (first in the chain).
    pub fn leaf_der(&self) -> Result<Vec<u8>, TlsError> {
        let leaf = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .next()
            .ok_or(TlsError::NoCertificate)?
            .map_err(|source| TlsError::Pem {
                what: "tls.crt",
                source,
            })?;
        Ok(leaf.to_vec())
    }
}

/// Turns accepted TCP connections into TLS streams with the current
/// certificate; [`TlsAcceptor::replace`] swaps it for connections to come.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsAcceptor {
    /// An acceptor serving `config`.
    pub fn new(config: ServerConfig) -> Self {
        TlsAcceptor {
            config: Arc::new(RwLock::new(Arc::new(config))),
        }
    }

    /// An acceptor serving `material`'s certificate.
    pub fn from_material(material: &Material) -> Result<Self, TlsError> {
        Ok(Self::new(material.server_config()?))
    }

    /// Serves `config` to every connection accepted from now on.
    pub fn replace(&self, config: ServerConfig) {
        *self.config.write().unwrap() = Arc::new(config);
    }

    /// The TLS handshake on one accepted connection; a client speaking
    /// plaintext fails here and never reaches gRPC.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let config = self.config.read().unwrap().clone();
        tokio_rustls::TlsAcceptor::from(config).accept(stream).await
    }
}

impl crate::listener::Handshake<TcpStream> for TlsAcceptor {
    type Io = TlsStream<TcpStream>;

    async fn handshake(&self, conn: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.accept(conn).await
    }
}

#[cfg(test)]
mod tests;
