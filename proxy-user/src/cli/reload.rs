use anyhow::bail;

use super::ControlSocket;
use crate::control;

pub fn reload(socket: &ControlSocket) -> anyhow::Result<()> {
    // The running kgate reads its own file; this one only needs its control socket.
    let reply = socket.request("reload", control::REQUEST_TIMEOUT)?;
    match reply.strip_prefix("ok ") {
        Some(done) => {
            println!("{done}");
            Ok(())
        }
        None => bail!("{}", reply.trim_start_matches("error: ")),
    }
}
