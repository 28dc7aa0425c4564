//! TLS shared by every connection reaper opens: certificate files read once
//! at start-up (a file that is missing or holds no PEM is a configuration
//! error naming its setting), and TLS failures said in words an operator can
//! act on. Each client library brings its own rustls stack (ring-based, no
//! OpenSSL); this module only reads their errors.

use std::error::Error as StdError;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError};

/// A certificate or key file that cannot be used, named by its setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {path} {what}")]
pub struct FileError {
    setting: String,
    path: String,
    what: String,
}

/// The PEM text of the certificates in `path`, checked to hold at least one.
pub fn read_certs(setting: &str, path: &Path) -> Result<String, FileError> {
    let text = read(setting, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(setting, path, &format!("is not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(setting, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(text)
}

/// The PEM text of the private key in `path`, checked to be one.
pub fn read_key(setting: &str, path: &Path) -> Result<String, FileError> {
    let text = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|_| invalid(setting, path, "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))?;
    Ok(text)
}

fn read(setting: &str, path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|e| invalid(setting, path, &format!("cannot be read ({e})")))
}

fn invalid(setting: &str, path: &Path, what: &str) -> FileError {
    FileError { setting: setting.to_string(), path: path.display().to_string(), what: what.to_string() }
}

/// What went wrong in a TLS handshake, if `err` (or anything it wraps) is a
/// TLS failure: `host` is the name the certificate was checked against and
/// `ca_setting` the setting that adds a CA to trust.
pub fn explain(err: &(dyn StdError + 'static), host: &str, ca_setting: &str) -> Option<String> {
    let reason = match find_rustls(err)? {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => Reason::UnknownIssuer,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => Reason::NameMismatch,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Reason::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => Reason::NotValidYet,
            other => Reason::Other(format!("the server's certificate was refused ({other:?})")),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => Reason::WantsClientCert(format!("{alert:?}")),
            AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                Reason::ClientCertRefused(format!("{alert:?}"))
            }
            AlertDescription::HandshakeFailure => Reason::Other(
                "the server ended the handshake (HandshakeFailure): no TLS version or cipher in common, \
                 or it wants a client certificate"
                    .into(),
            ),
            other => Reason::Other(format!("the server ended the handshake ({other:?})")),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => Reason::NotTls,
        other => Reason::Other(other.to_string()),
    };
    Some(reason.say(host, ca_setting))
}

/// The same for a client that hands on only the text of the TLS error (the
/// MongoDB driver's server-selection error quotes each server's).
pub fn explain_text(text: &str, host: &str, ca_setting: &str) -> Option<String> {
    let reason = if text.contains("invalid peer certificate: UnknownIssuer") {
        Reason::UnknownIssuer
    } else if text.contains("certificate not valid for name") || text.contains("NotValidForName") {
        Reason::NameMismatch
    } else if text.contains("certificate expired") || text.contains("invalid peer certificate: Expired") {
        Reason::Expired
    } else if text.contains("received fatal alert: CertificateRequired") {
        Reason::WantsClientCert("CertificateRequired".into())
    } else if text.contains("invalid peer certificate") || text.contains("received fatal alert") {
        Reason::Other(text.chars().take(200).collect())
    } else {
        return None;
    };
    Some(reason.say(host, ca_setting))
}

enum Reason {
    UnknownIssuer,
    NameMismatch,
    Expired,
    NotValidYet,
    WantsClientCert(String),
    ClientCertRefused(String),
    NotTls,
    Other(String),
}

impl Reason {
    fn say(&self, host: &str, ca_setting: &str) -> String {
        match self {
            Reason::UnknownIssuer => format!(
                "TLS: the server's certificate is not signed by a CA reaper trusts (unknown issuer): \
                 set {ca_setting} to the CA that signed it"
            ),
            Reason::NameMismatch => format!(
                "TLS: the server's certificate is not valid for the name {host:?} (name mismatch): \
                 connect by a name the certificate lists"
            ),
            Reason::Expired => "TLS: the server's certificate has expired: the server must be given a new one \
                 (or this machine's clock is wrong)"
                .into(),
            Reason::NotValidYet => {
                "TLS: the server's certificate is not valid yet (is this machine's clock right?)".into()
            }
            Reason::WantsClientCert(alert) => format!(
                "TLS: the server ended the handshake ({alert}): it may want a client certificate \
                 (a certificate and key beside {ca_setting})"
            ),
            Reason::ClientCertRefused(alert) => format!(
                "TLS: the server refused reaper's client certificate ({alert}): is it signed by a CA the server trusts?"
            ),
            Reason::NotTls => "TLS: the server did not answer in TLS: is this its TLS port?".into(),
            Reason::Other(what) => format!("TLS: {what}"),
        }
    }
}

/// The rustls error somewhere in `err`'s chain; I/O errors carry it inside.
fn find_rustls<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(t) = find_rustls(inner) {
                return Some(t);
            }
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rustls_error_inside_io_errors_is_said_plainly() {
        let inner = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let outer = std::io::Error::other(inner);
        let said = explain(&outer, "mq.internal", "broker.tls.ca_file").expect("found");
        assert!(said.contains("unknown issuer") && said.contains("broker.tls.ca_file"), "{said}");
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert!(explain(&name, "127.0.0.1", "x").unwrap().contains("\"127.0.0.1\" (name mismatch)"));
        let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert!(explain(&expired, "h", "x").unwrap().contains("expired"));
        assert!(explain(&std::io::Error::other("refused"), "h", "x").is_none());
    }
}
