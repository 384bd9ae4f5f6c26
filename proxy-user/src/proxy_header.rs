//! The PROXY protocol header written to the server before any client byte, so the
//! server sees the real client address (built with `ppp`).

use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2};

use crate::config::ProxyProtocol;

/// The header for a connection from `client` to the frontend address `local`, or
/// `None` when the backend takes no header.
pub fn for_connection(
    protocol: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
) -> Option<Vec<u8>> {
    let (client, local) = same_family(client, local);
    match protocol {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(
            v1::Addresses::from((client, local))
                .to_string()
                .into_bytes(),
        ),
        ProxyProtocol::V2 => Some(
            v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (client, local),
            )
            .build()
            .expect("a v2 header with addresses and no TLVs fits in memory"),
        ),
    }
}

/// The v2 header with the LOCAL command and no addresses: the proxy speaking for itself,
/// as a health check does. The server must use the connection's own endpoints (Postfix
/// 3.5+ and Dovecot accept it as a probe). 16 bytes: signature, `0x20` (v2, LOCAL),
/// `0x00` (family and protocol unspecified), length 0.
pub fn local_v2() -> Vec<u8> {
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Local,
        v2::Protocol::Unspecified,
        v2::Addresses::Unspecified,
    )
    .build()
    .expect("a v2 LOCAL header without addresses fits in memory")
}

/// Both addresses in one family, as the header has a single family field: an IPv4
/// client reaching an IPv6 socket shows up as `::ffff:a.b.c.d` and is unmapped.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, local) = (canonical(client), canonical(local));
    let as_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if client.is_ipv4() == local.is_ipv4() {
        (client, local)
    } else {
        (as_v6(client), as_v6(local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v2_ipv4_header_is_byte_exact() {
        let header = for_connection(
            ProxyProtocol::V2,
            addr("192.0.2.10:40000"),
            addr("198.51.100.1:25"),
        )
        .unwrap();
        let mut expected = SIGNATURE.to_vec();
        expected.extend([0x21, 0x11, 0x00, 12]); // v2 PROXY, TCP over IPv4, 12 address bytes
        expected.extend([192, 0, 2, 10, 198, 51, 100, 1]);
        expected.extend(40000u16.to_be_bytes());
        expected.extend(25u16.to_be_bytes());
        assert_eq!(header, expected);
    }

    #[test]
    fn v2_ipv6_header_is_byte_exact() {
        let header = for_connection(
            ProxyProtocol::V2,
            addr("[2001:db8::10]:40000"),
            addr("[2001:db8:1::1]:993"),
        )
        .unwrap();
        let mut expected = SIGNATURE.to_vec();
        expected.extend([0x21, 0x21, 0x00, 36]); // v2 PROXY, TCP over IPv6, 36 address bytes
        expected.extend(
            "2001:db8::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        expected.extend(
            "2001:db8:1::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        expected.extend(40000u16.to_be_bytes());
        expected.extend(993u16.to_be_bytes());
        assert_eq!(header, expected);
    }

    #[test]
    fn v2_local_header_is_byte_exact() {
        let mut expected = SIGNATURE.to_vec();
        expected.extend([0x20, 0x00, 0x00, 0x00]); // v2 LOCAL, unspecified, no address bytes
        assert_eq!(local_v2(), expected);
    }

    #[test]
    fn v1_headers_are_text_lines() {
        assert_eq!(
            for_connection(
                ProxyProtocol::V1,
                addr("192.0.2.10:40000"),
                addr("198.51.100.1:25")
            )
            .unwrap(),
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n"
        );
        assert_eq!(
            for_connection(
                ProxyProtocol::V1,
                addr("[2001:db8::10]:40000"),
                addr("[2001:db8:1::1]:993")
            )
            .unwrap(),
            b"PROXY TCP6 2001:db8::10 2001:db8:1::1 40000 993\r\n"
        );
    }

    #[test]
    fn no_header_when_the_backend_takes_none() {
        assert!(
            for_connection(
                ProxyProtocol::None,
                addr("192.0.2.10:1"),
                addr("192.0.2.1:2")
            )
            .is_none()
        );
    }

    #[test]
    fn a_mapped_ipv4_client_is_reported_as_ipv4() {
        let header = for_connection(
            ProxyProtocol::V1,
            addr("[::ffff:192.0.2.10]:40000"),
            addr("[::ffff:198.51.100.1]:25"),
        )
        .unwrap();
        assert_eq!(header, b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n");
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let header = for_connection(
            ProxyProtocol::V1,
            addr("192.0.2.10:40000"),
            addr("[2001:db8:1::1]:25"),
        )
        .unwrap();
        assert_eq!(
            header,
            b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8:1::1 40000 25\r\n"
        );
    }
}
