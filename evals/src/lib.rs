//! capsule-evals: benchmark harness and graded agent-task scenarios.

pub mod timing;
