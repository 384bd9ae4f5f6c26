use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{config::Config, control};

pub fn reload(config: &Path, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let socket = match socket {
        Some(socket) => socket,
        // The running kgate reads its own file; this one only says where it listens.
        None => Config::load(config)?.global.control_socket,
    };
    let reply = control::request(&socket, "reload")?;
    match reply.strip_prefix("ok ") {
        Some(done) => {
            println!("{done}");
            Ok(())
        }
        None => bail!("{}", reply.trim_start_matches("error: ")),
    }
}
