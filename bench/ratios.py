"""Medians over harness runs, the sidecar ("custom") against nginx, with the targets."""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# (scenario, test) -> (what, target ratio or limit)
TARGETS = {
    ("egress", "c50"): "throughput >= 30% of nginx",
    ("ingress", "c50"): "throughput >= 30% of nginx",
    ("egress", "c1"): "p99 <= 1 ms",
    ("ingress", "c1"): "p99 <= 1 ms",
    ("ingress", "hs-ecdsa"): "handshakes/s >= 80% of nginx",
    ("ingress", "hs-rsa"): "handshakes/s >= 80% of nginx",
}


def main(dirs: list[str]) -> None:
    cells: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    # tag -> proxy -> (req/s, CPU us per request) of egress c50@1: the access-log pairs
    pairs: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for d in dirs:
        for line in (Path(d) / "results.tsv").read_text().splitlines():
            f = line.split("\t")
            _tag, scenario, proxy, mode, test, rate, _p50, p99, _errs, _cpu, us = f[:11]
            key = (scenario, f"{test}@{mode}", proxy)
            for name, value in (("rate", rate), ("p99", p99), ("us", us)):
                with contextlib.suppress(ValueError):  # "-" where a figure does not apply
                    cells[key][name].append(float(value))
            if proxy in ("custom-log", "custom-nolog") and (scenario, test, mode) == (
                "egress",
                "c50",
                "1",
            ):
                pairs[_tag.rsplit("-custom-", 1)[0]][proxy] = (float(rate), float(us))

    def med(scenario: str, test: str, proxy: str, what: str) -> float:
        values = cells.get((scenario, test, proxy), {}).get(what, [])
        return statistics.median(values) if values else float("nan")

    runs = sum(1 for d in dirs if "-custom-" not in Path(d).name)
    print(f"\nmedians of {runs} run(s); mode 1 = one worker pinned to one core, "
          "auto = one per core (2 here)")  # fmt: skip
    head = f"{'scenario':8} {'test':14} {'nginx/s':>9} {'sidecar/s':>9} {'ratio':>6} "
    head += f"{'nginx p99':>9} {'side p99':>9} {'nginx us':>8} {'side us':>8}  target"
    print(head)
    modes = sorted({k[1].split("@")[1] for k in cells}) or ["1"]
    rows = [(sc, f"{t}@{m}", target) for (sc, t), target in TARGETS.items() for m in modes]
    for scenario, test, target in rows:
        if (scenario, test, "nginx") not in cells:
            continue
        n, s = med(scenario, test, "nginx", "rate"), med(scenario, test, "custom", "rate")
        ratio = s / n if n else float("nan")
        sp99 = med(scenario, test, "custom", "p99")
        if "p99" in target:
            ok = sp99 <= 1.0
        else:
            need = 0.30 if "30%" in target else 0.8
            ok = ratio >= need
        print(
            f"{scenario:8} {test:9} {n:9.0f} {s:9.0f} {ratio:6.2f} "
            f"{med(scenario, test, 'nginx', 'p99'):9.3f} {sp99:9.3f} "
            f"{med(scenario, test, 'nginx', 'us'):8.0f} {med(scenario, test, 'custom', 'us'):8.0f}"
            f"  {target}: {'met' if ok else 'NOT met'}"
        )

    for scenario in ("egress", "ingress"):
        one = med(scenario, "c50@1", "custom", "rate")
        auto = med(scenario, "c50@auto", "custom", "rate")
        n1, na = med(scenario, "c50@1", "nginx", "rate"), med(scenario, "c50@auto", "nginx", "rate")
        if one == one and auto == auto:
            print(f"{scenario}: sidecar auto/1 = {auto / one:.2f} (target >= 1.3); "
                  f"nginx auto/1 = {na / n1:.2f} in the same runs")  # fmt: skip
    both = [p for p in pairs.values() if len(p) == 2]
    if both:
        rate = statistics.median(1 - p["custom-log"][0] / p["custom-nolog"][0] for p in both)
        cpu = statistics.median(p["custom-log"][1] / p["custom-nolog"][1] - 1 for p in both)
        print(
            f"egress: access log on costs {rate:+.1%} of throughput and {cpu:+.1%} of CPU per "
            f"request against off (target <= 10%), median of {len(both)} back-to-back pair(s)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
