//! Reading the packet data plane's pinned rules (`<pin>/packet_rules`): how many
//! connections are forwarded or held right now (two rules each), and whether an ended
//! one left a rule behind.

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};

/// The size of a rule's key and value (proxy-common's `FlowKey` and `Rule`).
const KEY: usize = 36;
const VALUE: usize = 104;

/// Number of rules in the pinned rule map at `path`. A snapshot: kgate adds and
/// removes rules while it is read.
pub fn rules_len(path: &Path) -> anyhow::Result<usize> {
    let data = MapData::from_pin(path).with_context(|| {
        format!(
            "no BPF map pinned at {}: is kgate running with the packet data plane?",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data)
        .with_context(|| format!("{} is a map type aya does not know", path.display()))?;
    let rules = HashMap::<MapData, [u8; KEY], [u8; VALUE]>::try_from(map)
        .with_context(|| format!("{} is not the rule map", path.display()))?;
    let mut keys = std::collections::HashSet::new();
    // Keys deleted under the walk restart it: a set removes the repeats, the bound
    // ends it under churn.
    for key in rules.keys().take(1 << 20) {
        keys.insert(key.with_context(|| format!("walking {}", path.display()))?);
    }
    Ok(keys.len())
}
