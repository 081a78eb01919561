"""The tests' certificate factory is the package's shipped testing module."""

import datetime
from typing import Any

from proxy.tls.throwaway import DAY, NOW, Issued, make_ca, name, new_key, write_ca

__all__ = ["DAY", "NOW", "Issued", "make_ca", "name", "new_key", "short_lived", "write_ca"]


def short_lived(ca: Issued, subject: str, seconds: float, **kw: Any) -> Issued:
    """A certificate valid from a day ago until `seconds` from now. X.509 keeps whole seconds:
    read the exact end from the certificate's not_valid_after_utc."""
    now = datetime.datetime.now(datetime.UTC)
    end = now + datetime.timedelta(seconds=seconds)
    return ca.issue(subject, not_before=now - DAY, not_after=end, **kw)
