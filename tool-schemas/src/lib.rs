//! The MCP tool contract: one params/result struct per tool.
