//! The `kgate` command line: one file per subcommand.

mod check;
mod run;

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
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run { config } => run::run(&config),
            Command::Check { config } => check::check(&config),
        }
    }
}
