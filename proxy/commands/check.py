"""`mtls-sidecar check`: every finding about a config and its key material, at once."""

from __future__ import annotations

import json
import sys
from typing import Any

from proxy.ops.audit import findings_for


def run_check(path: str, *, as_json: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    findings, _ = findings_for(path)
    errors = sum(f.level == "error" for f in findings)
    if as_json:
        json.dump(
            {
                "ok": errors == 0,
                "errors": errors,
                "warnings": sum(f.level == "warning" for f in findings),
                "findings": [
                    {"level": f.level, "file": f.file, "key": f.key, "message": f.message}
                    for f in findings
                ],
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for f in findings:
            out.write(f"{f}\n")
        out.write(f"{'OK' if errors == 0 else 'FAILED'}: {errors} error(s)\n")
    return 0 if errors == 0 else 1
