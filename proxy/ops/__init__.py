"""The running service: one worker's listeners, reload and drain (service), the admin listener,
systemd notifications and sockets. Imports: proxy.routes, proxy.oauth and below."""
