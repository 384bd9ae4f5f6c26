use std::{net::SocketAddr, path::Path};

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
    // A note, not an error: the file may be checked on another host than its own.
    for (frontend, address) in addresses_not_here(&config) {
        eprintln!(
            "note: frontend `{frontend}` listens on {address}, which is not an address of this \
             host: `kgate run` here cannot bind it until it is; on the backup of a VRRP pair, \
             set `freebind = true`"
        );
    }
    println!("{}: valid ({})", path.display(), config.summary());
    Ok(())
}

/// The listen addresses, of frontends without `freebind`, that no interface of this
/// host has (in this network namespace). None when the interfaces cannot be listed.
fn addresses_not_here(config: &Config) -> Vec<(String, SocketAddr)> {
    let Ok(here) = crate::interfaces::addresses() else {
        return Vec::new();
    };
    config
        .frontends
        .iter()
        .filter(|frontend| !frontend.freebind)
        .flat_map(|frontend| {
            frontend
                .listen
                .iter()
                .filter(|address| !address.ip().is_unspecified() && !here.contains(&address.ip()))
                .map(|&address| (frontend.name.clone(), address))
        })
        .collect()
}
