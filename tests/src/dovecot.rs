//! A real Dovecot (Debian's `dovecot-imapd`) in a lab namespace, as a mail server behind
//! the gateway runs it: IMAP listeners with `haproxy = yes` that read a PROXY header
//! from the gateway (`haproxy_trusted_networks`), one user in a passwd-file.
//!
//! Each [`Dovecot`] is a private instance that leaves the system's /etc/dovecot alone:
//! - its own `dovecot.conf` (no include of the system's), `base_dir`, `state_dir`, log,
//!   passwd-file and Maildirs, all under the lab's temp directory, and an
//!   `instance_name` of its own (its processes are named `dovecot-<instance>/...`);
//! - started with `dovecot -F -c FILE` as root (in the foreground: the master is this
//!   test's child), the command entering the namespace by `setns` only
//!   ([`NetNs::command`]), so the master and its children live in the namespace and
//!   bind the backend's address;
//! - its log goes to a file (`log_path`), which [`Dovecot::log`] reads.
//!
//! Dropping it ends the master with SIGTERM (it stops its children), bounded, then
//! kills whatever process of this instance is left.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::lab::{Lab, NetNs};
use crate::proc;
use crate::tls;

/// The one user, with its password (passwd-file, scheme PLAIN).
pub const USER: &str = "alice";
pub const PASSWORD: &str = "kgate-lab-secret";

/// How long the master gets to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Dovecot::start`] waits for the listeners.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Drop` waits for killed leftovers.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// The name in the IMAPS listener's certificate.
const IMAPS_NAME: &str = "imap.kgate.test";

/// Log severities above `Info:` (Dovecot writes `<process>: Warning: ...`).
const TROUBLE: [&str; 4] = ["Warning:", "Error:", "Fatal:", "Panic:"];

/// Where a Dovecot listens, and whom it trusts to send PROXY headers.
#[derive(Clone, Debug)]
pub struct Listeners {
    /// Plain IMAP (STARTTLS not used here), `haproxy = yes`.
    pub imap: Option<SocketAddr>,
    /// IMAPS, TLS from the first byte after the PROXY header, `haproxy = yes`.
    pub imaps: Option<SocketAddr>,
    /// `haproxy_trusted_networks`: the gateway's address toward this backend.
    pub trusted: IpAddr,
}

/// A running private Dovecot. See the module documentation.
pub struct Dovecot {
    dir: PathBuf,
    ns: NetNs,
    instance: String,
    listeners: Listeners,
    master: Option<Child>,
}

impl Dovecot {
    /// Starts Dovecot in `ns` with `listeners` (addresses of the namespace), and waits
    /// until it listens. Panics with its log if it cannot start.
    pub fn start(lab: &Lab, ns: &NetNs, listeners: Listeners) -> Dovecot {
        let first = listeners
            .imap
            .or(listeners.imaps)
            .expect("a Dovecot needs a listener");
        let instance = format!("{}-{}", ns.name(), first.port());
        let mut dovecot = Dovecot {
            dir: lab.temp_dir().join(format!("dovecot-{instance}")),
            ns: ns.clone(),
            instance,
            listeners,
            master: None,
        };
        dovecot.write_config();
        let output = fs::File::create(dovecot.dir.join("dovecot.out")).expect("dovecot.out");
        let master = dovecot
            .ns
            .command("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(dovecot.config_path())
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("duplicating a file handle"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting dovecot: {e} (is the Debian package `dovecot-imapd` installed? `cargo xtask test` installs it)")
            });
        // From here on a panic drops `dovecot`, which stops it.
        dovecot.master = Some(master);
        for port in [dovecot.listeners.imap, dovecot.listeners.imaps]
            .into_iter()
            .flatten()
            .map(|a| a.port())
        {
            if !dovecot.ns.wait_listening(port, START_TIMEOUT) {
                panic!(
                    "Dovecot did not listen on port {port} within {START_TIMEOUT:?}; its log:\n{}",
                    dovecot.log()
                );
            }
        }
        dovecot
    }

    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The self-signed certificate of its IMAPS listener (made with `openssl req
    /// -x509`, for `imap.kgate.test`), if it has one.
    pub fn certificate(&self) -> Option<PathBuf> {
        self.listeners
            .imaps
            .map(|_| tls::self_signed(&self.dir, IMAPS_NAME).0)
    }

