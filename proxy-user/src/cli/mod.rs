//! The `kgate` command line: one file per subcommand.

mod block;
mod check;
mod man;
mod reload;
mod run;
mod server;
mod status;
mod upgrade;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
        #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
        config: PathBuf,
    },
    /// Validates a configuration file without touching anything; exit code 1 if invalid.
    ///
    /// Example: kgate check -c /etc/kgate/kgate.toml
    Check {
        /// The configuration file.
        #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
        config: PathBuf,
    },
    /// Shows the running kgate: its frontends (connections, refusals, rates), each
    /// backend's servers (state with why and since when, last check, connections,
    /// bytes) and the XDP counters; the same numbers as its stats page.
    ///
    /// Example: kgate status
    /// Example: kgate status --json --socket /run/kgate/kgate.sock
    Status {
        /// The configuration file, for `control_socket`.
        #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
        config: PathBuf,
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
        /// The configuration file, for `control_socket`.
        #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
        config: PathBuf,
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
        /// The configuration file, for `control_socket`.
        #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
        config: PathBuf,
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
        /// The configuration file, for `control_socket`.
        #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
        config: PathBuf,
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
            } => status::status(&config, socket, json),
            Command::Reload { config, socket } => reload::reload(&config, socket),
            Command::Upgrade {
                config,
                socket,
                binary,
            } => upgrade::upgrade(&config, socket, binary),
            Command::Server(ServerCommand::Set {
                server,
                state,
                config,
                socket,
            }) => server::set(&config, socket, &server, &state),
            Command::Block(command) => block::block(command),
            Command::Man { dir } => man::write(&dir),
        }
    }
}
