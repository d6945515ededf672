"""Footage requests: the vocabulary (:mod:`.vocabulary`), the pure verifier (:mod:`.verify`), the
SQLite store (:mod:`.store`) and the MQTT intake (:mod:`.service`)."""
