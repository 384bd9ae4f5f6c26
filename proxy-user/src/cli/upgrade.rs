use std::path::PathBuf;

use anyhow::{Context as _, bail};

use super::ControlSocket;
use crate::handover;

pub fn upgrade(socket: &ControlSocket, binary: Option<PathBuf>) -> anyhow::Result<()> {
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
    let reply = socket.request(&request, handover::TIMEOUT * 3)?;
    match reply.strip_prefix("ok ") {
        Some(done) => {
            println!("{done}");
            Ok(())
        }
        None => bail!("{}", reply.trim_start_matches("error: ")),
    }
}
