use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::{config::Config, control, handover};

pub fn upgrade(
    config: &Path,
    socket: Option<PathBuf>,
    binary: Option<PathBuf>,
) -> anyhow::Result<()> {
    let socket = match socket {
        Some(socket) => socket,
        None => Config::load(config)?.global.control_socket,
    };
    let binary = match binary {
        Some(binary) => binary,
        // This very binary: after a package upgrade, the one just installed.
        None => std::env::current_exe()
            .context("cannot tell where this kgate binary is: give --binary")?,
    };
    let binary = binary.canonicalize().with_context(|| {
        format!(
            "{}: give the path of the new kgate binary",
            binary.display()
        )
    })?;
    let request = format!("upgrade {}", binary.display());
    // The running kgate may wait TIMEOUT for the new one, then as long to stop it.
    let reply = control::request_within(&socket, &request, handover::TIMEOUT * 3)?;
    match reply.strip_prefix("ok ") {
        Some(done) => {
            println!("{done}");
            Ok(())
        }
        None => bail!("{}", reply.trim_start_matches("error: ")),
    }
}
