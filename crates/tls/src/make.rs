//! `make_certs`: a CA, a certificate and key per host, and a PSK file.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use time::OffsetDateTime;

use crate::TlsError;

/// The CA certificate made by [`make_certs`], in its directory.
pub const CA_FILE: &str = "ca.pem";
/// The PSK file made by [`make_certs`], in its directory.
pub const PSK_FILE: &str = "psk";

/// Names every certificate carries besides its host, so that tests and single-host use work.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn generate(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TlsError {
    let what = what.into();
    move |source| TlsError::Generate { what, source }
}

/// Writes a new file (never overwrites one); `secret` files are made mode 0600.
fn write_new(path: &Path, data: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

/// How long the certificates are valid.
const VALID_DAYS: i64 = 10 * 365;

/// From a day ago (a peer whose clock is a little behind still accepts them) for [`VALID_DAYS`].
fn validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - time::Duration::days(1), now + time::Duration::days(VALID_DAYS))
}

fn check_host(host: &str) -> Result<(), TlsError> {
    let bad = |why| Err(TlsError::BadHost { host: host.to_string(), why });
    if host.is_empty() {
        return bad("it is empty");
    }
    if host.contains('/') || host.starts_with('.') {
        return bad("it would not make a file name");
    }
    if host.parse::<IpAddr>().is_err()
        && !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' || c == '*')
    {
        return bad("it is neither an IP address nor a DNS name (letters, digits, '-', '.')");
    }
    if host == "ca" || host == PSK_FILE {
        return bad("the name is taken by another file");
    }
    Ok(())
}

fn san(name: &str) -> Result<SanType, TlsError> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => {
            let dns = name.to_string().try_into().map_err(generate(format!("a DNS name of {name:?}")))?;
            Ok(SanType::DnsName(dns))
        }
    }
}

/// Makes in `dir` (created if needed) a CA certificate `ca.pem`, for each host a certificate
/// `HOST.pem` signed by it and its key `HOST-key.pem` (SANs: the host, plus localhost, 127.0.0.1
/// and ::1; usable as server and client; valid from a day ago for ten years), and a PSK file `psk`
/// (`livemig-psk-v1:` and 32 random bytes in hex, see [`crate::psk_file_text`]). Keys and the PSK
/// are mode 0600. The CA's key is not kept: run again in a new directory to add hosts. Refuses
/// to overwrite existing files. Returns the files made.
pub fn make_certs(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::BadHost { host: String::new(), why: "no host names were given" });
    }
    for (i, h) in hosts.iter().enumerate() {
        check_host(h)?;
        if hosts[..i].contains(h) {
            return Err(TlsError::BadHost { host: h.clone(), why: "it is given twice" });
        }
    }
    let (not_before, not_after) = validity();
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
    // Refuse before writing anything rather than leave half a set behind.
    let mut names = vec![CA_FILE.to_string(), PSK_FILE.to_string()];
    for h in hosts {
        names.push(format!("{h}.pem"));
        names.push(format!("{h}-key.pem"));
    }
    for n in names {
        let path = dir.join(n);
        if path.exists() {
            let source = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the file exists; not overwriting it");
            return Err(TlsError::Write { path, source });
        }
    }
    let mut made = Vec::new();

    let ca_key = KeyPair::generate().map_err(generate("the CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, "livemig CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate("the CA certificate"))?;
    let ca_path = dir.join(CA_FILE);
    write_new(&ca_path, ca_cert.pem().as_bytes(), false)?;
    made.push(ca_path);
    let issuer = Issuer::new(ca_params, ca_key);

    for host in hosts {
        let key = KeyPair::generate().map_err(generate(format!("the key of {host}")))?;
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host.as_str());
        let mut names = vec![host.as_str()];
        names.extend(LOCAL_NAMES.iter().copied().filter(|n| *n != host));
        params.subject_alt_names = names.into_iter().map(san).collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).map_err(generate(format!("the certificate of {host}")))?;
        let cert_path = dir.join(format!("{host}.pem"));
        let key_path = dir.join(format!("{host}-key.pem"));
        write_new(&cert_path, cert.pem().as_bytes(), false)?;
        made.push(cert_path);
        write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
        made.push(key_path);
    }

    let psk = crate::psk::generate_psk()?;
    let psk_path = dir.join(PSK_FILE);
    write_new(&psk_path, psk.as_bytes(), true)?;
    made.push(psk_path);
    Ok(made)
}
