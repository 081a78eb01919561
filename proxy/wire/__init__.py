"""The data path: HTTP/1.1 framing and limits, downstream connections and their exchanges,
upstream connections and the pool, DNS. Imports: proxy.config, proxy.tls, proxy.telemetry."""
