"""Packaging for the Pi: the `pi` extra, and the README's install steps the CI checks follow."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def pi_section() -> str:
    return README.read_text().split("## Install on a Raspberry Pi", 1)[1].split("\n## ", 1)[0]


def test_pi_extra_pins_a_real_lgpio() -> None:
    # PyPI's lgpio before 0.2.2 is an empty placeholder: installing it "works" and the button
    # silently has no driver.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    lgpio = [r for r in extras["pi"] if r.split(">")[0].split("=")[0].strip() == "lgpio"]
    assert lgpio == ["lgpio>=0.2.2,<0.3"]


def test_readme_installs_the_pi_extra_in_a_plain_venv() -> None:
    section = pi_section()
    assert "pip install '.[pi]'" in section
    assert "pip install . lgpio" not in section
    # A venv that sees the system's site-packages imports Raspberry Pi OS's numpy-1 builds
    # next to the venv's numpy 2.
    assert "venv --system-site-packages" not in section
    assert "sudo python3 -m venv /opt/doorbell-agent/venv" in section


def readme_steps(first: int, last: int) -> list[str]:
    done = subprocess.run(
        ["bash", "-c", f". scripts/lib/rootfs.sh && readme_pi_steps {first} {last}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return done.stdout.splitlines()


def test_checks_run_the_readme_steps_as_written() -> None:
    steps = readme_steps(1, 6)
    assert steps[0] == "sudo apt-get update"
    assert "sudo /opt/doorbell-agent/venv/bin/pip install '.[pi]'" in " ".join(steps)
    assert steps.count("edit_file /etc/doorbell-agent/agent.yaml") == 1
    assert not [s for s in steps if "sudoedit" in s or "journalctl" in s]
    assert "sudo systemctl enable --now doorbell-agent" in steps
    # The emulated check stops before the service (no systemd in a chroot).
    assert not [s for s in readme_steps(1, 5) if "systemctl" in s]
    for script in ("check-arm64.sh", "check-systemd.sh"):
        assert "readme_pi_steps" in (ROOT / "scripts" / script).read_text(), script
