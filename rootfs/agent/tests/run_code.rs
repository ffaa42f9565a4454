//! `Op::RunCode` wired through the server: rich results come back, and the
//! server's output cap applies to cell output as it does to commands.

mod fixture;

use std::time::Duration;

use capsule_agent::protocol::{Event, Language, Op, Reply, RunCodeRequest, Stream};
use fixture::TestAgent;

const T: Option<Duration> = Some(Duration::from_secs(60));

fn python_available() -> bool {
    std::process::Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
}

fn cell(code: &str, cap: Option<u64>) -> Op {
    Op::RunCode(RunCodeRequest {
        context: "t".into(),
        language: Language::Python,
        code: code.into(),
        output_cap_bytes: cap,
        limits: None,
    })
}

#[test]
fn python_cell_output_is_capped_and_state_persists() {
    if !python_available() {
        eprintln!("SKIP: no python3 on this host");
        return;
    }
    let agent = TestAgent::start();
    let c = agent.connect();
    let (events, reply) = c.call(cell("x = 20\nx + 22", None), T).unwrap();
    assert!(matches!(reply, Reply::CodeDone(ref o) if o.execution_count == 1 && !o.timed_out), "{reply:?}");
    let text = events.iter().find_map(|e| match e {
        Event::Result(r) if r.is_main_result => {
            r.data.iter().find(|(mime, _)| mime == "text/plain").map(|(_, d)| d.clone())
        }
        _ => None,
    });
    assert_eq!(text.as_deref(), Some(&b"42"[..]), "{events:?}");

    let (events, _) = c.call(cell("print('y' * 100, end='')", Some(10)), T).unwrap();
    let streamed: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            Event::Output { stream: Stream::Stdout, data } => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(streamed, b"yyyyyyyyyy");
    let path = events
        .iter()
        .find_map(|e| match e {
            Event::Truncated { stream: Stream::Stdout, cap_bytes: 10, path } => Some(path.clone()),
            _ => None,
        })
        .expect("a truncation event");
    assert_eq!(std::fs::read(path).unwrap(), vec![b'y'; 100]);

    match c.call_reply(Op::ListContexts, T).unwrap() {
        Reply::Contexts(list) => assert!(list.iter().any(|ctx| ctx.name == "t" && ctx.execution_count == 2)),
        other => panic!("unexpected {other:?}"),
    }
}
