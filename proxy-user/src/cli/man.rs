//! `kgate man DIR` (hidden): the manual pages, generated from the command line's own
//! definitions with clap_mangen, so they say what `--help` says. `cargo xtask deb`
//! runs it for the Debian package.

use std::{fs, path::Path};

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// Writes `kgate.1` and a page per subcommand (`kgate-run.1`, `kgate-server-set.1`...)
/// into `dir`.
pub fn write(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let command = Cli::command();
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
    Ok(())
}