    /// The whole log so far (and what the master printed before it opened the log).
    pub fn log(&self) -> String {
        ["dovecot.out", "dovecot.log"]
            .iter()
            .filter_map(|name| fs::read_to_string(self.dir.join(name)).ok())
            .collect::<Vec<_>>()
            .join("")
    }

    /// A position in the log, for [`Dovecot::log_since`].
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// The log written after `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        self.log().get(mark..).unwrap_or_default().to_owned()
    }

    /// Waits until the log contains `needle`; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops it (bounded); Drop does the same.
    pub fn stop(self) {}

    fn config_path(&self) -> PathBuf {
        self.dir.join("dovecot.conf")
    }

    fn write_config(&self) {
        let dir = &self.dir;
        let mail = dir.join("mail");
        for sub in [dir.join("run"), dir.join("state"), mail.clone()] {
            fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("creating {}: {e}", sub.display()));
        }
        // The user's mail is written as `nobody`.
        std::os::unix::fs::chown(&mail, Some(NOBODY), Some(NOGROUP))
            .unwrap_or_else(|e| panic!("chown {}: {e}", mail.display()));
        fs::write(
            dir.join("passwd"),
            format!("{USER}:{{PLAIN}}{PASSWORD}::::::\n"),
        )
        .expect("writing the passwd-file");

        let d = dir.display();
        let addresses: Vec<String> = [self.listeners.imap, self.listeners.imaps]
            .into_iter()
            .flatten()
            .map(|a| a.ip().to_string())
            .collect();
        let mut listeners = String::new();
        if let Some(imap) = self.listeners.imap {
            listeners.push_str(&format!(
                "  inet_listener imap {{\n    address = {}\n    port = {}\n    haproxy = yes\n  }}\n",
                imap.ip(),
                imap.port()
            ));
        }
        let ssl = match self.listeners.imaps {
            Some(imaps) => {
                listeners.push_str(&format!(
                    "  inet_listener imaps {{\n    address = {}\n    port = {}\n    ssl = yes\n    \
                     haproxy = yes\n  }}\n",
                    imaps.ip(),
                    imaps.port()
                ));
                let (cert, key) = tls::self_signed(dir, IMAPS_NAME);
                format!(
                    "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n",
                    cert.display(),
                    key.display()
                )
            }
            None => "ssl = no\n".to_owned(),
        };
        let trusted = match self.listeners.trusted {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        let config = format!(
            "# A private Dovecot for one kgate test (tests/src/dovecot.rs).\n\
             instance_name = {instance}\n\
             base_dir = {d}/run\n\
             state_dir = {d}/state\n\
             log_path = {d}/dovecot.log\n\
             info_log_path = {d}/dovecot.log\n\
             protocols = imap\n\
             listen = {listen}\n\
             {ssl}\
             # Logins in clear on the plain port: the client is in the lab, not on the internet.\n\
             disable_plaintext_auth = no\n\
             auth_mechanisms = plain login\n\
             haproxy_trusted_networks = {trusted}\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/passwd\n}}\n\
             userdb {{\n  driver = static\n  args = uid={NOBODY} gid={NOGROUP} home={d}/mail/%u\n}}\n\
             mail_location = maildir:~/Maildir\n\
             first_valid_uid = 1\n\
             first_valid_gid = 1\n\
             service imap-login {{\n{listeners}}}\n",
            instance = self.instance,
            listen = addresses.join(", "),
        );
        fs::write(self.config_path(), config).expect("writing dovecot.conf");
    }

    fn shutdown(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        if let Ok(None) = master.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(master.id() as libc::pid_t, libc::SIGTERM) };
            if proc::wait_timeout(&mut master, STOP_TIMEOUT).is_none() {
                let _ = master.kill();
                let _ = master.wait();
            }
        }
        kill_instance(&self.instance, &self.config_path());
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dovecot")
            .field("listeners", &self.listeners)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// `nobody` and `nogroup` on Debian: the owner of the lab's mail.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// The lines of `log` with a severity above `Info:`.
pub fn trouble(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            // "Dec 04 05:48:03 imap-login: Error: haproxy: ..."
            line.split_once(": ")
                .is_some_and(|(_, text)| TROUBLE.iter().any(|t| text.starts_with(t)))
        })
        .map(str::to_owned)
        .collect()
}

