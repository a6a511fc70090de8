//! A CA and a serving certificate for the coordinator, made on first start
//! when nobody provided one. The CA's key is thrown away once the serving
//! certificate is signed: nothing else is ever issued under it.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{Material, TlsError};

/// The Service's name, the first part of every DNS name in the certificate.
pub const SERVICE: &str = "berth-coordinator";

/// The names the coordinator is reached by: the Service by every DNS form in
/// `namespace`, and localhost (port-forwards, probes from inside the pod).
pub fn subject_alt_names(namespace: &str) -> Vec<String> {
    vec![
        SERVICE.to_string(),
        format!("{SERVICE}.{namespace}"),
        format!("{SERVICE}.{namespace}.svc"),
        format!("{SERVICE}.{namespace}.svc.cluster.local"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ]
}

/// The name agents and clients verify: `berth-coordinator.<namespace>.svc`.
pub fn server_name(namespace: &str) -> String {
    format!("{SERVICE}.{namespace}.svc")
}

/// A fresh CA (`berth CA <namespace>`) and a serving certificate it signed,
/// valid for [`subject_alt_names`].
pub fn generate(namespace: &str) -> Result<Material, TlsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, format!("berth CA {namespace}"));
    ca.distinguished_name
        .push(DnType::OrganizationName, "berth".to_string());
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(subject_alt_names(namespace))?;
    leaf.distinguished_name
        .push(DnType::CommonName, server_name(namespace));
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(Material {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: ca_cert.pem(),
    })
}
