"""TLS material: contexts from config (client and server, key policy, reload), PKI inspection
and CSRs, verified-certificate identity headers, throwaway certificates for tests and the demo.
Imports: proxy.config only."""
