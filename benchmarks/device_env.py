"""What mimco needs from a Python environment, read from pyproject.toml, and the wheels that carry it
to a machine that has no package index (a lent GPU machine). Standard library only.

    python benchmarks/device_env.py wheels            # here, with the index: fill .device-wheels/
    python benchmarks/device_env.py missing           # there: requirements this Python lacks or has too old
    python benchmarks/device_env.py plan --dir D      # there: those, and what their wheels in D need that it lacks
    python benchmarks/device_env.py floors            # pip constraints pinning every dependency to its floor

``wheels`` downloads, for CPython 3.12 on x86-64 (the lent machine's Python) and for the Python that
runs it, the packages the lent machine's image lacks (``CARRIED``) at the versions installed here,
so the GPU runs what the tests ran. ``missing`` prints one requirement a line (``name>=floor``) and
exits 0; ``benchmarks/gpu_check.sh`` installs those from the wheel folder, and refuses in one line
when one of them is not there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".device-wheels"
#: what the lent machine's image lacks (kornia, kornia_rs) or may hold in an older release (timm)
CARRIED = ("kornia", "kornia_rs", "timm")
#: the lent machine's interpreter: CPython 3.12 on x86-64 Linux
DEVICE_PYTHON, DEVICE_PLATFORMS = "3.12", ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 64  # what the device tool carries in all (the working tree included)


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, str]]:
    """(distribution name, floor version) of every runtime dependency, in pyproject order."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for d in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)", d)
        if not m:
            raise SystemExit(f"device_env: '{d}' in pyproject.toml has no '>=' floor; every dependency needs one")
        out.append((m.group(1), m.group(2)))
    return out


def version_key(v: str) -> tuple[int, ...]:
    """Release numbers of a version string: '2.11.0+cu130' -> (2, 11, 0); '1.0.20.dev0' -> (1, 0, 20)."""
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0].split("dev")[0].split("rc")[0])[:4])


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing() -> list[str]:
    """``name>=floor`` for each requirement absent here or older than its floor."""
    out = []
    for name, floor in requirements():
        have = installed(name)
        if have is None or version_key(have) < version_key(floor):
            out.append(f"{name}>={floor}")
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_requires(folder: Path) -> dict[str, list[str]]:
    """{package: the names it requires unconditionally} for every wheel in ``folder`` (from METADATA)."""
    out: dict[str, list[str]] = {}
    for whl in folder.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = z.read(meta).decode() if meta else ""
        reqs = [m.group(1) for line in text.splitlines() if line.startswith("Requires-Dist:") and ";" not in line
                for m in [re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line)] if m]
        out[_norm(whl.name.split("-")[0])] = reqs
    return out


def plan(folder: Path) -> list[str]:
    """What to install from ``folder``: each missing requirement (``name>=floor``) and, for each, what its
    wheel requires that this Python lacks (kornia needs kornia_rs), transitively."""
    todo, requires = missing(), _wheel_requires(folder) if folder.is_dir() else {}
    queue, seen = [re.split(r"[<>=]", r)[0] for r in todo], set()
    while queue:
        name = queue.pop()
        if _norm(name) in seen:
            continue
        seen.add(_norm(name))
        for dep in requires.get(_norm(name), []):
            if installed(dep) is None and _norm(dep) not in seen and dep not in todo:
                todo.append(dep)
                queue.append(dep)
    return todo


def wheels(folder: Path) -> int:
    """Download the carried packages, at the versions installed here, for the device's Python and this one."""
    pins = []
    for name in CARRIED:
        have = installed(name)
        if have is None:
            raise SystemExit(f"device_env: {name} is not installed in {sys.executable}; run `make setup` first")
        pins.append(f"{name}=={have}")
    folder.mkdir(parents=True, exist_ok=True)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    for py in dict.fromkeys((DEVICE_PYTHON, here)):
        plat = [a for p in DEVICE_PLATFORMS for a in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", py, "--implementation", "cp", *plat, "-d", str(folder), *pins]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"device_env: pip could not download {' '.join(pins)} for Python {py}")
    files = sorted(folder.glob("*.whl"))
    total = sum(f.stat().st_size for f in files) / 2**20
    for f in files:
        print(f"{f.stat().st_size / 2**20:6.1f} MiB  {f.name}")
    print(f"{total:6.1f} MiB in {folder} (the device tool carries {LIMIT_MIB} MiB in all, the working tree included)")
    return 0 if total < LIMIT_MIB / 2 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["wheels", "missing", "plan", "floors"])
    p.add_argument("--dir", default=str(WHEELS), help="the wheel folder (default .device-wheels)")
    a = p.parse_args()
    if a.what == "wheels":
        return wheels(Path(a.dir))
    if a.what == "plan":
        lines = plan(Path(a.dir))
    else:
        lines = missing() if a.what == "missing" else [f"{n}=={v}" for n, v in requirements()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
