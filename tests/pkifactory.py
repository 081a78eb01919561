"""The tests' certificate factory is the package's shipped testing module."""

from proxy.testing import DAY, NOW, Issued, make_ca, name, new_key, write_ca

__all__ = ["DAY", "NOW", "Issued", "make_ca", "name", "new_key", "write_ca"]