/// Whether `line` is how Dovecot logs a health check from `rip` to `lip`: a greeting,
/// LOGOUT and nothing else ("Aborted login by logging out"). The seconds it names are
/// whole seconds of the clock, so a check of a few milliseconds across a second's
/// turn says 1; any figure counts. What follows `lip` (", TLS", the session id) is
/// the caller's to look at.
pub fn is_check_line(line: &str, rip: IpAddr, lip: IpAddr) -> bool {
    const BEFORE: &str =
        "imap-login: Info: Disconnected: Aborted login by logging out (no auth attempts in ";
    line.split_once(BEFORE).is_some_and(|(_, rest)| {
        rest.split_once(" secs): ").is_some_and(|(seconds, rest)| {
            !seconds.is_empty()
                && seconds.bytes().all(|b| b.is_ascii_digit())
                && rest.starts_with(&format!("user=<>, rip={rip}, lip={lip}"))
        })
    })
}

/// Logs in as [`USER`] over plain IMAP at `to` and logs out; returns the transcript
/// (`C: `/`S: ` lines). An error when a reply is missing or not OK.
pub fn imap_login(to: SocketAddr, timeout: Duration) -> io::Result<String> {
    imap_login_on(TcpStream::connect_timeout(&to, timeout)?, timeout)
}

/// [`imap_login`] on a connected stream (one that sent its PROXY header, say).
pub fn imap_login_on(stream: TcpStream, timeout: Duration) -> io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut transcript = String::new();
    let mut read_line = |transcript: &mut String| -> io::Result<String> {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the server closed early:\n{transcript}"),
            ));
        }
        transcript.push_str(&format!("S: {}\n", line.trim_end()));
        Ok(line)
    };
    let greeting = read_line(&mut transcript)?;
    if !greeting.starts_with("* OK") {
        return Err(io::Error::other(format!("no greeting:\n{transcript}")));
    }
    for (tag, command) in [
        ("a1", format!("LOGIN {USER} {PASSWORD}")),
        ("a2", "LOGOUT".to_owned()),
    ] {
        transcript.push_str(&format!("C: {tag} {command}\n"));
        writer.write_all(format!("{tag} {command}\r\n").as_bytes())?;
        loop {
            let line = read_line(&mut transcript)?;
            if let Some(status) = line.strip_prefix(&format!("{tag} ")) {
                if !status.starts_with("OK") {
                    return Err(io::Error::other(format!("{tag} failed:\n{transcript}")));
                }
                break;
            }
        }
    }
    Ok(transcript)
}

