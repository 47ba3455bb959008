//! TLS 1.3 between the two livemig agents, over the one TCP connection they share.
//!
//! Two ways to authenticate, both mutual:
//!
//! - **Certificates** ([`Auth::Certs`]): each side presents a certificate signed by the CA and
//!   verifies the peer's against the same CA (client certificates are required). The client also
//!   checks the server's name (a DNS name or IP address SAN) against the name it connected to.
//!   [`make_certs`] makes a CA and one certificate per host.
//! - **Pre-shared key** ([`Auth::Psk`]): rustls has no external-PSK support, so the PSK is turned
//!   into a certificate identity both sides derive alike. The PSK file must hold a random key in
//!   the one format [`make_certs`] writes: the line `livemig-psk-v1:` followed by 32 random bytes
//!   as 64 lowercase hex digits (and a newline). Anything else (a passphrase, a file of one's
//!   own) is refused with [`TlsError::PskFormat`]: the derivation is one fast hash without salt,
//!   which is safe only because the key has 256 bits of entropy; a guessable key could be
//!   guessed offline by anyone who recorded a handshake (each guess checked against the
//!   certificate's public key).
//!   1. seed = `blake3::derive_key("livemig psk ed25519 v1", key)` (the 32 bytes of the key);
//!   2. the Ed25519 private key is that seed (as PKCS#8 v1: the fixed prefix
//!      `30 2e 02 01 00 30 05 06 03 2b 65 70 04 22 04 20` followed by the seed);
//!   3. each side makes a self-signed certificate of that key and presents it;
//!   4. custom verifiers on both sides accept a peer certificate exactly when its public key
//!      (SubjectPublicKeyInfo) is the derived one, and the handshake signature (TLS 1.3
//!      CertificateVerify) is checked as usual with that key. Names, dates and the rest of the
//!      certificate are not looked at.
//!
//!   The handshake thus proves that the peer holds the private key, which only a holder of the
//!   same PSK can compute. The PSK itself never goes on the wire, and the session keys come from
//!   the ephemeral (EC)DHE exchange as in any TLS 1.3 handshake, so recorded traffic stays
//!   secret even if the PSK leaks later (forward secrecy); a PSK leak lets an attacker
//!   impersonate either side from then on.
//!
//! Only TLS 1.3 is offered (ring provider), without resumption or early data.
//!
//! **Both sides learn of a refusal during the handshake.** In TLS 1.3 the client finishes its
//! handshake before the server has checked the client's certificate, so [`accept`] ends by
//! sending a short confirmation that [`connect`] waits for: a client the server refused gets an
//! error from [`connect`], never a session that fails at the first read. Callers set the socket
//! timeouts before the handshake; a handshake that times out returns an error.
//!
//! A [`Session`] splits into a reader and a writer for two threads (see [`Session::split`]).
//!
//! **The migration's page key.** Both ends export [`PAGE_KEY_LEN`] bytes from the session with
//! the TLS 1.3 keying-material exporter (RFC 8446 section 7.5, RFC 5705) under the label
//! [`PAGE_KEY_LABEL`] and no context ([`Session::page_key_material`]): the same on both ends of
//! one session, unrelated between sessions, and known to nobody else (it derives from the
//! session's (EC)DHE secret). The agents key their page hashes and fingerprints with it, so no
//! message carries a key over TLS.

mod error;
mod make;
mod psk;
mod split;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

pub use error::TlsError;
pub use make::{make_certs, CA_FILE, PSK_FILE};
pub use psk::{generate_psk, psk_file_text, PSK_KEY_LEN, PSK_PREFIX};

/// How the agents authenticate each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Certificates signed by a common CA, verified both ways (PEM files).
    Certs {
        /// This side's certificate (chain), PEM.
        cert: PathBuf,
        /// This side's private key (PKCS#8, PKCS#1 or SEC1), PEM.
        key: PathBuf,
        /// The CA certificate(s) the peer's certificate must be signed by, PEM.
        ca: PathBuf,
    },
    /// A pre-shared key: a file as [`make_certs`] writes it (`livemig-psk-v1:` and 32 random
    /// bytes in hex), the same on both sides.
    Psk {
        /// The PSK file.
        file: PathBuf,
    },
}

/// Loaded and checked TLS configuration for both roles; cheap to share.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    psk: bool,
}

/// What the server sends after the handshake, and the client waits for.
const CONFIRMATION: &[u8; 16] = b"livemig-tls-ok/1";

