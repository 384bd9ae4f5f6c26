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
    println!("{}: valid ({})", path.display(), config.summary());
    Ok(())
}
