//! A real Postfix (Debian's `postfix` package) in a lab namespace, as it runs behind the
//! gateway today: postscreen on `<addr>:<port>` reading a PROXY header
//! (`postscreen_upstream_proxy_protocol = haproxy`), smtpd behind it, mail for
//! `kgate.test` delivered to one Maildir.
//!
//! Each [`Postfix`] is a private instance that leaves the system's /etc/postfix alone:
//! - its own `config_directory` (main.cf, master.cf written here), `queue_directory`,
//!   `data_directory` and Maildir, all under the lab's temp directory; Postfix's own
//!   files (`meta_directory`, daemons) are the package's;
//! - started with `postfix -c DIR check` (creates the queue's subdirectories with their
//!   owners) and `postfix -c DIR start`, as root, with the command entering the
//!   namespace by `setns` only ([`NetNs::command`]), so master and its children live in
//!   the namespace and bind the backend's address;
//! - its log goes to a file (`maillog_file`, written by `postlogd`: there is no syslog
//!   here), which [`Postfix::log`] reads;
//! - nothing runs chrooted and no DNS is used (`smtpd_peername_lookup = no`: a lab
//!   namespace has no resolver), so no files are copied anywhere.
//!
//! Dropping it runs `postfix -c DIR stop` (bounded), then kills whatever process still
//! carries this instance's `MAIL_CONFIG` in its environment.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::lab::{Lab, NetNs};
use crate::proc;

/// The domain this Postfix accepts mail for (any local part).
pub const MAIL_DOMAIN: &str = "kgate.test";

/// postscreen's `postscreen_greet_wait` (the default when not under stress): how long a
/// client it does not know yet waits between `220-` and the final `220 `.
pub const GREET_WAIT: Duration = Duration::from_secs(6);

/// Deadline for `postfix check/start/stop` (stop itself gives up after 5 s).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Postfix::start`] waits for the listener.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `Drop` waits for killed leftovers.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often log and listener polls look again.
const POLL: Duration = Duration::from_millis(20);

/// Log lines that count as trouble: Postfix's severities above `info`.
const TROUBLE: [&str; 4] = ["warning:", "error:", "fatal:", "panic:"];

/// A running private Postfix. See the module documentation.
pub struct Postfix {
    dir: PathBuf,
    ns: NetNs,
    listen: SocketAddr,
    stopped: bool,
}

impl Postfix {
    /// Starts Postfix in `ns` with postscreen on `listen` (the namespace's own address
    /// and a port), and waits until it listens. Panics with the log if it cannot start.
    pub fn start(lab: &Lab, ns: &NetNs, listen: SocketAddr) -> Postfix {
        Postfix::start_with(lab, ns, listen, &[])
    }

    /// Like [`Postfix::start`], with extra `main.cf` lines (`"postscreen_greet_wait = 2s"`),
    /// which override the defaults written before them.
    pub fn start_with(lab: &Lab, ns: &NetNs, listen: SocketAddr, main_cf: &[&str]) -> Postfix {
        Postfix::start_with_services(lab, ns, listen, main_cf, &[])
    }

    /// Like [`Postfix::start_with`], with more `master.cf` services: smtpd on other
    /// ports, say (`"10.200.10.2:30587 inet n - n - - smtpd -o ..."`).
    pub fn start_with_services(
        lab: &Lab,
        ns: &NetNs,
        listen: SocketAddr,
        main_cf: &[&str],
        services: &[String],
    ) -> Postfix {
        let dir = lab
            .temp_dir()
            .join(format!("postfix-{}-{}", ns.name(), listen.port()));
        let postfix = Postfix {
            dir,
            ns: ns.clone(),
            listen,
            stopped: true,
        };
        postfix.write_config(main_cf, services);
        postfix.postfix("check");
        let mut postfix = postfix;
        postfix.stopped = false;
        // From here on a panic drops `postfix`, which stops it.
        postfix.postfix("start");
        postfix.wait_listening();
        postfix
    }

