//! This host's network interfaces, addresses and routes: where the packet data plane
//! attaches its programs, which peers it cannot forward to (its own addresses, reached
//! over loopback, which passes no TC program), and which interface a peer is reached
//! through (a route lookup, as `ip route get` does).

use std::{
    collections::{BTreeSet, HashSet},
    io,
    net::IpAddr,
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags, sys::socket::SockaddrLike};

/// Every address of every interface.
pub fn addresses() -> io::Result<HashSet<IpAddr>> {
    Ok(getifaddrs()?
        .filter_map(|interface| ip(interface.address.as_ref()?))
        .collect())
}

/// The names of the interfaces but loopback, sorted.
pub fn non_loopback() -> io::Result<Vec<String>> {
    let names: BTreeSet<String> = getifaddrs()?
        .filter(|interface| !interface.flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .map(|interface| interface.interface_name)
        .collect();
    Ok(names.into_iter().collect())
}

/// The index of the interface named `name`.
pub fn index(name: &str) -> io::Result<u32> {
    Ok(nix::net::if_::if_nametoindex(name)?)
}

fn ip(address: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    match address.family()? {
        nix::sys::socket::AddressFamily::Inet => Some(address.as_sockaddr_in()?.ip().into()),
        nix::sys::socket::AddressFamily::Inet6 => Some(address.as_sockaddr_in6()?.ip().into()),
        _ => None,
    }
}

/// Looks up routes in the kernel's tables, over one netlink socket.
pub struct Routes {
    socket: Socket,
    sequence: u32,
}

impl Routes {
    pub fn open() -> io::Result<Routes> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Routes {
            socket,
            sequence: 0,
        })
    }

    /// The interface segments from `from` (an address of this host) to `to` leave
    /// through; `None` when no route leads there.
    pub fn egress(&mut self, from: IpAddr, to: IpAddr) -> io::Result<Option<u32>> {
        let (from, to) = (unmapped(from), unmapped(to));
        let mut request = RouteMessage::default();
        let (family, prefix) = match to {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        request.header.address_family = family;
        request.header.destination_prefix_length = prefix;
        request.header.source_prefix_length = prefix;
        request.attributes = vec![
            RouteAttribute::Destination(to.into()),
            RouteAttribute::Source(from.into()),
        ];
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::GetRoute(request)),
        );
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;

        // The answer is one message (the route) or an error; an earlier request's
        // answer, left by an error above, is skipped by its sequence number.
        let mut answer = vec![0; 8192];
        loop {
            let size = self.socket.recv(&mut &mut answer[..], 0)?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if reply.header.sequence_number != self.sequence {
                continue;
            }
            return match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => Ok(route
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        RouteAttribute::Oif(index) => Some(*index),
                        _ => None,
                    })),
                NetlinkPayload::Error(error) => match error.code {
                    None => Ok(None),
                    Some(code) => {
                        let errno = code.get().abs();
                        if [libc::ENETUNREACH, libc::EHOSTUNREACH].contains(&errno) {
                            Ok(None)
                        } else {
                            Err(io::Error::from_raw_os_error(errno))
                        }
                    }
                },
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected answer to a route lookup: {other:?}"),
                )),
            };
        }
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's IPv4 peers) as IPv4 ones.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn loopback_is_listed_among_the_addresses_and_left_out_of_the_names() {
        let addresses = addresses().unwrap();
        assert!(
            addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
        assert!(!non_loopback().unwrap().iter().any(|name| name == "lo"));
    }

    #[test]
    fn this_hosts_own_address_is_reached_through_loopback() {
        let mut routes = Routes::open().unwrap();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(
            routes.egress(localhost, localhost).unwrap(),
            Some(index("lo").unwrap())
        );
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(
            routes.egress(mapped, mapped).unwrap(),
            Some(index("lo").unwrap())
        );
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        if addresses().unwrap().contains(&v6) {
            assert_eq!(routes.egress(v6, v6).unwrap(), Some(index("lo").unwrap()));
        }
    }
}
