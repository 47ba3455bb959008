//! TLS material for both kinds of migrator, made once per bench: the two "hosts" are `lmb-a`
//! (source namespace) and `lmb-b` (destination namespace), each with its own certificate.
//!
//! - livemig: `livemig certs` (rcgen): a CA and one certificate + key per host.
//! - QEMU: a `tls-creds-x509` directory per host (`ca-cert.pem`, `server-cert.pem`,
//!   `server-key.pem`, `client-cert.pem`, `client-key.pem`), made with `openssl`. QEMU refuses
//!   rcgen's host certificates: their key usage is critical and lacks keyEncipherment, which
//!   QEMU's x509 credentials check requires (tried with QEMU 10.0.2: "Certificate ... usage
//!   does not permit key encipherment"). Same kind of keys as livemig's (ECDSA P-256).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The host name of the source namespace's host.
pub(crate) const HOST_A: &str = "lmb-a";
/// The host name of the destination namespace's host.
pub(crate) const HOST_B: &str = "lmb-b";

/// Where the certificates are.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    livemig: PathBuf,
    qemu: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run openssl (QEMU's TLS certificates are made with it; install openssl, or run with --no-tls)")?;
    if !out.status.success() {
        bail!("`openssl {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl TlsFiles {
    /// Makes everything under `dir` (which must not hold certificates yet).
    pub(crate) fn make(dir: &Path) -> anyhow::Result<TlsFiles> {
        let t = TlsFiles { livemig: dir.join("livemig"), qemu: dir.join("qemu") };
        livemig_tls::make_certs(&t.livemig, &[HOST_A.to_string(), HOST_B.to_string()])
            .context("cannot make livemig's TLS certificates (`livemig certs`)")?;
        let q = &t.qemu;
        std::fs::create_dir_all(q).with_context(|| format!("cannot create {}", q.display()))?;
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem"], q)?;
        openssl(
            &[
                "req", "-x509", "-new", "-key", "ca-key.pem", "-subj", "/CN=livemig bench QEMU CA", "-days", "30", "-out",
                "ca-cert.pem", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            q,
        )?;
        for host in [HOST_A, HOST_B] {
            let (key, csr, cert, ext) = (format!("{host}-key.pem"), format!("{host}.csr"), format!("{host}.pem"), format!("{host}.ext"));
            openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key], q)?;
            openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={host}"), "-out", &csr], q)?;
            std::fs::write(
                q.join(&ext),
                format!(
                    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                     extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:{host}\n"
                ),
            )?;
            openssl(
                &[
                    "x509", "-req", "-in", &csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "30",
                    "-extfile", &ext, "-out", &cert,
                ],
                q,
            )?;
            // One directory per host, as QEMU reads it: the host's certificate serves both roles.
            let d = q.join(host);
            std::fs::create_dir_all(&d)?;
            std::fs::copy(q.join("ca-cert.pem"), d.join("ca-cert.pem"))?;
            for role in ["server", "client"] {
                std::fs::copy(q.join(&cert), d.join(format!("{role}-cert.pem")))?;
                std::fs::copy(q.join(&key), d.join(format!("{role}-key.pem")))?;
            }
        }
        Ok(t)
    }

    /// `--tls-cert`, `--tls-key`, `--tls-ca` of livemig on `host`.
    pub(crate) fn livemig_args(&self, host: &str) -> Vec<String> {
        let p = |n: String| self.livemig.join(n).display().to_string();
        vec![
            "--tls-cert".into(),
            p(format!("{host}.pem")),
            "--tls-key".into(),
            p(format!("{host}-key.pem")),
            "--tls-ca".into(),
            p(livemig_tls::CA_FILE.to_string()),
        ]
    }

    /// The `dir` of QEMU's `tls-creds-x509` on `host`.
    pub(crate) fn qemu_dir(&self, host: &str) -> String {
        self.qemu.join(host).display().to_string()
    }
}
