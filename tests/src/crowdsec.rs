//! A real CrowdSec local API (Debian's `crowdsec` package) in a lab namespace: the LAPI
//! alone (`crowdsec -no-cs`: no agent reading logs), on the namespace's loopback, as a
//! gateway runs it next to kgate.
//!
//! Each [`Crowdsec`] is a private instance that leaves the system's /etc/crowdsec and
//! /var/lib/crowdsec alone, and talks to nothing outside the lab:
//! - its own `config.yaml`, `profiles.yaml` and `simulation.yaml`, its SQLite database,
//!   logs and an empty hub index, all under the lab's temp directory;
//! - no `online_client` (Central API): no registration, no community blocklist, no
//!   hub download; no Prometheus listener;
//! - a machine registered with `cscli machines add` (its credentials in the instance's
//!   directory): `cscli decisions add/delete` go through the LAPI with them, as they do
//!   on a gateway; `cscli bouncers add` makes kgate's key.
//!
//! Dropping it ends the `crowdsec` process (SIGTERM, then SIGKILL).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::lab::{Lab, NetNs};
use crate::proc;

/// Where the LAPI listens, inside its namespace.
pub const LAPI_PORT: u16 = 8080;

/// Deadline for one `cscli` command.
const CSCLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Crowdsec::start`] waits for the LAPI to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long stopping waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running private CrowdSec LAPI. See the module documentation.
pub struct Crowdsec {
    dir: PathBuf,
    ns: NetNs,
    child: Option<Child>,
}

impl Crowdsec {
    /// Writes the instance's configuration under the lab's temp directory, registers
    /// a machine for `cscli`, and starts the LAPI in `ns` on 127.0.0.1:[`LAPI_PORT`].
    pub fn start(lab: &Lab, ns: &NetNs) -> Crowdsec {
        let dir = lab.temp_dir().join(format!("crowdsec-{}", ns.name()));
        let mut crowdsec = Crowdsec {
            dir,
            ns: ns.clone(),
            child: None,
        };
        crowdsec.write_config();
        let credentials = crowdsec.dir.join("local_api_credentials.yaml");
        crowdsec.cscli(
            &["machines", "add", "--auto", "--force", "-f"],
            &[&credentials],
        );
        crowdsec.start_again();
        crowdsec
    }

    /// The LAPI's URL, as kgate's `[crowdsec] url` names it (from `ns`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{LAPI_PORT}/")
    }

    /// The instance's directory: config, database, logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers bouncer `name` and returns its API key.
    pub fn add_bouncer(&self, name: &str) -> String {
        let out = self.cscli(&["bouncers", "add", name, "-o", "raw"], &[]);
        let key = out.lines().last().unwrap_or_default().trim().to_owned();
        assert!(
            key.len() >= 16 && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "`cscli bouncers add {name}` printed no key: {out:?}"
        );
        key
    }

    /// `cscli decisions ARGS` (add, delete, list), through the LAPI; returns its output.
    pub fn decisions(&self, args: &[&str]) -> String {
        let mut all = vec!["decisions"];
        all.extend_from_slice(args);
        self.cscli(&all, &[])
    }

    /// Stops the LAPI (SIGTERM, then SIGKILL); its database stays. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            if proc::wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts the LAPI (again, after [`Crowdsec::stop`]) and waits until it listens.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the LAPI runs already");
        let log = fs::File::create(self.dir.join("crowdsec.out")).expect("creating crowdsec.out");
        let child = self
            .ns
            .command("crowdsec")
            .arg("-c")
            .arg(self.config())
            .arg("-no-cs")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating a file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting crowdsec: {e} (is the Debian package `crowdsec` installed? `cargo xtask test` installs it)")
            });
        self.child = Some(child);
        if !self.ns.wait_listening(LAPI_PORT, START_TIMEOUT) {
            panic!(
                "the CrowdSec LAPI did not listen on port {LAPI_PORT} within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
        }
    }

    /// What the LAPI wrote: its output and its API log.
    pub fn log(&self) -> String {
        ["crowdsec.out", "log/crowdsec_api.log", "log/crowdsec.log"]
            .iter()
            .filter_map(|name| fs::read_to_string(self.dir.join(name)).ok())
            .collect::<Vec<_>>()
            .join("")
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// Runs `cscli -c CONFIG ARGS PATHS` in the namespace; panics with its output
    /// unless it succeeds. Returns stdout and stderr (cscli reports on stderr).
    fn cscli(&self, args: &[&str], paths: &[&Path]) -> String {
        let mut cmd = self.ns.command("cscli");
        cmd.arg("-c").arg(self.config()).args(args).args(paths);
        let out = proc::run_with_timeout(&mut cmd, CSCLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("running cscli {}: {e}", args.join(" ")));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "`cscli {}` failed ({}):\n{text}\nthe LAPI's log:\n{}",
            args.join(" "),
            out.status,
            self.log()
        );
        text
    }

    fn write_config(&self) {
        let dir = &self.dir;
        for sub in ["data", "hub", "log"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        }
        let d = dir.display();
        let files = [
            // No hub items are used by the LAPI alone; cscli wants an index to read.
            ("hub/.index.json", "{}\n".to_owned()),
            ("simulation.yaml", "simulation: off\n".to_owned()),
            (
                "profiles.yaml",
                "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && \
                 Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\n\
                 on_success: break\n"
                    .to_owned(),
            ),
            (
                "config.yaml",
                format!(
                    "# A private CrowdSec LAPI for one kgate test (tests/src/crowdsec.rs).\n\
                     common:\n  daemonize: false\n  log_media: file\n  log_level: info\n  \
                     log_dir: {d}/log/\n  working_dir: {d}\n\
                     config_paths:\n  config_dir: {d}/\n  data_dir: {d}/data/\n  \
                     simulation_path: {d}/simulation.yaml\n  hub_dir: {d}/hub/\n  \
                     index_path: {d}/hub/.index.json\n  notification_dir: {d}/notifications/\n  \
                     plugin_dir: /usr/lib/crowdsec/plugins/\n\
                     cscli:\n  output: human\n  color: no\n\
                     db_config:\n  log_level: info\n  type: sqlite\n  db_path: {d}/data/crowdsec.db\n  \
                     use_wal: false\n\
                     api:\n  client:\n    credentials_path: {d}/local_api_credentials.yaml\n  \
                     server:\n    log_level: info\n    listen_uri: 127.0.0.1:{LAPI_PORT}\n    \
                     profiles_path: {d}/profiles.yaml\n    trusted_ips:\n      - 127.0.0.1\n\
                     prometheus:\n  enabled: false\n"
                ),
            ),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }
}

impl Drop for Crowdsec {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Crowdsec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crowdsec")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}
