//! The cluster's public-key infrastructure: one CA per cluster, made by
//! `stretch init`, and one certificate per node signed by it. A peer is a
//! cluster member exactly when its certificate chains to this CA, and it is
//! the node its certificate names: the single DNS subject alternative name
//! (see [`CertificateInfo`]).
//!
//! Layout of the PKI directory `stretch init` makes (the operator's):
//!
//! ```text
//! ca.pem          the CA certificate (give it to every node)
//! ca.key          the CA private key (needed only to add or renew nodes)
//! NODE.pem        a node's certificate, its name as subject alternative name
//! NODE.key        that node's private key
//! ```
//!
//! A node needs only `ca.pem`, `NODE.pem` and `NODE.key`: [`export`] copies
//! exactly those into a node's own directory, so the CA key can stay on the
//! operator's machine. Certificates have a finite lifetime ([`Lifetimes`]);
//! [`renew`] re-issues node certificates with the existing CA key.
//!
//! Private keys are written with mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

/// Default lifetime of the cluster CA: ten years, renewed by making a new
/// cluster CA (a planned event, not a routine one).
pub const CA_DAYS_DEFAULT: u32 = 3650;
/// Default lifetime of a node certificate: one year, renewed with
/// `stretch cert renew` well before it ends.
pub const NODE_DAYS_DEFAULT: u32 = 365;
/// A certificate starts this long before it is made, so a peer whose clock
/// is a little behind does not refuse it as not yet valid.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Longest lifetime accepted, to keep dates inside what X.509 encodes.
const DAYS_MAX: u32 = 36_500;

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
    #[error(
        "no CA key in {0}: adding or renewing certificates needs the directory `stretch init` made"
    )]
    NoCaKey(PathBuf),
    #[error("no certificate for node {node:?} in {dir}")]
    NoNode { node: String, dir: PathBuf },
    #[error("{path}: {source}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("{path} names node {named:?}, not {node:?}")]
    WrongNode {
        path: PathBuf,
        node: String,
        named: String,
    },
    #[error("a certificate lifetime of {0} days: give 1 to {DAYS_MAX}")]
    BadLifetime(u32),
    #[error("{0} holds the CA key: export a node's certificate to a directory of its own")]
    ExportIntoCa(PathBuf),
}

/// Why a certificate does not identify a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("unreadable certificate: {0}")]
    Unreadable(String),
    #[error("the certificate names no node (no DNS subject alternative name)")]
    NoName,
    #[error("the certificate names several nodes ({0:?}); a node certificate names one")]
    SeveralNames(Vec<String>),
    #[error("the certificate names {0:?}, which is not a node name")]
    BadName(String),
}

/// What a node certificate says: the node it names and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The node: the certificate's only DNS subject alternative name. This
    /// is the name TLS checks when a node dials a peer, so the accepting
    /// side reads the same field.
    pub node: String,
    pub not_after: SystemTime,
}

impl CertificateInfo {
    /// Reads a DER certificate. Only CA-signed certificates reach this on a
    /// connection, but it is parsed as untrusted bytes all the same.
    pub fn parse(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| IdentityError::Unreadable(error.to_string()))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|error| IdentityError::Unreadable(error.to_string()))?
            .map(|extension| {
                extension
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::DNSName(name) => {
                            Some(name.to_string())
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        // One name only: a certificate naming two nodes would pass TLS's
        // name check as either of them.
        let node = match names.as_slice() {
            [] => return Err(IdentityError::NoName),
            [node] => node.clone(),
            _ => return Err(IdentityError::SeveralNames(names)),
        };
        if validate_node_name(&node).is_err() {
            return Err(IdentityError::BadName(node));
        }
        let not_after = unix_time(certificate.validity().not_after.timestamp());
        Ok(CertificateInfo { node, not_after })
    }

    /// Time left before the certificate ends, negative once it has ended,
    /// in seconds.
    pub fn seconds_left(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        }
    }
}

fn unix_time(seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// How long new certificates last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca_days: u32,
    pub node_days: u32,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            ca_days: CA_DAYS_DEFAULT,
            node_days: NODE_DAYS_DEFAULT,
        }
    }
}

/// What `stretch init` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub ca_created: bool,
    pub nodes_created: Vec<String>,
    pub nodes_kept: Vec<String>,
}

/// Creates the cluster CA in `dir` if there is none, and a certificate for
/// every listed node that has none, with the default [`Lifetimes`].
pub fn init(dir: &Path, cluster: &str, nodes: &[&str]) -> Result<InitReport, PkiError> {
    init_with(dir, cluster, nodes, Lifetimes::default())
}

