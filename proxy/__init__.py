"""mtls-sidecar: a mutual-TLS sidecar for partner APIs such as Thales D1."""

__version__ = "0.1.0"
