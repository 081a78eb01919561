"""workers = "auto": the CPUs this process may use, capped by its cgroup's CPU quota (v1 and
v2), read from fake /proc and /sys/fs/cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cpus import cpu_quota, workers_auto


def tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(self_cgroup)
    cgroup.mkdir()
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    return proc, cgroup


POD = "kubepods.slice/pod1.slice/cri-abc.scope"


@pytest.mark.parametrize(
    ("cpu_max", "workers", "why"),
    [
        ("100000 100000\n", 1, "CPU quota 100000/100000 of 16 CPUs"),
        ("150000 100000\n", 2, "CPU quota 150000/100000 of 16 CPUs"),  # 1.5 CPUs: 2
        ("50000 100000\n", 1, "CPU quota 50000/100000 of 16 CPUs"),  # never below 1
        ("3200000 100000\n", 16, "CPU quota 3200000/100000 of 16 CPUs"),  # never above affinity
        ("max 100000\n", 16, "16 CPUs, no CPU quota"),
    ],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, workers: int, why: str) -> None:
    proc, cgroup = tree(tmp_path, f"0::/{POD}\n", {f"{POD}/cpu.max": cpu_max})
    assert workers_auto(proc, cgroup, affinity=16) == (workers, why)


def test_cgroup_v2_quota_on_a_parent_binds(tmp_path: Path) -> None:
    proc, cgroup = tree(
        tmp_path,
        f"0::/{POD}\n",
        {f"{POD}/cpu.max": "max 100000\n", "kubepods.slice/pod1.slice/cpu.max": "200000 100000"},
    )
    assert workers_auto(proc, cgroup, affinity=16) == (2, "CPU quota 200000/100000 of 16 CPUs")


def test_cgroup_v2_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    # podman/docker with a cgroup namespace: the process sees "0::/" and its own cgroup as root
    proc, cgroup = tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    assert workers_auto(proc, cgroup, affinity=2) == (1, "CPU quota 100000/100000 of 2 CPUs")


V1_SELF = (
    "12:pids:/docker/abc\n"
    "4:cpu,cpuacct:/docker/abc\n"
    "1:name=systemd:/docker/abc\n"
    "0::/docker/abc\n"  # the hybrid layout: a unified line with no cpu.max
)


@pytest.mark.parametrize(
    ("quota", "workers", "why"),
    [
        ("100000", 1, "CPU quota 100000/100000 of 8 CPUs"),
        ("250000", 3, "CPU quota 250000/100000 of 8 CPUs"),
        ("-1", 8, "8 CPUs, no CPU quota"),
    ],
)
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, workers: int, why: str) -> None:
    proc, cgroup = tree(
        tmp_path,
        V1_SELF,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota + "\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert workers_auto(proc, cgroup, affinity=8) == (workers, why)


def test_cgroup_v1_mount_is_the_container_s_own_cgroup(tmp_path: Path) -> None:
    # without a cgroup namespace the path names the host's cgroup, absent under our mount
    proc, cgroup = tree(
        tmp_path,
        V1_SELF,
        {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_quota(proc, cgroup) == (100000, 100000)


def test_no_cgroup_information_means_the_affinity(tmp_path: Path) -> None:
    assert workers_auto(tmp_path / "none", tmp_path / "none", affinity=4) == (
        4,
        "4 CPUs, no CPU quota",
    )
    proc, cgroup = tree(tmp_path, "0::/x\n", {"x/cpu.max": "garbage"})
    assert workers_auto(proc, cgroup, affinity=4) == (4, "4 CPUs, no CPU quota")


def test_auto_in_the_config_keeps_its_reason(tmp_path: Path) -> None:
    from proxy.config import parse

    (tmp_path / "c.pem").write_text("x")
    conf = tmp_path / "s.toml"
    conf.write_text(
        '[service]\nworkers = "auto"\n[[egress]]\nname = "a"\nlisten = "127.0.0.1:1"\n'
        'upstream = "https://x.example"\nclient_cert = "c.pem"\nclient_key = "c.pem"\n'
    )
    config, findings = parse(conf)
    assert config is not None and not [f for f in findings if f.level == "error"]
    assert (config.service.workers, config.service.workers_why) == workers_auto()
