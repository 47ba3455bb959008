//! `livemig_tls::accept` (PSK mode) with arbitrary bytes as the client's first flight, over TCP
//! on the loopback: the fuzz input is written by a client socket that then closes for writing.
//! Contract: an error, never a panic and never a session (no bytes without the key make one).
#![no_main]

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use livemig_fuzz_common::tls_setup;

/// Input beyond this is cut (written before the server reads: it must fit the socket buffers).
const MAX_INPUT: usize = 64 * 1024;

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_INPUT)];
    let setup = tls_setup();
    let l = listener();
    let mut client = TcpStream::connect(l.local_addr().expect("address")).expect("connect on the loopback");
    client.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = client.write_all(data);
    let _ = client.shutdown(Shutdown::Write);
    let (server, _) = l.accept().expect("accept on the loopback");
    server.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    server.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    match livemig_tls::accept(setup, server) {
        Ok(s) => panic!("a session from unauthenticated bytes: peer {}", s.peer()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    drop(client);
});
