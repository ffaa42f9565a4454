//! Tests of the network policy: rules and ranges, narrowing, the egress decisions, and the
//! broker server that applies them.

mod broker_server;
mod egress;
mod narrow;
mod rules;
