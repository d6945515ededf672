"""``doorbell-request``: the requester's side — key generation, building and sending requests."""
