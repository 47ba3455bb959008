//! `livemig certs DIR`: makes the TLS material for `send`/`receive` (a CA, a certificate and key
//! per host, and a pre-shared key file: `livemig-psk-v1:` and 32 random bytes in hex, the only
//! PSK format `--psk-file` accepts).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::exit;

#[derive(Args, Debug, Clone)]
pub(crate) struct CertsArgs {
    /// The directory to write into (created if needed; existing files are never overwritten).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// A host to make a certificate for (its DNS name or IP address; repeat for each host).
    /// Every certificate also names localhost, 127.0.0.1 and ::1.
    #[arg(long = "host", value_name = "NAME", default_value = "localhost")]
    hosts: Vec<String>,
}

pub(crate) fn run(a: &CertsArgs) -> anyhow::Result<u8> {
    let made = livemig_tls::make_certs(&a.dir, &a.hosts)
        .with_context(|| format!("cannot make TLS certificates in {}", a.dir.display()))?;
    println!("made in {}:", a.dir.display());
    for f in &made {
        println!("  {}", f.display());
    }
    let d = a.dir.display();
    let Some(src) = a.hosts.first() else { return Ok(exit::OK) };
    let dst = a.hosts.get(1).unwrap_or(src);
    println!("copy {d}/{} to every host; each host gets its own certificate and key", livemig_tls::CA_FILE);
    println!(
        "certificates: livemig send ... --tls-cert {d}/{src}.pem --tls-key {d}/{src}-key.pem --tls-ca {d}/ca.pem  /  \
         livemig receive ... --tls-cert {d}/{dst}.pem --tls-key {d}/{dst}-key.pem --tls-ca {d}/ca.pem"
    );
    println!(
        "or a pre-shared key (a random key; copy the same file to both hosts, mode 0600): livemig send|receive ... --psk-file {d}/{}",
        livemig_tls::PSK_FILE
    );
    Ok(exit::OK)
}
