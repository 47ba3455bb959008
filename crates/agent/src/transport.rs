//! The secure (or, on request, plain) channel between the agents over one TCP connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use livemig_compact::PageKey;
use livemig_tls::{Session, TlsSetup};

use crate::error::AgentError;

/// How the agents talk.
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP: neither encrypted nor authenticated (`--insecure`).
    Insecure,
    /// TLS 1.3 with mutual authentication (certificates or a PSK).
    Tls(Arc<TlsSetup>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Transport {
    /// Name for reports: `tcp-insecure`, `tls-certificates` or `tls-psk`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Insecure => "tcp-insecure",
            Transport::Tls(s) if s.is_psk() => "tls-psk",
            Transport::Tls(_) => "tls-certificates",
        }
    }
}

/// The two halves of an established channel and who is at the other end.
pub(crate) struct Channel {
    pub(crate) reader: Box<dyn Read + Send>,
    pub(crate) writer: Box<dyn Write + Send>,
    pub(crate) peer: String,
    /// The page key exported from the TLS session; `None` on a plain link.
    pub(crate) tls_key: Option<[u8; livemig_tls::PAGE_KEY_LEN]>,
}

fn halves(stream: &TcpStream) -> Result<(TcpStream, TcpStream), AgentError> {
    let clone = || stream.try_clone().map_err(|source| AgentError::Network { what: "cannot share the connection".into(), source });
    Ok((clone()?, clone()?))
}

fn open(s: Session) -> Channel {
    // The subject and names of the peer's certificate: peer text, printed and reported.
    let peer = livemig_wire::sanitize_peer_text(&s.peer());
    let tls_key = Some(s.page_key_material());
    let (reader, writer) = s.split();
    Channel { reader, writer, peer, tls_key }
}

/// The sender's side: TLS client (the handshake completes, or fails, before this returns).
/// `stream` stays usable as a handle on the socket's options.
pub(crate) fn client(t: &Transport, stream: &TcpStream, server_name: &str) -> Result<Channel, AgentError> {
    let (r, w) = halves(stream)?;
    match t {
        Transport::Insecure => {
            Ok(Channel { reader: Box::new(r), writer: Box::new(w), peer: "unauthenticated".into(), tls_key: None })
        }
        Transport::Tls(setup) => livemig_tls::connect(setup, r, server_name)
            .map(open)
            .map_err(|e| AgentError::Tls { what: format!("the TLS handshake with the receiver ({server_name}) failed"), source: Box::new(e) }),
    }
}

/// The receiver's side: TLS server.
pub(crate) fn server(t: &Transport, stream: &TcpStream) -> Result<Channel, AgentError> {
    let (r, w) = halves(stream)?;
    match t {
        Transport::Insecure => {
            Ok(Channel { reader: Box::new(r), writer: Box::new(w), peer: "unauthenticated".into(), tls_key: None })
        }
        Transport::Tls(setup) => livemig_tls::accept(setup, r)
            .map(open)
            .map_err(|e| AgentError::Tls { what: "the TLS handshake with the sender failed".into(), source: Box::new(e) }),
    }
}

/// The report's `page_key` when the key comes from the TLS session.
pub const PAGE_KEY_TLS: &str = "tls-exporter";
/// The report's `page_key` on a plain link: the receiver chose it and sent it in the clear.
pub const PAGE_KEY_PLAIN: &str = "plain-link";

/// The migration's page key (it keys page hashes, reference fingerprints and digests), the
/// receiver's side: exported from the TLS session, or on a plain link a random one, whose hex
/// goes in the `welcome` (the second value).
pub(crate) fn receiver_page_key(
    tls_key: Option<[u8; livemig_tls::PAGE_KEY_LEN]>,
) -> Result<(PageKey, Option<String>), AgentError> {
    match tls_key {
        Some(k) => Ok((PageKey::from_bytes(k), None)),
        None => {
            let k = livemig_tls::random_key()
                .map_err(|e| AgentError::Tls { what: "cannot make the page key".into(), source: Box::new(e) })?;
            let key = PageKey::from_bytes(k);
            let hex = key.to_hex();
            Ok((key, Some(hex)))
        }
    }
}

/// The sender's side of [`receiver_page_key`]: the key exported from the TLS session (the
/// `welcome` must carry none), or on a plain link the one the `welcome` carries.
pub(crate) fn sender_page_key(
    tls_key: Option<[u8; livemig_tls::PAGE_KEY_LEN]>,
    welcome_key: Option<&str>,
) -> Result<PageKey, AgentError> {
    let refused = |got: &str| AgentError::Protocol { expected: "a welcome as the link requires".into(), got: got.into() };
    match (tls_key, welcome_key) {
        (Some(k), None) => Ok(PageKey::from_bytes(k)),
        (Some(_), Some(_)) => Err(refused("a page key sent over TLS (the key comes from the TLS session)")),
        (None, Some(hex)) => PageKey::from_hex(hex).ok_or_else(|| refused("a malformed page key")),
        (None, None) => Err(refused("no page key on a plain link")),
    }
}

/// Records in the report how the page key was agreed and, on a plain link, the key itself
/// (it crossed the network in the clear; with it the digests can be checked afterwards).
/// Never the key of a TLS session.
pub(crate) fn report_page_key(report: &mut crate::report::Report, obs: &mut dyn crate::Observer, key: &PageKey, tls: bool) {
    if tls {
        report.page_key = Some(PAGE_KEY_TLS.into());
    } else {
        report.page_key = Some(PAGE_KEY_PLAIN.into());
        report.page_key_hex = Some(key.to_hex());
        obs.progress(crate::Progress::Phase(
            "plain link: the page key went in the clear (secret from the guest, not from the network)",
        ));
    }
}

/// The host part of `host:port` (`[v6]:port` too), the name a TLS client checks.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_key_agreement() {
        // TLS: both from the session, nothing in the welcome.
        let (r, hex) = receiver_page_key(Some([5; 32])).unwrap();
        assert!(hex.is_none());
        assert_eq!(sender_page_key(Some([5; 32]), None).unwrap(), r);
        assert!(sender_page_key(Some([5; 32]), Some(&"00".repeat(32))).is_err(), "a key sent over TLS is refused");
        // Plain link: the receiver's random key, sent in the welcome.
        let (r, hex) = receiver_page_key(None).unwrap();
        let hex = hex.expect("a plain link's welcome carries the key");
        assert_eq!(sender_page_key(None, Some(&hex)).unwrap(), r);
        assert_ne!(receiver_page_key(None).unwrap().0, r, "random per migration");
        assert!(sender_page_key(None, None).is_err());
        assert!(sender_page_key(None, Some("xyz")).is_err());
    }

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("10.0.0.2:4444"), "10.0.0.2");
        assert_eq!(host_of("dst.example:4444"), "dst.example");
        assert_eq!(host_of("[::1]:4444"), "::1");
        assert_eq!(host_of("plain"), "plain");
    }
}
