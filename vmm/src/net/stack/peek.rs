//! A first, bounds-checked look at each guest frame, before smoltcp takes it: is it the SYN of
//! a new TCP connection (the stack must make a listener for it first), a UDP datagram, or an
//! ICMP echo request, and to where.
//!
//! Every frame is guest input: only smoltcp's checked wire views (`new_checked`) read it, and
//! anything they reject is [`Peek::Other`] (smoltcp then drops it too). It never decides
//! anything itself and keeps nothing.

use std::net::SocketAddrV4;

use smoltcp::wire::{EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet};
use smoltcp::wire::{TcpPacket, UdpPacket};

/// What a guest frame is, as far as the stack needs to know before smoltcp reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// A TCP segment with SYN set and ACK clear: a connection attempt from `src` to `dst`.
    TcpSyn {
        /// The guest's end.
        src: SocketAddrV4,
        /// Where the guest wants to go.
        dst: SocketAddrV4,
    },
    /// A UDP datagram from `src` to `dst`.
    Udp {
        /// The guest's end.
        src: SocketAddrV4,
        /// Where it is sent.
        dst: SocketAddrV4,
    },
    /// An ICMP echo request ("ping") to `dst`.
    IcmpEcho {
        /// The address pinged.
        dst: std::net::Ipv4Addr,
    },
    /// Anything else: ARP, other TCP segments, other ICMP, fragments, malformed frames.
    Other,
}

/// Classifies the Ethernet frame `frame`. Never panics, whatever the bytes.
pub fn peek(frame: &[u8]) -> Peek {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return Peek::Other;
    };
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return Peek::Other;
    }
    let Ok(ip) = Ipv4Packet::new_checked(ethernet.payload()) else {
        return Peek::Other;
    };
    // Fragments are not reassembled (smoltcp is built without fragmentation and drops them).
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Peek::Other;
    }
    let (src_ip, dst_ip) = (ip.src_addr(), ip.dst_addr());
    match ip.next_header() {
        IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
            Ok(tcp) if tcp.syn() && !tcp.ack() && !tcp.rst() => Peek::TcpSyn {
                src: SocketAddrV4::new(src_ip, tcp.src_port()),
                dst: SocketAddrV4::new(dst_ip, tcp.dst_port()),
            },
            _ => Peek::Other,
        },
        IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
            Ok(udp) => Peek::Udp {
                src: SocketAddrV4::new(src_ip, udp.src_port()),
                dst: SocketAddrV4::new(dst_ip, udp.dst_port()),
            },
            Err(_) => Peek::Other,
        },
        IpProtocol::Icmp => match Icmpv4Packet::new_checked(ip.payload()) {
            Ok(icmp) if icmp.msg_type() == Icmpv4Message::EchoRequest => Peek::IcmpEcho { dst: dst_ip },
            _ => Peek::Other,
        },
        _ => Peek::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_garbled_frames_are_other() {
        for len in 0..80 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = peek(&junk);
        }
        assert_eq!(peek(&[]), Peek::Other);
        // An IPv4 ethertype with a truncated header.
        let mut frame = vec![0u8; 20];
        frame[12] = 0x08;
        assert_eq!(peek(&frame), Peek::Other);
    }
}
