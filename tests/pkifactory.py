"""The tests' certificate factory is the package's shipped testing module."""

from proxy.tls.throwaway import DAY, NOW, Issued, make_ca, name, new_key, write_ca

__all__ = ["DAY", "NOW", "Issued", "make_ca", "name", "new_key", "write_ca"]
