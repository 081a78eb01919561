"""Telemetry: Prometheus metrics and logging (one JSON shape, rate-limited per-peer errors).
Imports: nothing of proxy."""
