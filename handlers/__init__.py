"""HTTP and WebSocket edge of the bridge: one module per API area."""
