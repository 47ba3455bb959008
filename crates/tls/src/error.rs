//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

/// What can go wrong loading TLS material, making certificates or setting up a session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A PEM file is malformed.
    #[error("{} is not a valid PEM file of {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What it should hold ("certificates", "a private key").
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds none of what it should.
    #[error("{} holds no {what}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// The CA file holds a certificate that cannot be a trust anchor.
    #[error("{} holds a CA certificate that cannot be used", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// No client-certificate verifier can be built from the CA file.
    #[error("cannot verify client certificates with the CA certificates of {}", path.display())]
    CaVerifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The private key does not fit the certificate, or is of a kind not supported.
    #[error("the key in {} cannot be used with the certificate in {}", key.display(), cert.display())]
    BadKey {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// Our own certificate is not valid under the CA we were given (the peer would refuse it).
    #[error("the certificate in {} is not accepted under the CA in {} (the peer would refuse it)", cert.display(), ca.display())]
    NotUnderCa {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The PSK file is not a key made by `livemig certs` (a passphrase, or any other file): a
    /// key that could be guessed would let whoever recorded a handshake try guesses offline.
    #[error(
        "the PSK file {} is not a livemig key: {why}. A PSK must be a random key in the format `livemig certs` writes \
         (one line: `{prefix}` and 64 hex digits); passphrases and other files are refused because they can be \
         guessed offline. Make a key with `livemig certs DIR` (it writes DIR/{file}) and copy that file to both hosts",
        path.display(), prefix = crate::psk::PSK_PREFIX, file = crate::PSK_FILE
    )]
    PskFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The server name given to [`crate::connect`] is neither a DNS name nor an IP address.
    #[error("{name:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName {
        /// The name.
        name: String,
    },
    /// A host name given to [`crate::make_certs`] cannot be used.
    #[error("{host:?} cannot be used as a host name for a certificate: {why}")]
    BadHost {
        /// The name.
        host: String,
        /// Why.
        why: &'static str,
    },
    /// Making a key or a certificate failed.
    #[error("cannot make {what}")]
    Generate {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// Building the TLS configuration failed.
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    /// The TLS handshake failed: wrong certificate, key or PSK on either side, a timeout, or the
    /// peer went away.
    #[error("the TLS handshake failed{}", if *.during_confirm { " (the server refused us or closed before confirming)" } else { "" })]
    Handshake {
        /// True if our side completed the handshake and was waiting for the server's confirmation.
        during_confirm: bool,
        /// Why (a rustls error is wrapped in an io error of kind InvalidData).
        #[source]
        source: io::Error,
    },
    /// The server's confirmation after the handshake was not the expected one.
    #[error("the peer is not a livemig TLS agent (unexpected confirmation after the handshake)")]
    BadConfirmation,
    /// The socket could not be cloned for the reader and writer halves.
    #[error("cannot clone the TCP socket")]
    Socket(#[source] io::Error),
    /// The page key could not be exported from the TLS session.
    #[error("cannot derive the migration's page key from the TLS session")]
    Export(#[source] rustls::Error),
}
