//! This host's network interfaces and addresses (getifaddrs(3)): where the packet data
//! plane attaches its programs, and which peers it cannot forward to (its own
//! addresses, reached over loopback, which passes no TC program).

use std::{
    collections::{BTreeSet, HashSet},
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Every address of every interface.
pub fn addresses() -> io::Result<HashSet<IpAddr>> {
    let mut addresses = HashSet::new();
    each(|_, flags, address| {
        if let Some(address) = address
            && flags & libc::IFF_UP as u32 != 0
        {
            addresses.insert(address);
        }
    })?;
    Ok(addresses)
}

/// The names of the interfaces but loopback, sorted.
pub fn non_loopback() -> io::Result<Vec<String>> {
    let mut names = BTreeSet::new();
    each(|name, flags, _| {
        if flags & libc::IFF_LOOPBACK as u32 == 0 {
            names.insert(name.to_owned());
        }
    })?;
    Ok(names.into_iter().collect())
}

/// Calls `visit(name, flags, address)` for every entry getifaddrs(3) lists.
fn each(mut visit: impl FnMut(&str, u32, Option<IpAddr>)) -> io::Result<()> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*entry };
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        visit(&name, ifa.ifa_flags, address(ifa.ifa_addr));
        entry = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(())
}

fn address(sockaddr: *const libc::sockaddr) -> Option<IpAddr> {
    if sockaddr.is_null() {
        return None;
    }
    // SAFETY: getifaddrs gives a sockaddr of the size its family says.
    unsafe {
        match i32::from((*sockaddr).sa_family) {
            libc::AF_INET => {
                let v4 = &*(sockaddr as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*(sockaddr as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
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
}
