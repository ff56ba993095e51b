"""The installable package (pyproject.toml): built and installed offline from a copy of the
sources (so the checkout gets no build/ or egg-info), then imported from another folder. Offline
means --no-build-isolation: the build uses this environment's setuptools, which must be as new as
pyproject's [build-system] asks (a fresh Python 3.11 venv carries setuptools 65.5, which cannot
build a wheel without the `wheel` package); where it is older, those tests skip saying so."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q"]


def build_problem() -> str | None:
    """Why this environment cannot build the package offline, or None."""
    [need] = [r for r in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
              if r.startswith("setuptools")]
    low = tuple(int(x) for x in need.removeprefix("setuptools>=").split("."))
    try:
        have = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return f"no setuptools in this environment; pyproject.toml builds with {need} (pip install '{need}')"
    version = tuple(int(x) for x in re.findall(r"\d+", have)[:len(low)])
    # 64 to 70.0 build editable installs too, given the `wheel` package
    if version >= low or (version >= (64,) and importlib.util.find_spec("wheel")):
        return None
    return (f"setuptools {have} here, pyproject.toml builds with {need} (older ones need the `wheel` package): "
            f"pip install '{need}' to test the offline build")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    problem = build_problem()
    if problem:
        pytest.skip(problem)
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    for package in ("reproduction", "data_prep"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(REPO / "hubconf.py", src)  # present, so that the test shows it is left out
    return src


def pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ | {"PIP_NO_INPUT": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def import_from(folder: Path, site: Path, code: str) -> str:
    """Run `code` in a fresh interpreter whose only way to the package is `site`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", f"import site; site.addsitedir({str(site)!r}); {code}"],
                          cwd=folder, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_wheel_holds_both_packages_and_the_kernel_source(sources, tmp_path):
    pip("wheel", *OFFLINE, "-w", str(tmp_path / "dist"), str(sources), cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        z.extractall(tmp_path / "site")
    assert {"reproduction/__init__.py", "reproduction/ops/kernels.c", "reproduction/model.py",
            "data_prep/__init__.py", "data_prep/image.py"} <= names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"reproduction", "data_prep"}, top  # not hubconf.py, tests or results
    assert "Requires-Python: >=3.11" in metadata and "Requires-Dist: torch>=" in metadata
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = import_from(elsewhere, tmp_path / "site", "import reproduction, data_prep; print(reproduction.__file__)")
    assert Path(out.strip()).parent == tmp_path / "site" / "reproduction"


def test_an_editable_install_imports_from_another_folder(sources, tmp_path):
    """What README's `pip install -e .` does, into a prefix of its own."""
    pip("install", *OFFLINE, "--prefix", str(tmp_path / "prefix"), "-e", str(sources), cwd=tmp_path)
    [site] = (tmp_path / "prefix").glob("lib/python*/site-packages")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = import_from(elsewhere, site, "import reproduction, data_prep; print(reproduction.__file__)")
    assert Path(out.strip()) == sources / "reproduction" / "__init__.py"  # the sources, edited in place


def test_dependencies_are_ranges_that_hold_the_pins():
    """Every pinned package (pytest and setuptools aside: test and build tools) is a dependency
    (or of the onnx extra), and its pin is in range."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = dict(re.fullmatch(r"([A-Za-z0-9_-]+)>=([0-9.]+)", d).groups()
                  for d in project["dependencies"] + project["optional-dependencies"]["onnx"])
    pins = dict(re.fullmatch(r"([A-Za-z0-9_-]+)==([0-9.]+)", line).groups()
                for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    version = lambda v: tuple(int(x) for x in v.split("."))
    assert set(ranges) == set(pins) - {"pytest", "setuptools"}
    for name, low in ranges.items():
        assert version(low) <= version(pins[name]), (name, low, pins[name])
    assert project["requires-python"] == ">=3.11"


def test_an_old_setuptools_is_named_with_the_fix(monkeypatch):
    """What a fresh Python 3.11 venv (setuptools 65.5, no `wheel`) gets instead of a failed build."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "65.5.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert build_problem() == ("setuptools 65.5.0 here, pyproject.toml builds with setuptools>=70.1 (older ones "
                               "need the `wheel` package): pip install 'setuptools>=70.1' to test the offline build")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "84.2.1")
    assert build_problem() is None
