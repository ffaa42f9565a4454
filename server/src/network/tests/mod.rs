//! Tests of the network policy: rules and ranges, narrowing, and the egress decisions.

mod egress;
mod narrow;
mod rules;
