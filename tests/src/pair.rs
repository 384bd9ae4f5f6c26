//! A lab with two gateways that share a virtual address (a VRRP pair), on this machine:
//!
//! ```text
//!  client ns              switch ns                        gateway ns 0, 1
//!  kg-lan 10.201.1.2 ---- bridge kg-lan ---------------- kg-lan 10.201.1.(11+i)
//!                                                            (+ the VIP 10.201.1.100
//!                                                             on the VRRP master)
//!  backend ns             switch ns
//!  kg-srv 10.201.2.2 ---- bridge kg-srv ---------------- kg-srv 10.201.2.(11+i)
//! ```
//!
//! Everything is on-link: the client reaches the VIP on its LAN, each gateway reaches
//! the backend on the server LAN, no one routes. Which gateway carried a connection
//! shows in the address the backend sees it from. IPv6 addresses (fd00:201:1::/64,
//! fd00:201:2::/64, same host numbers) are there too, unused by the VRRP test.
//!
//! Names, cleanup and the sweep of dead labs are those of [`crate::lab`].

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::lab::{Cleanup, NetNs, ip, new_lab_name};

/// The virtual address the pair shares.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 100);
/// The prefix length of both LANs.
pub const PREFIX: u8 = 24;
/// The interface toward the clients, in the client and in each gateway.
pub const LAN_IF: &str = "kg-lan";
/// The interface toward the servers, in the backend and in each gateway.
pub const SERVER_IF: &str = "kg-srv";

const LAN: u8 = 1;
const SERVER_LAN: u8 = 2;

/// Two gateways, a client and a backend; dropping it removes everything.
pub struct PairLab {
    unique: String,
    client: NetNs,
    gateways: [NetNs; 2],
    backend: NetNs,
    temp_dir: PathBuf,
    _cleanup: Cleanup,
}

fn v4(lan: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, lan, host)
}

fn v6(lan: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, lan.into(), 0, 0, 0, 0, host.into())
}

impl PairLab {
    /// Builds the lab. Panics with a clear message when not root or `ip` is missing.
    // Not `Default`: it creates namespaces and a directory, as `Lab::new` does.
    #[allow(clippy::new_without_default)]
    pub fn new() -> PairLab {
        let (unique, temp_dir) = new_lab_name();
        let mut cleanup = Cleanup {
            namespaces: Vec::new(),
            temp_dir: temp_dir.clone(),
        };
        let client = NetNs::new(format!("{unique}-client"), v4(LAN, 2), v6(LAN, 2), LAN_IF);
        let gateways = [0, 1].map(|i| {
            NetNs::new(
                format!("{unique}-gw{i}"),
                v4(LAN, 11 + i),
                v6(LAN, 11 + i),
                LAN_IF,
            )
        });
        let backend = NetNs::new(
            format!("{unique}-b0"),
            v4(SERVER_LAN, 2),
            v6(SERVER_LAN, 2),
            SERVER_IF,
        );
        let switch = format!("{unique}-sw");
        for name in [
            client.name(),
            gateways[0].name(),
            gateways[1].name(),
            backend.name(),
        ]
        .into_iter()
        .chain([switch.as_str()])
        {
            ip(&["netns", "add", name]);
            cleanup.namespaces.push(name.to_owned());
            ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        for bridge in [LAN_IF, SERVER_IF] {
            ip(&["-n", &switch, "link", "add", bridge, "type", "bridge"]);
            ip(&["-n", &switch, "link", "set", bridge, "up"]);
        }
        let plug = |ns: &str, ifname: &str, port: &str, bridge: &str, lan: u8, host: u8| {
            ip(&[
                "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                &switch,
            ]);
            ip(&["-n", &switch, "link", "set", port, "master", bridge, "up"]);
            let v4 = format!("{}/{PREFIX}", v4(lan, host));
            ip(&["-n", ns, "addr", "add", &v4, "dev", ifname]);
            let v6 = format!("{}/64", v6(lan, host));
            ip(&["-n", ns, "-6", "addr", "add", &v6, "dev", ifname, "nodad"]);
            ip(&["-n", ns, "link", "set", ifname, "up"]);
        };
        plug(client.name(), LAN_IF, "client", LAN_IF, LAN, 2);
        plug(backend.name(), SERVER_IF, "b0", SERVER_IF, SERVER_LAN, 2);
        for (i, gateway) in gateways.iter().enumerate() {
            let host = 11 + i as u8;
            plug(
                gateway.name(),
                LAN_IF,
                &format!("gw{i}-lan"),
                LAN_IF,
                LAN,
                host,
            );
            plug(
                gateway.name(),
                SERVER_IF,
                &format!("gw{i}-srv"),
                SERVER_IF,
                SERVER_LAN,
                host,
            );
        }
        PairLab {
            unique,
            client,
            gateways,
            backend,
            temp_dir,
            _cleanup: cleanup,
        }
    }

    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// Gateway `i`, 0 or 1.
    pub fn gateway(&self, i: usize) -> &NetNs {
        &self.gateways[i]
    }

    pub fn backend(&self) -> &NetNs {
        &self.backend
    }

    /// Gateway `i`'s address on the server LAN: what the backend sees its connections
    /// come from.
    pub fn gateway_toward_backend(&self, i: usize) -> Ipv4Addr {
        assert!(i < 2, "a pair has gateways 0 and 1");
        v4(SERVER_LAN, 11 + i as u8)
    }

    /// The gateways that hold the VIP right now (one, when VRRP has settled).
    pub fn vip_holders(&self) -> Vec<usize> {
        (0..2)
            .filter(|&i| {
                let out = std::process::Command::new("ip")
                    .args([
                        "-n",
                        self.gateways[i].name(),
                        "-4",
                        "addr",
                        "show",
                        "dev",
                        LAN_IF,
                    ])
                    .output()
                    .expect("running ip addr show");
                String::from_utf8_lossy(&out.stdout).contains(&format!("{VIP}/"))
            })
            .collect()
    }

    /// A name unique to this lab, e.g. `kg12345n3`.
    pub fn unique_name(&self) -> &str {
        &self.unique
    }

    /// A directory for this lab's files; removed when the lab drops.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }
}
