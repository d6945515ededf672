"""Privacy-first edge agent for doorbell cameras: footage stays on the device, encrypted, and
leaves only when the owner approves one signed, narrow request."""

__version__ = "0.1.0"
