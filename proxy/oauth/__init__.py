"""OAuth 2.0: the client toward the partner (ES256 assertion, token source), the hosted token
endpoint (server), and the glue that builds them from config. Imports: proxy.wire and below."""
