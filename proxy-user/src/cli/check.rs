use std::path::Path;

use crate::config::Config;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // kgate reads the blocklist file at start: a bad line there stops it too.
    if let Some(file) = config
        .xdp
        .as_ref()
        .and_then(|x| x.blocklist_file.as_deref())
    {
        crate::xdp::read_blocklist_file(file)?;
    }
    // And the bouncer's key (under systemd, ExecStartPre runs this with kgate's own
    // environment, so an api_key_env variable is checked too).
    if let Some(crowdsec) = &config.crowdsec {
        crate::xdp::crowdsec::read_key(&crowdsec.api_key)?;
    }
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
