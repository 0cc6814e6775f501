"""onesim's own tests: protocol, documents, state machine, data plane,
events, faults, persistence and hooks, through pyone and real sockets."""
