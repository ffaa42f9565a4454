//! capsule-evals: benchmark harness and graded agent-task scenarios.

pub mod binaries;
pub mod latency;
pub mod sandbox;
pub mod sizes;
pub mod timing;
