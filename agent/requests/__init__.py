"""Footage requests: the pure verifier (:mod:`.verify`) and intake budgets (:mod:`.intake`), the
SQLite store (:mod:`.store`), the intake loop (:mod:`.service`), the one responder
(:mod:`.responder`), receipts (:mod:`.receipts`) and the daemon worker over MQTT (:mod:`.worker`).
The words they share are :mod:`agent.vocabulary`."""