/// Exporter label of the migration's page key (RFC 5705: labels beginning `EXPERIMENTAL` are
/// for private use).
pub const PAGE_KEY_LABEL: &[u8] = b"EXPERIMENTAL livemig page key v1";
/// Bytes of the exported page key.
pub const PAGE_KEY_LEN: usize = 32;

/// [`PAGE_KEY_LEN`] random bytes from the system's secure random source: the page key of a
/// migration over a plain link (no TLS session to export one from).
pub fn random_key() -> Result<[u8; PAGE_KEY_LEN], TlsError> {
    let mut key = [0u8; PAGE_KEY_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut key)
        .map_err(|_| TlsError::Generate { what: "the page key".into(), source: rcgen::Error::RingUnspecified })?;
    Ok(key)
}

fn export_page_key(conn: &Connection) -> Result<[u8; PAGE_KEY_LEN], TlsError> {
    conn.export_keying_material([0u8; PAGE_KEY_LEN], PAGE_KEY_LABEL, None).map_err(TlsError::Export)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), what, source })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { path: path.to_owned(), what });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "a private key";
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing { path: path.to_owned(), what },
        source => TlsError::Pem { path: path.to_owned(), what, source },
    })
}

fn tls13_client(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)
}

fn tls13_server(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)
}

fn finish(mut client: ClientConfig, mut server: ServerConfig, psk: bool) -> TlsSetup {
    client.resumption = rustls::client::Resumption::disabled();
    client.enable_early_data = false;
    server.send_tls13_tickets = 0;
    server.max_early_data_size = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    TlsSetup { client: Arc::new(client), server: Arc::new(server), psk }
}

impl TlsSetup {
    /// Loads and checks the files of `auth`: PEM syntax, key matching certificate, our
    /// certificate valid under the CA (certificate mode); the key's format (PSK mode). Errors name
    /// the file.
    pub fn load(auth: &Auth) -> Result<TlsSetup, TlsError> {
        match auth {
            Auth::Certs { cert, key, ca } => Self::load_certs(cert, key, ca),
            Auth::Psk { file } => {
                let text = read_file(file)?;
                let key = psk::parse_psk(&text).map_err(|why| TlsError::PskFormat { path: file.clone(), why })?;
                Self::from_psk(&key)
            }
        }
    }

    /// PSK mode from the key itself.
    fn from_psk(psk: &[u8; psk::PSK_KEY_LEN]) -> Result<TlsSetup, TlsError> {
        let provider = provider();
        let id = psk::identity(psk)?;
        let verifier = Arc::new(psk::PskVerifier::new(id.spki.clone(), Arc::clone(&provider)));
        let client = tls13_client(&provider)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
            .map_err(TlsError::Config)?;
        let server = tls13_server(&provider)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![id.cert], id.key)
            .map_err(TlsError::Config)?;
        Ok(finish(client, server, true))
    }

    fn load_certs(cert: &Path, key: &Path, ca: &Path) -> Result<TlsSetup, TlsError> {
        let provider = provider();
        let chain = load_certs(cert, "certificates")?;
        let private = load_key(key)?;
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca, "CA certificates")? {
            roots.add(c).map_err(|source| TlsError::BadCa { path: ca.to_owned(), source })?;
        }
        let roots = Arc::new(roots);
        let bad_key = |source| TlsError::BadKey { key: key.to_owned(), cert: cert.to_owned(), source };
        let client = tls13_client(&provider)?
            .with_root_certificates(Arc::clone(&roots))
            .with_client_auth_cert(chain.clone(), private.clone_key())
            .map_err(bad_key)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|source| TlsError::CaVerifier { path: ca.to_owned(), source })?;
        // The peer checks our certificate as we check its: find out now, not at the handshake.
        let (end, intermediates) =
            chain.split_first().ok_or_else(|| TlsError::Missing { path: cert.to_owned(), what: "certificates" })?;
        verifier.verify_client_cert(end, intermediates, UnixTime::now()).map_err(|source| TlsError::NotUnderCa {
            cert: cert.to_owned(),
            ca: ca.to_owned(),
            source,
        })?;
        let server = tls13_server(&provider)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, private)
            .map_err(bad_key)?;
        Ok(finish(client, server, false))
    }

    /// True in PSK mode.
    pub fn is_psk(&self) -> bool {
        self.psk
    }
}