/// SIGKILLs the processes of this instance (the master started with `-c <config>`,
/// its children named `dovecot-<instance>/...`) and waits for them to go. Nothing
/// else is touched.
fn kill_instance(instance: &str, config: &Path) {
    let child_prefix = format!("dovecot-{instance}/").into_bytes();
    let master = format!("{}\0", config.display()).into_bytes();
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let pids = proc::pids_whose_cmdline(|cmdline| {
            cmdline.starts_with(&child_prefix)
                || (cmdline.starts_with(b"/usr/sbin/dovecot\0")
                    && cmdline.windows(master.len()).any(|w| w == master))
        });
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("dovecot {instance}: processes {pids:?} survived SIGKILL");
            return;
        }
        for pid in pids {
            // SAFETY: kill(2); the pid was just seen running this instance.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_line_may_name_any_whole_seconds_but_only_its_addresses() {
        let (rip, lip) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let line = |seconds: &str, rip: &str| {
            format!(
                "Dec 04 09:49:48 imap-login: Info: Disconnected: Aborted login by logging out \
                 (no auth attempts in {seconds} secs): user=<>, rip={rip}, lip=10.0.0.2, TLS"
            )
        };
        assert!(is_check_line(&line("0", "10.0.0.1"), rip, lip));
        assert!(is_check_line(&line("1", "10.0.0.1"), rip, lip));
        assert!(!is_check_line(&line("", "10.0.0.1"), rip, lip));
        assert!(!is_check_line(&line("1.5", "10.0.0.1"), rip, lip));
        assert!(!is_check_line(&line("0", "10.0.0.9"), rip, lip));
        assert!(!is_check_line(
            "imap-login: Info: Disconnected: Connection closed (no auth attempts in 0 secs): \
             user=<>, rip=10.0.0.1, lip=10.0.0.2",
            rip,
            lip
        ));
    }
    use crate::lab::skip_without_root;
    use crate::smtp::{LOCAL_V2, proxy_v2};

    const TIMEOUT: Duration = Duration::from_secs(20);

    #[test]
    fn trouble_is_warnings_errors_fatals_and_panics() {
        let log = "Dec 04 05:48:03 imap-login: Error: haproxy: Client disconnected: Failed to read valid HAproxy data (rip=127.0.0.1)\n\
                   Dec 04 05:48:03 imap-login: Info: Login: user=<alice>, method=PLAIN, rip=10.9.9.9\n\
                   Dec 04 05:48:03 master: Warning: Time moved backwards\n\
                   Dec 04 05:48:03 imap(alice)<1><s>: Info: Disconnected: Logged out Error: no\n";
        let found = trouble(log);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[1].ends_with("Time moved backwards"));
    }

    #[test]
    fn dovecot_logs_the_client_address_from_the_proxy_header_and_warns_without_one() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let imap = SocketAddr::new(lab.backend(0).v4().into(), 143);
        let dovecot = Dovecot::start(
            &lab,
            lab.backend(0),
            Listeners {
                imap: Some(imap),
                imaps: None,
                trusted: lab.gateway_v4_toward_backend(0).into(),
            },
        );

        // From the gateway, as kgate: a header naming the client, then a login.
        let client = SocketAddr::new(lab.client().v4().into(), 40001);
        let frontend = SocketAddr::new(lab.gateway().v4().into(), 143);
        let header = proxy_v2(client, frontend);
        let transcript = lab.gateway().run(move || {
            let stream = TcpStream::connect_timeout(&imap, TIMEOUT).unwrap();
            (&stream).write_all(&header).unwrap();
            imap_login_on(stream, TIMEOUT).unwrap()
        });
        assert!(transcript.contains("a1 OK"), "{transcript}");
        let expected = format!(
            "imap-login: Info: Login: user=<{USER}>, method=PLAIN, rip={}, lip={}",
            client.ip(),
            frontend.ip()
        );
        assert!(
            dovecot.wait_for_log(&expected, TIMEOUT),
            "{expected:?} not in:\n{}",
            dovecot.log()
        );
        assert_eq!(trouble(&dovecot.log()), Vec::<String>::new());

        // A LOCAL header (a health check): the gateway's own address, no complaint.
        lab.gateway().run(move || {
            let mut stream = TcpStream::connect_timeout(&imap, TIMEOUT).unwrap();
            stream.write_all(&LOCAL_V2).unwrap();
            stream.write_all(b"a1 LOGOUT\r\n").unwrap();
            let mut rest = String::new();
            let _ = io::Read::read_to_string(&mut stream, &mut rest);
        });
        let gateway = lab.gateway_v4_toward_backend(0);
        assert!(
            dovecot.wait_for_log(&format!("user=<>, rip={gateway}"), TIMEOUT),
            "{}",
            dovecot.log()
        );
        assert_eq!(trouble(&dovecot.log()), Vec::<String>::new());

        // Negative control: no header at all makes Dovecot log an error, so the tests
        // that find none would see one.
        lab.gateway().run(move || {
            let mut stream = TcpStream::connect_timeout(&imap, TIMEOUT).unwrap();
            stream.write_all(b"a1 LOGOUT\r\n").unwrap();
            let mut rest = String::new();
            let _ = io::Read::read_to_string(&mut stream, &mut rest);
        });
        assert!(
            dovecot.wait_for_log("Failed to read valid HAproxy data", TIMEOUT),
            "{}",
            dovecot.log()
        );
        assert_eq!(trouble(&dovecot.log()).len(), 1, "{}", dovecot.log());

        let instance = dovecot.instance.clone();
        let config = dovecot.config_path();
        drop(dovecot);
        let config = config.as_os_str().as_encoded_bytes();
        let left = proc::pids_whose_cmdline(|c| {
            c.starts_with(format!("dovecot-{instance}/").as_bytes())
                || c.windows(config.len()).any(|w| w == config)
        });
        assert!(
            left.is_empty(),
            "Dovecot processes survived the drop: {left:?}"
        );
    }
}