/// Creates the cluster CA in `dir` if there is none, and a certificate for
/// every listed node that has none. Existing files are never overwritten,
/// so running it again only adds what is missing.
pub fn init_with(
    dir: &Path,
    cluster: &str,
    nodes: &[&str],
    lifetimes: Lifetimes,
) -> Result<InitReport, PkiError> {
    check_days(lifetimes.ca_days)?;
    check_days(lifetimes.node_days)?;
    for node in nodes {
        validate_node_name(node)?;
    }
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut report = InitReport::default();
    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = dir.join("ca.pem");
    let missing: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|node| !dir.join(format!("{node}.pem")).exists())
        .collect();
    if !ca_key_path.exists() {
        if ca_cert_path.exists() {
            // A node's directory (see `export`): it has what it needs and
            // nothing can be added here.
            if missing.is_empty() {
                report.nodes_kept = nodes.iter().map(|node| node.to_string()).collect();
                return Ok(report);
            }
            return Err(PkiError::NoCaKey(dir.to_path_buf()));
        }
        let key = KeyPair::generate()?;
        let certificate = ca_params(cluster, lifetimes.ca_days)?.self_signed(&key)?;
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
        write_file(&ca_cert_path, certificate.pem().as_bytes(), false)?;
        report.ca_created = true;
    }
    let authority = Authority::load(dir)?;
    for node in nodes {
        if !missing.contains(node) {
            report.nodes_kept.push(node.to_string());
            continue;
        }
        let key = KeyPair::generate()?;
        let certificate = authority.issue(node, &key, lifetimes.node_days)?;
        write_file(
            &dir.join(format!("{node}.key")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(
            &dir.join(format!("{node}.pem")),
            certificate.as_bytes(),
            false,
        )?;
        report.nodes_created.push(node.to_string());
    }
    Ok(report)
}

/// One node certificate [`renew`] replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub node: String,
    pub not_after: SystemTime,
}

/// Re-issues the certificates of `nodes` (every node certificate in `dir`
/// when empty) for `days` from now, signed by the CA key in `dir`. Each
/// node keeps its key, so only `NODE.pem` changes; it is replaced whole
/// (written aside, then renamed), and a node picks it up when it restarts.
pub fn renew(dir: &Path, nodes: &[&str], days: u32) -> Result<Vec<Renewed>, PkiError> {
    check_days(days)?;
    if !dir.join("ca.pem").exists() {
        return Err(PkiError::NoCa(dir.to_path_buf()));
    }
    let authority = Authority::load(dir)?;
    let nodes: Vec<String> = if nodes.is_empty() {
        node_certificates(dir)?
    } else {
        nodes.iter().map(|node| node.to_string()).collect()
    };
    let mut renewed = Vec::new();
    for node in &nodes {
        validate_node_name(node)?;
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}.key"));
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::NoNode {
                node: node.clone(),
                dir: dir.to_path_buf(),
            });
        }
        let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|_| PkiError::BadPem {
            path: key_path.clone(),
            what: "private key",
        })?;
        let pem = authority.issue(node, &key, days)?;
        replace_file(&cert_path, pem.as_bytes(), false)?;
        let info = certificate_info(&cert_path, &load_certificate(&cert_path)?)?;
        renewed.push(Renewed {
            node: node.clone(),
            not_after: info.not_after,
        });
    }
    Ok(renewed)
}