/// An established TLS session over a TCP stream.
pub struct Session {
    conn: Connection,
    stream: TcpStream,
    /// A clone of `stream` for the reader half.
    rsock: TcpStream,
    peer: String,
    page_key: [u8; PAGE_KEY_LEN],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Session {
    /// Who the peer is: the subject and SANs of its certificate, or "psk peer".
    pub fn peer(&self) -> String {
        self.peer.clone()
    }

    /// The migration's page key, exported from this session (see the crate documentation):
    /// the same on both ends, different for every session.
    pub fn page_key_material(&self) -> [u8; PAGE_KEY_LEN] {
        self.page_key
    }

    /// A reader and a writer of the session's plaintext, for use from two threads at once (the
    /// reader may block in `read` while the writer streams). Reads return `Ok(0)` after the
    /// peer's close_notify, an `UnexpectedEof` error if the connection ends without one, and an
    /// `InvalidData` error for a TLS failure; socket timeouts come through as they are. When both
    /// halves are dropped, a close_notify is sent (bounded to one second).
    pub fn split(self) -> (Box<dyn Read + Send>, Box<dyn Write + Send>) {
        let Session { mut conn, stream, rsock, .. } = self;
        // The writer hands over at most a bounded chunk per call and takes the records out at
        // once, so rustls need not cap its buffer (which would split large writes).
        conn.set_buffer_limit(None);
        let shared = Arc::new(split::Shared::new(conn, stream));
        let reader = split::TlsReader::new(Arc::clone(&shared), rsock);
        let writer = split::TlsWriter::new(shared);
        (Box::new(reader), Box::new(writer))
    }
}

fn handshake_err(during_confirm: bool) -> impl FnOnce(io::Error) -> TlsError {
    move |source| TlsError::Handshake { during_confirm, source }
}

fn complete_handshake(conn: &mut Connection, stream: &mut TcpStream) -> Result<(), TlsError> {
    while conn.is_handshaking() {
        conn.complete_io(stream).map_err(handshake_err(false))?;
    }
    // Anything rustls still has to send (the client's Finished) goes now.
    while conn.wants_write() {
        conn.write_tls(stream).map_err(handshake_err(false))?;
    }
    Ok(())
}

fn describe_peer(conn: &Connection, psk: bool) -> String {
    if psk {
        return "psk peer".to_string();
    }
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return "unknown peer".to_string();
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return "unknown peer".to_string();
    };
    let mut s = parsed.subject().to_string();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                    16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        if !names.is_empty() {
            s.push_str(&format!(" (SAN {})", names.join(", ")));
        }
    }
    s
}

/// Client side: runs the handshake on `stream` (timeouts set by the caller) and waits for the
/// server's confirmation that it accepted us. `server_name` is the host the client connected to
/// (a DNS name or an IP address, brackets allowed); the server's certificate must carry it
/// (certificate mode; ignored in PSK mode).
pub fn connect(setup: &TlsSetup, mut stream: TcpStream, server_name: &str) -> Result<Session, TlsError> {
    let name = if setup.psk {
        psk::PSK_NAME
    } else {
        server_name.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(server_name)
    };
    let name =
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName { name: server_name.to_string() })?;
    let conn = ClientConnection::new(Arc::clone(&setup.client), name).map_err(TlsError::Config)?;
    let mut conn = Connection::Client(conn);
    complete_handshake(&mut conn, &mut stream)?;
    let mut got = [0u8; CONFIRMATION.len()];
    let mut n = 0;
    while n < got.len() {
        match conn.reader().read(&mut got[n..]) {
            Ok(0) => {
                let closed = io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the session");
                return Err(handshake_err(true)(closed));
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.complete_io(&mut stream).map_err(handshake_err(true))?;
            }
            Err(e) => return Err(handshake_err(true)(e)),
        }
    }
    if &got != CONFIRMATION {
        return Err(TlsError::BadConfirmation);
    }
    let peer = describe_peer(&conn, setup.psk);
    let page_key = export_page_key(&conn)?;
    let rsock = stream.try_clone().map_err(TlsError::Socket)?;
    Ok(Session { conn, stream, rsock, peer, page_key })
}

