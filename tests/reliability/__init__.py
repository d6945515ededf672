"""Reliability suite: the whole agent (``doorbell-agent run``) as a subprocess against a real
mosquitto, under kill -9, broker restarts, clock jumps, full disks, camera faults and corrupt
state. The shared machinery is in :mod:`tests.reliability.harness`."""
