//! kgate's XDP early drop from the tests: its counters, read from the pinned
//! `xdp_stats` map, and `kgate block` run as an operator runs it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray};

use crate::kgate::kgate_bin;
use crate::proc;

/// The counters of kgate's XDP program, summed over CPUs (the `XdpStats` layout in
/// proxy-common/src/xdp.rs: eight u64s in this order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    pub passed: u64,
    pub dropped_blocklist: u64,
    pub dropped_syn_rate: u64,
    pub malformed: u64,
    /// Of `dropped_blocklist`, by the matching entry's origin: [0] none known, [1] the
    /// blocklist file, [2] `kgate block add`, [3] CrowdSec.
    pub dropped_by_origin: [u64; 4],
}

/// Words of `XdpStats`.
const XDP_STATS_WORDS: usize = 8;

/// Reads `<pin>/xdp_stats`, which exists while kgate runs with an `[xdp]` section.
pub fn xdp_counters(pin: &Path) -> anyhow::Result<XdpCounters> {
    let path = pin.join("xdp_stats");
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no map pinned at {}: is kgate running with [xdp]?",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data)?;
    let stats =
        PerCpuArray::<MapData, [u64; XDP_STATS_WORDS]>::try_from(map).with_context(|| {
            format!(
                "{} is not a per-CPU array of {XDP_STATS_WORDS} u64s",
                path.display()
            )
        })?;
    let per_cpu = stats.get(&0, 0)?;
    let mut sum = [0u64; XDP_STATS_WORDS];
    for cpu in per_cpu.iter() {
        for (total, value) in sum.iter_mut().zip(cpu) {
            *total += value;
        }
    }
    Ok(XdpCounters {
        passed: sum[0],
        dropped_blocklist: sum[1],
        dropped_syn_rate: sum[2],
        malformed: sum[3],
        dropped_by_origin: [sum[4], sum[5], sum[6], sum[7]],
    })
}

/// Runs `kgate block ARGS --pin-path PIN` from this (the root) network namespace:
/// the command works on the pinned maps, wherever kgate runs.
pub fn kgate_block(pin: &Path, args: &[&str]) -> Output {
    proc::run_with_timeout(
        Command::new(kgate_bin())
            .arg("block")
            .args(args)
            .arg("--pin-path")
            .arg(pin),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("running kgate block {}: {e}", args.join(" ")))
}

/// Like [`kgate_block`], panicking unless it succeeds; returns its stdout.
pub fn kgate_block_ok(pin: &Path, args: &[&str]) -> String {
    let out = kgate_block(pin, args);
    assert!(
        out.status.success(),
        "kgate block {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