/// Server side: runs the handshake on `stream` (timeouts set by the caller), which checks the
/// client's certificate, then confirms to the client.
pub fn accept(setup: &TlsSetup, mut stream: TcpStream) -> Result<Session, TlsError> {
    let conn = ServerConnection::new(Arc::clone(&setup.server)).map_err(TlsError::Config)?;
    let mut conn = Connection::Server(conn);
    complete_handshake(&mut conn, &mut stream)?;
    conn.writer().write_all(CONFIRMATION).map_err(handshake_err(false))?;
    while conn.wants_write() {
        conn.write_tls(&mut stream).map_err(handshake_err(false))?;
    }
    let peer = describe_peer(&conn, setup.psk);
    let page_key = export_page_key(&conn)?;
    let rsock = stream.try_clone().map_err(TlsError::Socket)?;
    Ok(Session { conn, stream, rsock, peer, page_key })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;

    /// A PSK session pair over loopback, plus a raw clone of the client's socket.
    fn sessions() -> (Session, Session, TcpStream) {
        let dir = tempfile::tempdir().expect("tempdir");
        make_certs(dir.path(), &["h".into()]).expect("make_certs");
        let setup = TlsSetup::load(&Auth::Psk { file: dir.path().join(PSK_FILE) }).expect("load");
        pair(&setup, &setup, "x")
    }

    /// A session pair over loopback between a client and a server set up as given.
    fn pair(client_setup: &TlsSetup, server_setup: &TlsSetup, name: &str) -> (Session, Session, TcpStream) {
        let setup = client_setup.clone();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s_setup = server_setup.clone();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            accept(&s_setup, s).expect("server session")
        });
        let c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let raw = c.try_clone().expect("clone");
        let client = connect(&setup, c, name).expect("client session");
        (t.join().expect("join"), client, raw)
    }

    /// Both ends of a session derive the same page key, in certificate and PSK mode; another
    /// session (same credentials) derives another key.
    #[test]
    fn both_ends_export_the_same_page_key_and_sessions_differ() {
        let dir = tempfile::tempdir().expect("tempdir");
        make_certs(dir.path(), &["src".into(), "dst".into()]).expect("make_certs");
        let cert_of = |host: &str| Auth::Certs {
            cert: dir.path().join(format!("{host}.pem")),
            key: dir.path().join(format!("{host}-key.pem")),
            ca: dir.path().join(CA_FILE),
        };
        let client = TlsSetup::load(&cert_of("src")).expect("client certs");
        let server = TlsSetup::load(&cert_of("dst")).expect("server certs");
        let psk = TlsSetup::load(&Auth::Psk { file: dir.path().join(PSK_FILE) }).expect("psk");
        let mut seen = Vec::new();
        for (c, s, name) in [(&client, &server, "dst"), (&client, &server, "dst"), (&psk, &psk, "x"), (&psk, &psk, "x")] {
            let (srv, cli, _raw) = pair(c, s, name);
            assert_eq!(srv.page_key_material(), cli.page_key_material(), "both ends agree");
            assert_ne!(cli.page_key_material(), [0u8; PAGE_KEY_LEN]);
            seen.push(cli.page_key_material());
        }
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[i + 1..] {
                assert_ne!(a, b, "every session has its own key");
            }
        }
        assert_ne!(random_key().expect("random"), random_key().expect("random"));
    }

    /// Keys refreshed mid-session (rustls answers a key update with the next record it sends):
    /// data keeps flowing both ways through the split halves.
    #[test]
    fn key_update_through_split_halves() {
        let (server, mut client, _raw) = sessions();
        client.conn.refresh_traffic_keys().expect("request key update");
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        for round in 0..3u8 {
            cw.write_all(&[round; 3]).expect("write");
            let mut buf = [0u8; 3];
            sr.read_exact(&mut buf).expect("read");
            assert_eq!(buf, [round; 3]);
            sw.write_all(&[round + 10; 3]).expect("write");
            cr.read_exact(&mut buf).expect("read");
            assert_eq!(buf, [round + 10; 3]);
        }
    }

    /// A corrupt record fails the reader with InvalidData, and the alert rustls makes is sent by
    /// the reader half itself (the writer half is idle), so the peer fails too instead of waiting.
    #[test]
    fn reader_half_sends_the_alert_of_a_corrupt_record() {
        let (server, client, mut raw) = sessions();
        let (mut cr, _cw) = client.split();
        let shared;
        let mut sr = {
            let Session { conn, stream, rsock, .. } = server;
            shared = Arc::new(split::Shared::new(conn, stream));
            split::TlsReader::new(Arc::clone(&shared), rsock)
        };
        // An application-data record whose authentication must fail.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        record.extend([0x5a; 0x20]);
        raw.write_all(&record).expect("inject");
        let mut buf = [0u8; 8];
        let e = sr.read(&mut buf).expect_err("corrupt record");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let again = sr.read(&mut buf).expect_err("the error stays");
        assert_eq!(again.kind(), io::ErrorKind::InvalidData, "{again}");
        assert!(!shared.state().expect("state").conn.wants_write(), "the alert was sent");
        let e = cr.read(&mut buf).expect_err("the client hears the alert");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("alert"), "{e}");
    }
}
