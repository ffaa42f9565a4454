//! capsule-vmm: a microVM monitor over KVM. It knows nothing of sandboxes or MCP.
