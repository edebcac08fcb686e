//! The cluster's public-key infrastructure: one CA per cluster, made by
//! `stretch init`, and one certificate per node signed by it. A peer is a
//! cluster member exactly when its certificate chains to this CA.
//!
//! Layout of the PKI directory:
//!
//! ```text
//! ca.pem          the CA certificate (give it to every node)
//! ca.key          the CA private key (needed only to add nodes)
//! NODE.pem        a node's certificate, its name as subject alternative name
//! NODE.key        that node's private key
//! ```
//!
//! Private keys are written with mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid PEM {what}")]
    BadPem { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid node name {0:?}: use letters, digits, '-' and '.'")]
    BadName(String),
    #[error("no cluster CA in {0} (run `stretch init` first)")]
    NoCa(PathBuf),
}

/// What `stretch init` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub ca_created: bool,
    pub nodes_created: Vec<String>,
    pub nodes_kept: Vec<String>,
}

/// Creates the cluster CA in `dir` if there is none, and a certificate for
/// every listed node that has none. Existing files are never overwritten,
/// so running it again only adds what is missing.
pub fn init(dir: &Path, cluster: &str, nodes: &[&str]) -> Result<InitReport, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut report = InitReport::default();
    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = dir.join("ca.pem");
    if !ca_key_path.exists() {
        let key = KeyPair::generate()?;
        let certificate = ca_params(cluster)?.self_signed(&key)?;
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
        write_file(&ca_cert_path, certificate.pem().as_bytes(), false)?;
        report.ca_created = true;
    }
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| PkiError::BadPem {
        path: ca_key_path.clone(),
        what: "private key",
    })?;
    // The issuer is rebuilt from the same parameters and key: the subject
    // and key identifier, which is all a signature needs from it, match.
    let issuer = Issuer::new(ca_params(cluster)?, ca_key);
    for node in nodes {
        validate_node_name(node)?;
        let cert_path = dir.join(format!("{node}.pem"));
        if cert_path.exists() {
            report.nodes_kept.push(node.to_string());
            continue;
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, *node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let certificate = params.signed_by(&key, &issuer)?;
        write_file(
            &dir.join(format!("{node}.key")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(&cert_path, certificate.pem().as_bytes(), false)?;
        report.nodes_created.push(node.to_string());
    }
    Ok(report)
}

/// One node's identity and the cluster CA, loaded from the PKI directory.
#[derive(Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub ca: CertificateDer<'static>,
    pub certificate: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    pub fn load(dir: &Path, node: &str) -> Result<Self, PkiError> {
        let ca_path = dir.join("ca.pem");
        if !ca_path.exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}.key"));
        Ok(NodeIdentity {
            name: node.to_string(),
            ca: load_certificate(&ca_path)?,
            certificate: load_certificate(&cert_path)?,
            key: PrivateKeyDer::from_pem_slice(read_text(&key_path)?.as_bytes()).map_err(|_| {
                PkiError::BadPem {
                    path: key_path,
                    what: "private key",
                }
            })?,
        })
    }
}

fn ca_params(cluster: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("stretch cluster CA {cluster}"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.']);
    if valid {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

fn load_certificate(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(read_text(path)?.as_bytes()).map_err(|_| PkiError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
    })
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a new file (never replacing one), synced before returning.
fn write_file(path: &Path, content: &[u8], private: bool) -> Result<(), PkiError> {
    let error = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(error)?;
    file.write_all(content).map_err(error)?;
    file.sync_all().map_err(error)
}
