//! The `kgate` command line: one file per subcommand.

mod block;
mod check;
mod man;
mod reload;
mod run;
mod server;
mod status;
mod upgrade;

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::{
    config::{Config, DEFAULT_CONTROL_SOCKET},
    control::RequestError,
};

/// The configuration file when `-c` is not given.
const DEFAULT_CONFIG: &str = "/etc/kgate/kgate.toml";

#[derive(Parser)]
#[command(
    name = "kgate",
    version,
    about = "A TCP proxy that sends the client address \
    in a PROXY protocol header and splices connections in the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the proxy.
    ///
    /// Example: kgate run -c /etc/kgate/kgate.toml
    Run {
        /// The configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validates a configuration file without touching anything; exit code 1 if invalid.
    ///
    /// Example: kgate check -c /etc/kgate/kgate.toml
    Check {
        /// The configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Shows the running kgate: its frontends (connections, refusals, rates), each
    /// backend's servers (state with why and since when, last check, connections,
    /// bytes) and the XDP counters; the same numbers as its stats page.
    ///
    /// Example: kgate status
    /// Example: kgate status --json --socket /run/kgate/kgate.sock
    Status {
        /// The configuration file, for `control_socket` [default: /etc/kgate/kgate.toml,
        /// or /run/kgate/kgate.sock when that file cannot be read]
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The control socket (instead of the configuration's `control_socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Prints JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Makes the running kgate re-read its configuration file and apply what changed,
    /// without dropping connections. A file that does not validate changes nothing:
    /// the reason is printed and the exit code is 1.
    ///
    /// Example: kgate reload
    Reload {
        /// The configuration file, for `control_socket` [default: /etc/kgate/kgate.toml,
        /// or /run/kgate/kgate.sock when that file cannot be read]
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The control socket (instead of the configuration's `control_socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Replaces the running kgate with a new binary without refusing a connection: the
    /// running kgate starts the new one and hands it its listening sockets; the new one
    /// serves, the old one lets its open connections finish (up to `shutdown_timeout`)
    /// and exits. Exit code 1, and the old kgate goes on serving, if the new one cannot
    /// start (a configuration that does not validate, say).
    ///
    /// Example: kgate upgrade
    /// Example: kgate upgrade --binary /usr/bin/kgate
    Upgrade {
        /// The configuration file, for `control_socket` [default: /etc/kgate/kgate.toml,
        /// or /run/kgate/kgate.sock when that file cannot be read]
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The control socket (instead of the configuration's `control_socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The new kgate binary (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Changes a server at run time.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Blocks source prefixes in XDP, before they reach a socket ([xdp] in the config).
    #[command(subcommand)]
    Block(block::BlockCommand),
    /// Writes the manual pages (kgate.1, kgate-run.1, ...) into DIR, for the Debian
    /// package.
    #[command(hide = true)]
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Sets a server ready (takes connections when healthy), drain (no new
    /// connections, checks go on) or maint (no new connections, no checks).
    ///
    /// Example: kgate server set mail-smtp/node1 drain
    Set {
        /// BACKEND/SERVER, as named in the configuration.
        server: String,
        /// ready, drain or maint.
        state: String,
        /// The configuration file, for `control_socket` [default: /etc/kgate/kgate.toml,
        /// or /run/kgate/kgate.sock when that file cannot be read]
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The control socket (instead of the configuration's `control_socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run { config } => run::run(&config),
            Command::Check { config } => check::check(&config),
            Command::Status {
                config,
                socket,
                json,
            } => status::status(&ControlSocket::choose(config, socket)?, json),
            Command::Reload { config, socket } => {
                reload::reload(&ControlSocket::choose(config, socket)?)
            }
            Command::Upgrade {
                config,
                socket,
                binary,
            } => upgrade::upgrade(&ControlSocket::choose(config, socket)?, binary),
            Command::Server(ServerCommand::Set {
                server,
                state,
                config,
                socket,
            }) => server::set(&ControlSocket::choose(config, socket)?, &server, &state),
            Command::Block(command) => block::block(command),
            Command::Man { dir } => man::write(&dir),
        }
    }
}

/// The running kgate's control socket, for the commands that talk to it, and where
/// its path came from (for the message when nothing answers there).
pub struct ControlSocket {
    pub path: PathBuf,
    origin: String,
}

impl ControlSocket {
    /// `--socket`, else `control_socket` in the file given with `-c`, else in
    /// /etc/kgate/kgate.toml, else the default: a status needs no readable file.
    fn choose(config: Option<PathBuf>, socket: Option<PathBuf>) -> anyhow::Result<ControlSocket> {
        Self::choose_with(config, socket, Path::new(DEFAULT_CONFIG))
    }

    fn choose_with(
        config: Option<PathBuf>,
        socket: Option<PathBuf>,
        default_config: &Path,
    ) -> anyhow::Result<ControlSocket> {
        if let Some(path) = socket {
            return Ok(ControlSocket {
                path,
                origin: "given with --socket".to_owned(),
            });
        }
        if let Some(config) = config {
            let path = Config::load(&config)?.global.control_socket;
            return Ok(ControlSocket {
                path,
                origin: format!("`control_socket` in {}", config.display()),
            });
        }
        Ok(match Config::load(default_config) {
            Ok(loaded) => ControlSocket {
                path: loaded.global.control_socket,
                origin: format!("`control_socket` in {}", default_config.display()),
            },
            Err(e) => ControlSocket {
                path: PathBuf::from(DEFAULT_CONTROL_SOCKET),
                origin: format!(
                    "the default control socket, as {} could not be read: {}",
                    default_config.display(),
                    match e {
                        crate::config::ConfigError::Read { error, .. } => error.to_string(),
                        invalid => invalid.to_string(),
                    }
                ),
            },
        })
    }

    /// Sends `request` and returns the reply, waiting up to `wait`.
    pub fn request(&self, request: &str, wait: std::time::Duration) -> anyhow::Result<String> {
        match crate::control::request_within(&self.path, request, wait) {
            Err(RequestError::Unreachable { path, error }) => bail!(
                "cannot reach kgate at {} ({}): {error}: is kgate running (and are you root)? \
                 Give its control socket with --socket PATH, or its configuration with -c FILE",
                path.display(),
                self.origin
            ),
            reply => Ok(reply?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_socket_comes_from_the_default_file_or_is_the_default() {
        let dir = std::env::temp_dir().join(format!("kgate-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kgate.toml");
        std::fs::write(
            &file,
            "[global]\ncontrol_socket = \"/run/elsewhere.sock\"\n[[frontends]]\nname = \"a\"\n\
             listen = [\"127.0.0.1:25\"]\nbackend = \"b\"\n[[backends]]\nname = \"b\"\n\
             [[backends.servers]]\nname = \"s\"\naddress = \"127.0.0.1:2525\"\n",
        )
        .unwrap();
        let chosen = ControlSocket::choose_with(None, None, &file).unwrap();
        assert_eq!(chosen.path, Path::new("/run/elsewhere.sock"));

        let missing = dir.join("missing.toml");
        let chosen = ControlSocket::choose_with(None, None, &missing).unwrap();
        assert_eq!(chosen.path, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(
            chosen.origin,
            format!(
                "the default control socket, as {} could not be read: No such file or directory \
                 (os error 2)",
                missing.display()
            )
        );
        // A file named with -c must be read.
        assert!(ControlSocket::choose_with(Some(missing.clone()), None, &file).is_err());
        let given = ControlSocket::choose_with(Some(missing), Some("/x.sock".into()), &file);
        assert_eq!(given.unwrap().path, Path::new("/x.sock"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
