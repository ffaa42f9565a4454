//! Feeds arbitrary bytes to the agent's request and cgroup paths as a hostile
//! host and a hostile guest would reach them: the bytes are decoded as one
//! framed `ClientFrame`, and every `Exec`, `RunCode`, `CreateContext` and
//! `ResizePty` in it goes through the validation the agent runs before it
//! starts anything (against a guest's policy and against none); the same bytes
//! are parsed as the cgroup files the agent reads (`pids.events`,
//! `memory.events`, `cgroup.events`, `cgroup.procs`), and read as numbers for
//! the limits policy. It must never panic.
#![no_main]

use capsule_agent::cgroup::events;
use capsule_agent::cgroup::limits::{resolve_request, LimitPolicy};
use capsule_agent::frame::FrameDecoder;
use capsule_agent::process::validate_exec;
use capsule_agent::protocol::{ClientFrame, ClientMessage, Op, ProcessLimits};
use capsule_agent::pty;
use libfuzzer_sys::fuzz_target;

fn numbers(data: &[u8]) -> [u64; 5] {
    let mut out = [0u64; 5];
    for (i, chunk) in data.chunks(8).take(5).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(word);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let guest = LimitPolicy::for_guest(512 << 20, 32768, 4096).expect("a 512 MiB guest has a policy");
    let mut framed = (data.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(data);
    let mut decoder = FrameDecoder::new();
    decoder.push(&framed);
    if let Ok(Some(ClientFrame { body: ClientMessage::Request(request), .. })) = decoder.next_frame::<ClientFrame>() {
        match request.op {
            Op::Exec(req) => {
                let limits = validate_exec(&req, Some(&guest));
                if let Ok(Some(l)) = limits {
                    assert!(l.pids_max >= 1 && l.pids_max <= guest.pids_ceiling);
                    assert!(l.memory_high_bytes <= l.memory_max_bytes && l.memory_max_bytes <= guest.memory_ceiling_bytes);
                }
                let _ = validate_exec(&req, None);
            }
            Op::RunCode(req) => {
                let _ = resolve_request(Some(&guest), req.limits.as_ref());
                let _ = resolve_request(None, req.limits.as_ref());
            }
            Op::CreateContext { limits, .. } => {
                let _ = resolve_request(Some(&guest), limits.as_ref());
            }
            Op::ResizePty { size, .. } => {
                let _ = pty::size_problem(size);
            }
            _ => {}
        }
    }
    let _ = events::parse_pids_events(data);
    let _ = events::parse_oom_kills(data);
    let _ = events::parse_cgroup_events(data);
    let _ = events::keyed_value(data, "populated");
    let _ = events::for_each_pid(data, |_| {});
    let [memory, pid_max, threads_max, pids, bytes] = numbers(data);
    if let Ok(policy) = LimitPolicy::for_guest(memory, pid_max, threads_max) {
        let asked = ProcessLimits { pids_max: Some(pids as u32), memory_max_bytes: Some(bytes) };
        if let Ok(l) = policy.resolve(Some(&asked)) {
            assert!(l.memory_high_bytes <= l.memory_max_bytes);
        }
        let _ = policy.containment();
    }
});
