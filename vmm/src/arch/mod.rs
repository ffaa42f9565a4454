//! Architecture-specific guest setup. Only x86_64 is supported. It never runs the guest.

pub mod x86_64;
