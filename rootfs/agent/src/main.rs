//! The capsule guest agent binary.

fn main() {}
