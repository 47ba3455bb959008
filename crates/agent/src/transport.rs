//! The secure (or, on request, plain) channel between the agents over one TCP connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

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
}

fn halves(stream: &TcpStream) -> Result<(TcpStream, TcpStream), AgentError> {
    let clone = || stream.try_clone().map_err(|source| AgentError::Network { what: "cannot share the connection".into(), source });
    Ok((clone()?, clone()?))
}

fn open(s: Session) -> Channel {
    // The subject and names of the peer's certificate: peer text, printed and reported.
    let peer = livemig_wire::sanitize_peer_text(&s.peer());
    let (reader, writer) = s.split();
    Channel { reader, writer, peer }
}

/// The sender's side: TLS client (the handshake completes, or fails, before this returns).
/// `stream` stays usable as a handle on the socket's options.
pub(crate) fn client(t: &Transport, stream: &TcpStream, server_name: &str) -> Result<Channel, AgentError> {
    let (r, w) = halves(stream)?;
    match t {
        Transport::Insecure => Ok(Channel { reader: Box::new(r), writer: Box::new(w), peer: "unauthenticated".into() }),
        Transport::Tls(setup) => livemig_tls::connect(setup, r, server_name)
            .map(open)
            .map_err(|e| AgentError::Tls { what: format!("the TLS handshake with the receiver ({server_name}) failed"), source: Box::new(e) }),
    }
}

/// The receiver's side: TLS server.
pub(crate) fn server(t: &Transport, stream: &TcpStream) -> Result<Channel, AgentError> {
    let (r, w) = halves(stream)?;
    match t {
        Transport::Insecure => Ok(Channel { reader: Box::new(r), writer: Box::new(w), peer: "unauthenticated".into() }),
        Transport::Tls(setup) => livemig_tls::accept(setup, r)
            .map(open)
            .map_err(|e| AgentError::Tls { what: "the TLS handshake with the sender failed".into(), source: Box::new(e) }),
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
    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(super::host_of("10.0.0.2:4444"), "10.0.0.2");
        assert_eq!(super::host_of("dst.example:4444"), "dst.example");
        assert_eq!(super::host_of("[::1]:4444"), "::1");
        assert_eq!(super::host_of("plain"), "plain");
    }
}
