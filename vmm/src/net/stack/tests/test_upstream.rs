//! A test double for [`Upstream`]: it "connects" guest destinations found in its routing table
//! to loopback TCP servers itself (standing for the daemon), refuses the others, and resolves
//! names from a fixed table. Never for production: it is the daemon's policy in miniature.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::upstream::{Answer, ConnectRequest, Upstream};
use crate::net::broker::Family;

/// What the test sets and reads.
#[derive(Default)]
pub struct Table {
    /// Guest destination → loopback server.
    pub routes: HashMap<SocketAddr, SocketAddr>,
    /// Name → addresses.
    pub names: HashMap<String, Vec<IpAddr>>,
    /// The reason given for a destination not in `routes`.
    pub refusal: String,
    /// Never answer connections (they wait forever).
    pub hold: bool,
    /// Every connection asked for.
    pub requests: Vec<ConnectRequest>,
    /// Every blocked report.
    pub blocked: Vec<String>,
    answers: VecDeque<Answer>,
}

/// The test's handle on the double's table.
#[derive(Clone)]
pub struct TestUpstreamTable(Arc<Mutex<Table>>);

impl TestUpstreamTable {
    /// The table.
    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap()
    }
}

/// The double (see the module doc).
pub struct TestUpstream {
    table: TestUpstreamTable,
    wake: EventFd,
}

impl TestUpstream {
    /// A double with an empty table, and the test's handle on it.
    pub fn new() -> (Self, TestUpstreamTable) {
        let table = TestUpstreamTable(Arc::new(Mutex::new(Table {
            refusal: "not in the test's table".into(),
            ..Table::default()
        })));
        (Self { table: table.clone(), wake: EventFd::new(EFD_NONBLOCK).unwrap() }, table)
    }

    fn answer(&self, table: &mut Table, answer: Answer) {
        table.answers.push_back(answer);
        self.wake.write(1).unwrap();
    }
}

impl Upstream for TestUpstream {
    fn connect(&mut self, request: ConnectRequest) -> Result<(), String> {
        let mut table = self.table.lock();
        table.requests.push(request.clone());
        if table.hold {
            return Ok(());
        }
        let id = request.id;
        let answer = match table.routes.get(&request.dst) {
            Some(target) => match TcpStream::connect(target) {
                Ok(tcp) => Answer::Connected { id, stream: splice_to(tcp) },
                Err(e) => Answer::Refused { id, reason: format!("loopback connect failed: {e}") },
            },
            None => Answer::Refused { id, reason: table.refusal.clone() },
        };
        self.answer(&mut table, answer);
        Ok(())
    }

    fn resolve(&mut self, id: u64, name: &str, _family: Family) -> Result<(), String> {
        let mut table = self.table.lock();
        let answer = match table.names.get(name) {
            Some(addrs) => Answer::Resolved { id, addrs: addrs.clone(), ttl_s: 60 },
            None => Answer::NotResolved { id, nxdomain: true, reason: "no such name".into() },
        };
        self.answer(&mut table, answer);
        Ok(())
    }

    fn report_blocked(&mut self, what: &str) {
        self.table.lock().blocked.push(what.to_owned());
    }

    fn take_answers(&mut self, answers: &mut Vec<Answer>) {
        let _ = self.wake.read();
        answers.extend(self.table.lock().answers.drain(..));
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.wake.as_raw_fd())
    }
}

/// One end of a Unix stream pair whose other end is copied to and from `tcp` by two threads,
/// half-closes included (what the daemon does with the real upstream socket).
pub fn splice_to(tcp: TcpStream) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (mut tcp_in, mut tcp_out) = (tcp.try_clone().unwrap(), tcp);
    let (mut unix_in, mut unix_out) = (theirs.try_clone().unwrap(), theirs);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut unix_in, &mut tcp_out);
        let _ = tcp_out.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut tcp_in, &mut unix_out);
        let _ = unix_out.flush();
        let _ = unix_out.shutdown(Shutdown::Write);
    });
    ours
}
