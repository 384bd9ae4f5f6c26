use anyhow::bail;

use super::ControlSocket;
use crate::{control, pool::AdminState};

pub fn set(socket: &ControlSocket, server: &str, state: &str) -> anyhow::Result<()> {
    // Refuse a bad state here, with the same words the daemon would use.
    state.parse::<AdminState>().map_err(anyhow::Error::msg)?;
    let reply = socket.request(
        &format!("server set {server} {state}"),
        control::REQUEST_TIMEOUT,
    )?;
    match reply.strip_prefix("ok ") {
        Some(done) => {
            println!("{done}");
            Ok(())
        }
        None => bail!("{}", reply.trim_start_matches("error: ")),
    }
}
