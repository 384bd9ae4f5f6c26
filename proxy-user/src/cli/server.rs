use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{config::Config, control, pool::AdminState};

pub fn set(
    config: &Path,
    socket: Option<PathBuf>,
    server: &str,
    state: &str,
) -> anyhow::Result<()> {
    // Refuse a bad state here, with the same words the daemon would use.
    state.parse::<AdminState>().map_err(anyhow::Error::msg)?;
    let socket = match socket {
        Some(socket) => socket,
        None => Config::load(config)?.global.control_socket,
    };
    let reply = control::request(&socket, &format!("server set {server} {state}"))?;
    match reply.strip_prefix("ok ") {
        Some(done) => {
            println!("{done}");
            Ok(())
        }
        None => bail!("{}", reply.trim_start_matches("error: ")),
    }
}
