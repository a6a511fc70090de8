//! TLS handshakes over loopback against generated certificates.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::store::{from_secret, reload, to_secret};
use super::*;

/// Serves one handshake with `acceptor`; a client trusting `ca_pem` connects
/// as `name`. Returns the client's view: the leaf certificate it was shown.
async fn handshake(acceptor: &TlsAcceptor, ca_pem: &str, name: &str) -> std::io::Result<Vec<u8>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(|_| ())
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    let result = connector.connect(name, tcp).await;
    let _ = server.await;
    let tls = result?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test]
async fn a_generated_certificate_verifies_for_every_name_of_the_service() {
    let m = certs::generate("berth-system").unwrap();
    let acceptor = TlsAcceptor::from_material(&m).unwrap();
    for name in certs::subject_alt_names("berth-system") {
        let leaf = handshake(&acceptor, &m.ca_pem, &name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(leaf, m.leaf_der().unwrap());
    }
    assert_eq!(
        certs::server_name("berth-system"),
        "berth-coordinator.berth-system.svc"
    );
}

#[tokio::test]
async fn a_client_refuses_a_name_the_certificate_does_not_carry() {
    let m = certs::generate("berth-system").unwrap();
    let acceptor = TlsAcceptor::from_material(&m).unwrap();
    let e = handshake(&acceptor, &m.ca_pem, "berth-coordinator.other.svc")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_certificate() {
    let served = certs::generate("berth-system").unwrap();
    let other = certs::generate("berth-system").unwrap();
    let acceptor = TlsAcceptor::from_material(&served).unwrap();
    let e = handshake(
        &acceptor,
        &other.ca_pem,
        "berth-coordinator.berth-system.svc",
    )
    .await
    .unwrap_err();
    // Both CAs carry the same name: rustls finds the issuer and refuses
    // its signature, as it would after the Secret was regenerated.
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
}

#[tokio::test]
async fn plaintext_http2_is_refused_at_the_handshake() {
    let m = certs::generate("ns").unwrap();
    let acceptor = TlsAcceptor::from_material(&m).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let _ = tcp
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await;
        tcp
    });
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(acceptor.accept(tcp).await.is_err());
    drop(client.await);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections_and_an_equal_one_changes_nothing() {
    let first = certs::generate("ns").unwrap();
    let acceptor = TlsAcceptor::from_material(&first).unwrap();
    let mut current = first.clone();
    assert!(!reload(&acceptor, &mut current, first.clone()).unwrap());

    let renewed = certs::generate("ns").unwrap();
    assert!(reload(&acceptor, &mut current, renewed.clone()).unwrap());
    assert_eq!(current, renewed);
    let leaf = handshake(&acceptor, &renewed.ca_pem, "localhost")
        .await
        .unwrap();
    assert_eq!(leaf, renewed.leaf_der().unwrap());
    assert!(
        handshake(&acceptor, &first.ca_pem, "localhost")
            .await
            .is_err(),
        "the old CA no longer verifies: the old certificate is gone"
    );
}

#[tokio::test]
async fn a_certificate_whose_key_does_not_match_is_refused_and_the_old_one_keeps_serving() {
    let good = certs::generate("ns").unwrap();
    let other = certs::generate("ns").unwrap();
    let acceptor = TlsAcceptor::from_material(&good).unwrap();
    let mut current = good.clone();
    let broken = Material {
        cert_pem: other.cert_pem,
        ..good.clone()
    };
    assert!(reload(&acceptor, &mut current, broken).is_err());
    assert_eq!(current, good);
    let leaf = handshake(&acceptor, &good.ca_pem, "localhost")
        .await
        .unwrap();
    assert_eq!(leaf, good.leaf_der().unwrap());
}

#[test]
fn a_secret_round_trips_and_one_without_a_key_is_refused_by_name() {
    let m = certs::generate("ns").unwrap();
    let secret = to_secret(&m, "ns");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(from_secret(&secret, "ns").unwrap(), m);

    let mut no_ca = secret.clone();
    no_ca.data.as_mut().unwrap().remove(CA_KEY);
    assert_eq!(from_secret(&no_ca, "ns").unwrap().ca_pem, m.cert_pem);

    let mut no_key = secret;
    no_key.data.as_mut().unwrap().remove(KEY_KEY);
    let e = from_secret(&no_key, "ns").unwrap_err().to_string();
    assert!(
        e.contains("ns/berth-coordinator-tls") && e.contains("tls.key"),
        "{e}"
    );
}
