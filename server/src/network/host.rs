//! The host's own addresses, which no sandbox may ever reach (see [`super::Egress::new`]):
//! every address of every interface, from `getifaddrs(3)`, plus loopback.
//!
//! Read once when the daemon starts; it opens no sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses of the host's interfaces and loopback, without repeats. If the interfaces
/// cannot be listed, only loopback (and a warning in the log).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut addrs = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) writes the head of a list that we free with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot list the host's addresses");
        return addrs;
    }
    let mut node = list;
    while !node.is_null() {
        // SAFETY: `node` is a node of the list getifaddrs made, alive until freeifaddrs.
        let ifa = unsafe { &*node };
        if let Some(addr) = sockaddr_ip(ifa.ifa_addr) {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference into it outlives this.
    unsafe { libc::freeifaddrs(list) };
    addrs
}

/// The IP address a `sockaddr` of `getifaddrs` holds, if it is an IPv4 or IPv6 one.
fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: a non-null ifa_addr points at a sockaddr whose sa_family says its real type.
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: sa_family is AF_INET, so it is a sockaddr_in.
            let sin = unsafe { &*addr.cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: sa_family is AF_INET6, so it is a sockaddr_in6.
            let sin6 = unsafe { &*addr.cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_addresses_include_loopback_once() {
        let addrs = host_addresses();
        assert_eq!(addrs.iter().filter(|a| **a == IpAddr::V4(Ipv4Addr::LOCALHOST)).count(), 1);
        assert!(addrs.contains(&IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }
}
