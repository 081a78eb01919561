"""Route policy over the data path: what both directions share, egress, ingress.
Imports: proxy.wire and below."""
