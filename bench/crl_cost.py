"""What a CRL adds to each ingress handshake: OpenSSL's chain verification with and without
CRL_CHECK, for CRLs of 0, 10 000 and 100 000 entries (OpenSSL checks the CRL's signature,
hashing all of it, on every verification). Run: .venv/bin/python -m bench.crl_cost"""

from __future__ import annotations

import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import crypto

from proxy.tls.throwaway import DAY, NOW, make_ca

ROUNDS = 2000


def main() -> None:
    ca = make_ca()
    leaf = crypto.X509.from_cryptography(ca.issue("CN=leaf", client=True).cert)
    for entries in (None, 0, 10_000, 100_000):
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(ca.cert))
        flags = crypto.X509StoreFlags.PARTIAL_CHAIN
        if entries is not None:
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(ca.cert.subject)
                .last_update(NOW - DAY)
                .next_update(NOW + 7 * DAY)
            )
            for i in range(entries):
                revoked = x509.RevokedCertificateBuilder().serial_number(10**6 + i)
                builder = builder.add_revoked_certificate(revoked.revocation_date(NOW).build())
            store.add_crl(builder.sign(ca.key, hashes.SHA256()))
            flags |= crypto.X509StoreFlags.CRL_CHECK
        store.set_flags(flags)
        started = time.perf_counter()
        for _ in range(ROUNDS):
            crypto.X509StoreContext(store, leaf).verify_certificate()
        each = (time.perf_counter() - started) / ROUNDS * 1e6
        label = "no CRL check" if entries is None else f"CRL of {entries} entries"
        print(f"{label:>24}: {each:6.0f} us per verification")


if __name__ == "__main__":
    main()
