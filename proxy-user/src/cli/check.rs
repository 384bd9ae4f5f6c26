use std::path::Path;

use crate::config::Config;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let servers: usize = config.backends.iter().map(|b| b.servers.len()).sum();
    println!(
        "{}: valid ({} frontends, {} backends, {} servers)",
        path.display(),
        config.frontends.len(),
        config.backends.len(),
        servers
    );
    Ok(())
}
