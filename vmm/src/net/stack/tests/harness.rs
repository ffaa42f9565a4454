//! A guest for the stack's tests: a second smoltcp interface (10.0.2.15, gateway 10.0.2.2)
//! whose frames go through the stack's [`NetBackend`] methods as the virtio-net device would
//! pass them, and a loopback TCP echo server to stand for the world outside.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use super::super::{NetStack, GATEWAY_IP, GUEST_IP, SANDBOX_PREFIX_LEN};
use crate::devices::virtio::net::NetBackend;

/// The test guest's MAC.
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x15];

/// The guest's NIC: frames in and out, unbounded (the test bounds what it sends).
#[derive(Default)]
struct GuestNic {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for GuestNic {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The guest and the stack, wired frame to frame.
pub struct Net {
    iface: Interface,
    nic: GuestNic,
    /// The guest's sockets.
    pub sockets: SocketSet<'static>,
    /// The stack under test.
    pub stack: NetStack,
    epoch: Instant,
    next_port: u16,
}

impl Net {
    /// A guest in front of `stack`.
    pub fn new(stack: NetStack) -> Self {
        let mut nic = GuestNic::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        config.random_seed = 7;
        let mut iface = Interface::new(config, &mut nic, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| a.push(IpCidr::new(GUEST_IP.into(), SANDBOX_PREFIX_LEN)).unwrap());
        iface.routes_mut().add_default_ipv4_route(GATEWAY_IP).unwrap();
        Self { iface, nic, sockets: SocketSet::new(Vec::new()), stack, epoch: Instant::now(), next_port: 49152 }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// A guest TCP socket with `buffer` bytes each way, connecting to `dst`.
    pub fn connect(&mut self, dst: SocketAddrV4, buffer: usize) -> SocketHandle {
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; buffer]), tcp::SocketBuffer::new(vec![0; buffer]));
        self.next_port += 1;
        socket.connect(self.iface.context(), dst, self.next_port).unwrap();
        self.sockets.add(socket)
    }

    /// A guest UDP socket on `port`.
    pub fn udp(&mut self, port: u16) -> SocketHandle {
        let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8 * 1500]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        socket.bind(port).unwrap();
        self.sockets.add(socket)
    }

    /// The guest TCP socket `handle`.
    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(handle)
    }

    /// The guest UDP socket `handle`.
    pub fn udp_socket(&mut self, handle: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut(handle)
    }

    /// One round: the guest polls, its frames go to the stack, the stack runs if its event fd
    /// is readable, and its frames go to the guest. True if any frame moved.
    pub fn step(&mut self) -> bool {
        let now = self.now();
        self.iface.poll(now, &mut self.nic, &mut self.sockets);
        let mut moved = false;
        while let Some(frame) = self.nic.tx.pop_front() {
            moved = true;
            let _ = self.stack.transmit(&frame);
        }
        if readable(self.stack.event_fd().expect("the stack has an event fd")) {
            self.stack.process_events();
        }
        while let Some(frame) = self.stack.receive() {
            moved = true;
            self.nic.rx.push_back(frame);
        }
        moved
    }

    /// Steps until `done` holds (true) or `timeout` passes (false).
    pub fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            if !self.step() {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        done(self)
    }
}

/// Whether `fd` is readable now.
pub fn readable(fd: RawFd) -> bool {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) on one pollfd we own, without waiting.
    let n = unsafe { libc::poll(&mut pollfd, 1, 0) };
    n > 0 && pollfd.revents & libc::POLLIN != 0
}

/// A TCP echo server on 127.0.0.1 (one thread per connection; it echoes, then closes when the
/// client does). The listener thread lives as long as the test process.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// An address in TEST-NET-3 (RFC 5737) on `port`.
pub fn test_net(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, last), port)
}
