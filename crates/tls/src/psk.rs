//! PSK mode: an Ed25519 key derived from the PSK, a self-signed certificate of it, and verifiers
//! that accept exactly that public key (see the crate documentation).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

const TLS13_ONLY: &str = "livemig speaks TLS 1.3 only";

use crate::TlsError;

/// The blake3 key-derivation context of the Ed25519 seed.
pub(crate) const DERIVE_CONTEXT: &str = "livemig psk ed25519 v1";

/// Random bytes of a PSK.
pub const PSK_KEY_LEN: usize = 32;

/// What a PSK file starts with: the file is this prefix, [`PSK_KEY_LEN`] random bytes as 64
/// lowercase hex digits, and a newline.
pub const PSK_PREFIX: &str = "livemig-psk-v1:";

/// Fewer distinct byte values than this among the 32 bytes of a key is refused as not random: a
/// random key has so few with a probability below 1e-25; `00…00`, `0123…ef` repeated and the
/// like are caught.
const MIN_DISTINCT_BYTES: usize = 12;

/// The content of a PSK file holding `key`.
pub fn psk_file_text(key: &[u8; PSK_KEY_LEN]) -> String {
    let mut s = String::with_capacity(PSK_PREFIX.len() + 2 * PSK_KEY_LEN + 1);
    s.push_str(PSK_PREFIX);
    for b in key {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('\n');
    s
}

/// A new random key as the content of a PSK file (what `livemig certs` writes).
pub fn generate_psk() -> Result<String, TlsError> {
    let mut key = [0u8; PSK_KEY_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut key)
        .map_err(|_| TlsError::Generate { what: "the PSK".into(), source: rcgen::Error::RingUnspecified })?;
    Ok(psk_file_text(&key))
}

/// The key in the content of a PSK file, or why it is not one: exactly [`PSK_PREFIX`], 64
/// lowercase hex digits and an optional newline (`\n` or `\r\n`).
pub(crate) fn parse_psk(file: &[u8]) -> Result<[u8; PSK_KEY_LEN], String> {
    let Some(rest) = file.strip_prefix(PSK_PREFIX.as_bytes()) else {
        return Err(if file.len() == PSK_KEY_LEN && std::str::from_utf8(file).is_err() {
            "it holds 32 raw bytes (a key of an older `livemig certs`, from before the format had a prefix)".to_string()
        } else {
            format!("it does not start with `{PSK_PREFIX}`")
        });
    };
    let hex = rest.strip_suffix(b"\n").map_or(rest, |r| r.strip_suffix(b"\r").unwrap_or(r));
    if hex.len() != 2 * PSK_KEY_LEN || !hex.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
        return Err(format!(
            "after `{PSK_PREFIX}` it needs exactly {} lowercase hex digits and a newline",
            2 * PSK_KEY_LEN
        ));
    }
    let mut key = [0u8; PSK_KEY_LEN];
    for (k, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| if c.is_ascii_digit() { c - b'0' } else { c - b'a' + 10 };
        *k = (digit(pair[0]) << 4) | digit(pair[1]);
    }
    let mut seen = [false; 256];
    key.iter().for_each(|&b| seen[usize::from(b)] = true);
    if seen.iter().filter(|&&s| s).count() < MIN_DISTINCT_BYTES {
        return Err("its key is not random (too few distinct bytes)".to_string());
    }
    Ok(key)
}

/// An Ed25519 PKCS#8 v1 (RFC 8410) private key is this fixed prefix and the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The name in the PSK certificate and in the client's SNI (no real host name goes on the wire).
pub(crate) const PSK_NAME: &str = "livemig-psk";

/// What both sides of PSK mode hold: the certificate and key derived from the PSK, and the
/// SubjectPublicKeyInfo a peer's certificate must carry.
pub(crate) struct PskIdentity {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) spki: Vec<u8>,
}

/// Derives the identity from the 32 random bytes of the key. One fast derivation is enough: the
/// key has 256 bits of entropy (a guessable passphrase never gets here, see [`parse_psk`]).
pub(crate) fn identity(psk: &[u8; PSK_KEY_LEN]) -> Result<PskIdentity, TlsError> {
    let seed = blake3::derive_key(DERIVE_CONTEXT, psk);
    let mut pkcs8 = Vec::with_capacity(PKCS8_ED25519_PREFIX.len() + seed.len());
    pkcs8.extend_from_slice(&PKCS8_ED25519_PREFIX);
    pkcs8.extend_from_slice(&seed);
    let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8);
    let gen = |source| TlsError::Generate { what: "the PSK certificate".into(), source };
    let key_pair = rcgen::KeyPair::try_from(&pkcs8).map_err(gen)?;
    let params = rcgen::CertificateParams::new(vec![PSK_NAME.to_string()]).map_err(gen)?;
    let cert = params.self_signed(&key_pair).map_err(gen)?;
    use rcgen::PublicKeyData;
    let spki = key_pair.subject_public_key_info();
    Ok(PskIdentity { cert: cert.der().clone(), key: PrivateKeyDer::Pkcs8(pkcs8), spki })
}

/// Accepts a peer certificate exactly when its SubjectPublicKeyInfo is the expected one; the
/// handshake signature is then checked against that key as usual. Used for both directions.
#[derive(Debug)]
pub(crate) struct PskVerifier {
    spki: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl PskVerifier {
    pub(crate) fn new(spki: Vec<u8>, provider: Arc<CryptoProvider>) -> Self {
        PskVerifier { spki, provider }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if parsed.tbs_certificate.subject_pki.raw == self.spki.as_slice() {
            Ok(())
        } else {
            // The peer holds a different PSK (or none).
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.check(cert)?;
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The signature methods both verifier traits declare alike: TLS 1.2 refused, TLS 1.3 checked with
/// the derived key's scheme.
macro_rules! signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::General(TLS13_ONLY.into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.schemes()
        }
    };
}

impl ServerCertVerifier for PskVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_methods!();
}

impl ClientCertVerifier for PskVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_parses_back_to_its_key() {
        let key: [u8; PSK_KEY_LEN] = std::array::from_fn(|i| u8::try_from(i).expect("small").wrapping_mul(73) ^ 0x5c);
        let text = psk_file_text(&key);
        assert_eq!(text.len(), PSK_PREFIX.len() + 2 * PSK_KEY_LEN + 1);
        assert_eq!(parse_psk(text.as_bytes()), Ok(key));
        assert_eq!(parse_psk(text.trim_end().as_bytes()), Ok(key));
        let fresh = generate_psk().expect("generate");
        assert!(parse_psk(fresh.as_bytes()).is_ok(), "{fresh}");
        assert_ne!(fresh, generate_psk().expect("generate"));
        assert!(parse_psk(b"password123").is_err());
    }

    #[test]
    fn identity_is_deterministic_and_depends_on_the_psk() {
        let a = identity(&[7u8; 32]).expect("identity");
        let b = identity(&[7u8; 32]).expect("identity");
        let c = identity(&[8u8; 32]).expect("identity");
        assert_eq!(a.spki, b.spki);
        assert_ne!(a.spki, c.spki);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = PskVerifier::new(a.spki.clone(), provider);
        assert!(v.check(&a.cert).is_ok());
        assert!(v.check(&b.cert).is_ok(), "a certificate made anew from the same PSK is accepted");
        assert!(v.check(&c.cert).is_err());
        assert!(v.check(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])).is_err(), "garbage is refused, no panic");
    }
}