    /// The address postscreen listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The instance's directory: `config/`, `spool/`, `data/`, `mail/`, `maillog`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("maillog")
    }

    /// The whole log so far ("" before the first line).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A position in the log, for [`Postfix::log_since`].
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// The log written after `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        self.log().get(mark..).unwrap_or_default().to_owned()
    }

    /// The log lines with a `warning:`, `error:`, `fatal:` or `panic:`.
    pub fn warnings_and_errors(&self) -> Vec<String> {
        trouble(&self.log())
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

    /// The messages delivered so far (whole files from the Maildir's `new/`).
    pub fn delivered(&self) -> Vec<String> {
        let new = self.dir.join("mail/inbox/new");
        let Ok(entries) = fs::read_dir(&new) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        files
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .collect()
    }

    /// Stops it (bounded); Drop does the same.
    pub fn stop(self) {}

    fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    fn write_config(&self, extra: &[&str], services: &[String]) {
        let config = self.config_dir();
        let mail = self.dir.join("mail");
        for dir in [&config, &mail, &self.dir.join("spool")] {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        let (uid, gid) = postfix_ids();
        // The virtual delivery agent writes the Maildir as the postfix user.
        chown(&mail, uid, gid);

        let dir = self.dir.display();
        let ip = self.listen.ip();
        let (interface, service) = if ip.is_ipv6() {
            (format!("[{ip}]"), format!("[{ip}]:{}", self.listen.port()))
        } else {
            (ip.to_string(), self.listen.to_string())
        };
        let mut main_cf = format!(
            "# A private Postfix for one kgate test (tests/src/postfix.rs).\n\
             compatibility_level = 3.6\n\
             queue_directory = {dir}/spool\n\
             data_directory = {dir}/data\n\
             maillog_file = {dir}/maillog\n\
             maillog_file_prefixes = {dir}\n\
             myhostname = mx.{MAIL_DOMAIN}\n\
             mydomain = {MAIL_DOMAIN}\n\
             myorigin = $myhostname\n\
             mydestination =\n\
             inet_interfaces = {interface}\n\
             inet_protocols = all\n\
             mynetworks = 127.0.0.0/8 10.200.0.0/16 [::1]/128 [fd00:200::]/32\n\
             # postscreen screens every client, as it does the internet's in production\n\
             # (the default, permit_mynetworks, would wave the whole lab through).\n\
             postscreen_access_list =\n\
             postscreen_upstream_proxy_protocol = haproxy\n\
             # No resolver in a lab namespace.\n\
             smtpd_peername_lookup = no\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             biff = no\n\
             virtual_mailbox_domains = {MAIL_DOMAIN}\n\
             virtual_mailbox_base = {dir}/mail\n\
             virtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n\
             virtual_minimum_uid = 1\n"
        );
        for line in extra {
            main_cf.push_str(line);
            main_cf.push('\n');
        }
        // Services: type, private, unprivileged, chroot, wakeup, process limit, command.
        // Nothing chrooted: no copies of /etc files in the queue directory are needed.
        let mut master_cf = format!(
            "{service} inet n - n - 1 postscreen\n\
             smtpd pass - - n - - smtpd\n\
             postlog unix-dgram n - n - 1 postlogd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             proxymap unix - - n - - proxymap\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             virtual unix - n n - - virtual\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             tlsmgr unix - - n 1000? 1 tlsmgr\n"
        );
        for service in services {
            master_cf.push_str(service);
            master_cf.push('\n');
        }
        for (name, text) in [("main.cf", main_cf), ("master.cf", master_cf)] {
            let path = config.join(name);
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }

    /// Runs `postfix -c CONFIG <action>` in the namespace; panics with its output and
    /// the log when it fails.
    fn postfix(&self, action: &str) {
        let mut cmd = self.ns.command("postfix");
        cmd.arg("-c").arg(self.config_dir()).arg(action);
        let output = proc::run_with_timeout(&mut cmd, COMMAND_TIMEOUT).unwrap_or_else(|e| {
            panic!("`postfix {action}` for {}: {e} (is the Debian package `postfix` installed? `cargo xtask test` installs it)", self.dir.display())
        });
        if !output.status.success() {
            panic!(
                "`postfix -c {} {action}` failed ({}):\n{}{}\nits log:\n{}",
                self.config_dir().display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
    }

    /// Waits until postscreen listens, by looking at the namespace's sockets (a test
    /// connection would show up in the log).
    fn wait_listening(&self) {
        if !self.ns.wait_listening(self.listen.port(), START_TIMEOUT) {
            panic!(
                "Postfix did not listen on {} within {START_TIMEOUT:?}; its log:\n{}",
                self.listen,
                self.log()
            );
        }
    }

    fn shutdown(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // Without its namespace (the lab was dropped first) there is nothing to stop
        // politely: the lab killed what ran inside. Killing leftovers is still right.
        if self.ns.path().exists() {
            let mut cmd = self.ns.command("postfix");
            cmd.arg("-c").arg(self.config_dir()).arg("stop");
            if let Err(e) = proc::run_with_timeout(&mut cmd, COMMAND_TIMEOUT) {
                eprintln!("postfix stop for {}: {e}", self.dir.display());
            }
        }
        kill_instance(&self.config_dir());
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Postfix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postfix")
            .field("listen", &self.listen)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The lines of `log` with a severity above info, but for the machine's clock.
pub fn trouble(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            // "<date> <host> postfix/<program>[<pid>]: warning: ..."
            line.split_once("]: ").is_some_and(|(_, text)| {
                TROUBLE.iter().any(|t| text.starts_with(t))
                    && !CLOCK_WARNINGS.iter().any(|w| text.starts_with(w))
            })
        })
        .map(str::to_owned)
        .collect()
}

/// What cleanup says of a queue file stamped in a later second than `time()` tells.
/// Since Linux 6.13 a file's times can be fine-grained while `time()` reads the clock
/// as of the last tick: a file written in the milliseconds before a second's turn is
/// "1 seconds ahead". About this machine, not about the mail or kgate.
const CLOCK_WARNINGS: &[&str] = &[
    "warning: file system clock is 1 seconds ahead of local clock",
    "warning: resetting file time stamps - this hurts performance",
];

/// The uid and gid of the `postfix` user.
fn postfix_ids() -> (u32, u32) {
    let name = c"postfix";
    // SAFETY: getpwnam with a valid C string; the result is read at once, on this thread.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !entry.is_null(),
        "no `postfix` user: install the Debian package `postfix` (`cargo xtask test` does)"
    );
    // SAFETY: non-null pointer to a passwd entry owned by libc.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// SIGKILLs every process whose environment names this instance's configuration
/// (`MAIL_CONFIG=<config dir>`, which `postfix -c` exports to master and its children),
/// and waits for them to go. Nothing else is touched.
fn kill_instance(config_dir: &Path) {
    let needle = format!("MAIL_CONFIG={}", config_dir.display()).into_bytes();
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let pids = instance_pids(&needle);
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "postfix {}: processes {pids:?} survived SIGKILL",
                config_dir.display()
            );
            return;
        }
        for pid in pids {
            // SAFETY: kill(2); the pid was just seen with our instance's environment.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(POLL);
    }
}

fn instance_pids(needle: &[u8]) -> Vec<u32> {
    let own = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            // A zombie's environ reads empty: it is dead already.
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::skip_without_root;
    use crate::smtp::{proxy_v2, send_mail};
    use std::net::IpAddr;

    const TIMEOUT: Duration = Duration::from_secs(20);

    #[test]
    fn trouble_is_warnings_errors_fatals_and_panics() {
        let log = "Nov 25 01:16:39 mx postfix/postscreen[1]: warning: haproxy read: EOF\n\
                   Nov 25 01:16:39 mx postfix/postscreen[1]: CONNECT from [10.200.1.2]:1 to [10.200.10.2]:2525\n\
                   Nov 25 01:16:39 mx postfix/smtpd[2]: error: open database /etc/aliases.db\n\
                   Nov 25 01:16:39 mx postfix/master[3]: fatal: bind 10.200.10.2 port 2525\n\
                   Nov 25 01:16:39 mx postfix/smtpd[2]: disconnect from x warning: not a severity\n\
                   Nov 25 01:16:40 mx postfix/cleanup[4]: warning: file system clock is 1 seconds ahead of local clock\n\
                   Nov 25 01:16:40 mx postfix/cleanup[4]: warning: resetting file time stamps - this hurts performance\n\
                   Nov 25 01:16:40 mx postfix/cleanup[4]: warning: file system clock is 9 seconds ahead of local clock\n";
        let found = trouble(log);
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(
            found[3].ends_with("9 seconds ahead of local clock"),
            "not a tick's worth"
        );
        assert!(found[0].ends_with("haproxy read: EOF"));
    }

    #[test]
    fn postfix_logs_the_client_address_from_the_proxy_header_and_nothing_alarming() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let listen = SocketAddr::new(lab.backend(0).v4().into(), 2525);
        let postfix = Postfix::start(&lab, lab.backend(0), listen);
        assert!(
            postfix.wait_for_log("daemon started", TIMEOUT),
            "{}",
            postfix.log()
        );

        // From the gateway, as kgate: the header names the client namespace's address.
        let client = SocketAddr::new(lab.client().v4().into(), 40001);
        let header = proxy_v2(client, listen);
        let transcript = lab.gateway().run(move || {
            send_mail(
                listen,
                Some(&header),
                "client.kgate.test",
                "sender@example.org",
                &format!("someone@{MAIL_DOMAIN}"),
                "Subject: hello\n\nfrom the lab\n.dot-stuffed line\n",
                TIMEOUT,
            )
            .unwrap()
        });
        // postscreen's greeting to a client it does not know: 220-, the wait, 220.
        let greeting = transcript.lines().nth(1).unwrap_or_default();
        assert!(greeting.starts_with("S: 220-"), "{transcript}");

        let client_ip = IpAddr::from(lab.client().v4());
        assert!(
            postfix.wait_for_log("status=sent", TIMEOUT),
            "no delivery logged:\n{}",
            postfix.log()
        );
        let log = postfix.log();
        for needle in [
            format!(
                "CONNECT from [{client_ip}]:40001 to [{}]:{}",
                listen.ip(),
                listen.port()
            ),
            format!("PASS NEW [{client_ip}]:40001"),
            format!("connect from unknown[{client_ip}]"),
            format!("client=unknown[{client_ip}]"),
            format!("to=<someone@{MAIL_DOMAIN}>"),
        ] {
            assert!(
                log.contains(&needle),
                "{needle:?} missing from the log:\n{log}"
            );
        }
        let delivered = postfix.delivered();
        assert_eq!(delivered.len(), 1, "{log}");
        assert!(delivered[0].contains("Subject: hello"));
        assert!(delivered[0].contains("\n.dot-stuffed line\n"));
        assert_eq!(postfix.warnings_and_errors(), Vec::<String>::new(), "{log}");

        let config = postfix.dir().join("config");
        drop(postfix);
        assert!(
            instance_pids(format!("MAIL_CONFIG={}", config.display()).as_bytes()).is_empty(),
            "Postfix processes survived the drop"
        );
    }

    #[test]
    fn swaks_can_send_through_postscreen_with_a_proxy_header() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let listen = SocketAddr::new(lab.backend(0).v4().into(), 2525);
        // A short greet wait: this test is about swaks's options, not postscreen's timing.
        let postfix = Postfix::start_with(
            &lab,
            lab.backend(0),
            listen,
            &["postscreen_greet_wait = 1s"],
        );
        let client_ip = lab.client().v4();
        let mut swaks = lab.gateway().command("swaks");
        swaks
            .args([
                "--server",
                &listen.ip().to_string(),
                "--port",
                &listen.port().to_string(),
            ])
            .args([
                "--to",
                &format!("swaks@{MAIL_DOMAIN}"),
                "--from",
                "sender@example.org",
            ])
            .args(["--helo", "client.kgate.test", "--timeout", "20"])
            .args(["--proxy-version", "2", "--proxy-family", "AF_INET"])
            .args([
                "--proxy-source",
                &client_ip.to_string(),
                "--proxy-source-port",
                "40002",
            ])
            .args([
                "--proxy-dest",
                &listen.ip().to_string(),
                "--proxy-dest-port",
                &listen.port().to_string(),
            ]);
        let output = proc::run_with_timeout(&mut swaks, TIMEOUT).expect("running swaks");
        assert!(
            output.status.success(),
            "swaks failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            postfix.wait_for_log("status=sent", TIMEOUT),
            "{}",
            postfix.log()
        );
        assert!(
            postfix
                .log()
                .contains(&format!("CONNECT from [{client_ip}]:40002")),
            "{}",
            postfix.log()
        );
        assert_eq!(postfix.warnings_and_errors(), Vec::<String>::new());
    }
}