/// Copies what node `node` needs to run (`ca.pem`, `NODE.pem`, `NODE.key`)
/// from the PKI directory `dir` into `out`, and nothing else: the CA key
/// stays behind. Files already in `out` are replaced, so exporting again
/// after [`renew`] brings the new certificate.
pub fn export(dir: &Path, node: &str, out: &Path) -> Result<(), PkiError> {
    validate_node_name(node)?;
    let ca = dir.join("ca.pem");
    if !ca.exists() {
        return Err(PkiError::NoCa(dir.to_path_buf()));
    }
    let files = [
        ("ca.pem".to_string(), false),
        (format!("{node}.pem"), false),
        (format!("{node}.key"), true),
    ];
    for (name, _) in &files[1..] {
        if !dir.join(name).exists() {
            return Err(PkiError::NoNode {
                node: node.to_string(),
                dir: dir.to_path_buf(),
            });
        }
    }
    if out.join("ca.key").exists() {
        return Err(PkiError::ExportIntoCa(out.to_path_buf()));
    }
    let io_error = |source| PkiError::Io {
        path: out.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(io_error)?;
    for (name, private) in &files {
        let source = dir.join(name);
        let content = fs::read(&source).map_err(|error| PkiError::Io {
            path: source.clone(),
            source: error,
        })?;
        replace_file(&out.join(name), &content, *private)?;
    }
    Ok(())
}

/// The CA of a PKI directory, able to sign node certificates.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl Authority {
    fn load(dir: &Path) -> Result<Self, PkiError> {
        let key_path = dir.join("ca.key");
        if !key_path.exists() {
            return Err(PkiError::NoCaKey(dir.to_path_buf()));
        }
        let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|_| PkiError::BadPem {
            path: key_path,
            what: "private key",
        })?;
        let cert_path = dir.join("ca.pem");
        let certificate = load_certificate(&cert_path)?;
        // The issuer is read from the CA certificate itself, so what a node
        // certificate names as its issuer is byte for byte the CA's subject.
        let issuer = Issuer::from_ca_cert_der(&certificate, key)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&certificate).map_err(|error| {
            PkiError::Certificate {
                path: cert_path.clone(),
                source: IdentityError::Unreadable(error.to_string()),
            }
        })?;
        let not_after = unix_time(parsed.validity().not_after.timestamp());
        Ok(Authority { issuer, not_after })
    }

    /// A certificate for `node` with `key`, for `days` from now but never
    /// past the CA's own end (a chain is valid only while all of it is).
    fn issue(&self, node: &str, key: &KeyPair, days: u32) -> Result<String, PkiError> {
        let mut params = CertificateParams::new(vec![node.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        let wanted = now + Duration::from_secs(u64::from(days) * 86_400);
        params.not_before = offset_date_time(now - CLOCK_SKEW);
        params.not_after = offset_date_time(wanted.min(self.not_after));
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }
}

fn offset_date_time(at: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(at)
}

fn check_days(days: u32) -> Result<(), PkiError> {
    if days == 0 || days > DAYS_MAX {
        return Err(PkiError::BadLifetime(days));
    }
    Ok(())
}

/// Names of the nodes with a certificate and key in `dir`.
fn node_certificates(dir: &Path) -> Result<Vec<String>, PkiError> {
    let io_error = |source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut nodes = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error)? {
        let name = entry.map_err(io_error)?.file_name();
        let Some(node) = name.to_str().and_then(|name| name.strip_suffix(".pem")) else {
            continue;
        };
        if node != "ca" && dir.join(format!("{node}.key")).exists() {
            nodes.push(node.to_string());
        }
    }
    nodes.sort();
    Ok(nodes)
}

/// One node's identity and the cluster CA, loaded from the PKI directory.
#[derive(Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub ca: CertificateDer<'static>,
    pub certificate: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// When the node's certificate ends.
    pub not_after: SystemTime,
}

impl NodeIdentity {
    /// Loads `ca.pem`, `NODE.pem` and `NODE.key`; the CA key is not needed.
    /// The certificate must name `node`: a node never presents another
    /// node's certificate (its peers would refuse it).
    pub fn load(dir: &Path, node: &str) -> Result<Self, PkiError> {
        let ca_path = dir.join("ca.pem");
        if !ca_path.exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}.key"));
        let certificate = load_certificate(&cert_path)?;
        let info = certificate_info(&cert_path, &certificate)?;
        if info.node != node {
            return Err(PkiError::WrongNode {
                path: cert_path,
                node: node.to_string(),
                named: info.node,
            });
        }
        Ok(NodeIdentity {
            name: node.to_string(),
            ca: load_certificate(&ca_path)?,
            certificate,
            key: PrivateKeyDer::from_pem_slice(read_text(&key_path)?.as_bytes()).map_err(|_| {
                PkiError::BadPem {
                    path: key_path,
                    what: "private key",
                }
            })?,
            not_after: info.not_after,
        })
    }
}

fn certificate_info(path: &Path, certificate: &[u8]) -> Result<CertificateInfo, PkiError> {
    CertificateInfo::parse(certificate).map_err(|source| PkiError::Certificate {
        path: path.to_path_buf(),
        source,
    })
}

fn ca_params(cluster: &str, days: u32) -> Result<CertificateParams, rcgen::Error> {
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
    let now = SystemTime::now();
    params.not_before = offset_date_time(now - CLOCK_SKEW);
    params.not_after = offset_date_time(now + Duration::from_secs(u64::from(days) * 86_400));
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

/// Replaces `path` whole: written and synced aside, then renamed over it,
/// so a reader sees the old file or the new one, never a mix.
fn replace_file(path: &Path, content: &[u8], private: bool) -> Result<(), PkiError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".new");
    let aside = PathBuf::from(aside);
    match fs::remove_file(&aside) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Io {
                path: aside,
                source,
            });
        }
    }
    write_file(&aside, content, private)?;
    fs::rename(&aside, path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}
