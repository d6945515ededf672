"""The owner's decision on each request: the pure state machine, the button, the control socket
and the coordinator that applies decisions to the store, the audit log and delivery."""
