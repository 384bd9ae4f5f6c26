//! TLS for the lab's mail servers and clients, with the `openssl` command: a
//! self-signed certificate per server (or one signed by a lab CA, for checks that
//! verify), and `openssl s_client` as a client that speaks a line protocol (IMAP, SMTP)
//! inside TLS.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::lab::NetNs;
use crate::proc;

const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes a self-signed certificate for `name` (an EC key, quick to make) in `dir`;
/// returns the certificate's and the key's paths. Reused when they exist.
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    if cert.exists() && key.exists() {
        return (cert, key);
    }
    let out = proc::run_with_timeout(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:prime256v1")
            .args(["-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        OPENSSL_TIMEOUT,
    )
    .unwrap_or_else(|e| {
        panic!("running openssl req: {e} (is the Debian package `openssl` installed?)")
    });
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A certificate for `name` (in its subjectAltName, as verifying clients require) signed
/// by a CA made for it, in `dir`: returns the CA's certificate, the server's certificate
/// and the server's key. Reused when they exist.
pub fn ca_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let file = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let (ca, ca_key) = (file(".ca.crt"), file(".ca.key"));
    let (csr, extensions) = (file(".csr"), file(".ext"));
    let (cert, key) = (file(".signed.crt"), file(".signed.key"));
    if ca.exists() && cert.exists() && key.exists() {
        return (ca, cert, key);
    }
    std::fs::write(
        &extensions,
        format!(
            "subjectAltName = DNS:{name}\nbasicConstraints = critical, CA:FALSE\n\
             extendedKeyUsage = serverAuth\n"
        ),
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", extensions.display()));
    // The CA: `req -x509` marks its certificate as a CA.
    openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args([
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
            ])
            .arg(format!("/CN=kgate lab CA for {name}"))
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca),
    );
    // The server's key and request.
    openssl(
        Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    // Signed by the CA, as a server's certificate.
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-set_serial", "2", "-days", "2", "-extfile"])
            .arg(&extensions)
            .arg("-out")
            .arg(&cert),
    );
    (ca, cert, key)
}

/// Runs an `openssl` command; panics with its output when it fails.
fn openssl(command: &mut Command) {
    let out = proc::run_with_timeout(command, OPENSSL_TIMEOUT).unwrap_or_else(|e| {
        panic!("running openssl: {e} (is the Debian package `openssl` installed?)")
    });
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects from `ns` to `to` with TLS from the first byte, sends `lines` (each
/// ended with CRLF) and reads until the server closes; returns what the server said.
/// Panics when `openssl s_client` fails.
pub fn tls_session(ns: &NetNs, to: SocketAddr, lines: &[&str]) -> String {
    let mut child = ns
        .command("openssl")
        .args(["s_client", "-quiet", "-crlf", "-connect"])
        .arg(to.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running openssl s_client: {e}"));
    let mut stdin = child.stdin.take().expect("piped");
    for line in lines {
        writeln!(stdin, "{line}").expect("writing to openssl s_client");
    }
    // -quiet implies -ign_eof: the session goes on until the server closes it.
    drop(stdin);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = proc::wait_timeout(&mut child, OPENSSL_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("openssl s_client to {to} did not end within {OPENSSL_TIMEOUT:?}")
    });
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    assert!(
        status.success(),
        "openssl s_client to {to} failed ({status}):\n{out}{err}"
    );
    out
}
