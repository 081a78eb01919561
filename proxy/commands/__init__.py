"""The commands of the CLI beyond run: check, csr, probe, demo. Imports: proxy.ops and below."""
