"""What a user of a built wheel (not of this editable checkout) gets: the package, its recipes and the op sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import PY, REPO


@pytest.mark.slow
def test_a_built_wheel_in_a_fresh_virtualenv_finds_the_recipes(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"
    # build from a copy of the tracked files, so the checkout gets no build/ folder
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    r = subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("hcml-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # install = unpack the wheel into the fresh venv (no network, no pip needed there)
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel)],
                   check=True, timeout=300)
    # The fresh venv has only hcml; its dependencies (torch, ...) are borrowed from this environment's
    # site-packages, appended *after* the venv's own (and without running its .pth files, so the editable
    # checkout stays out of sight).
    deps = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path.append({deps!r}); import hcml, hcml.launch.config as c; "
            "p = c.resolve_recipe('k400_r2d50_joint'); cfg = c.load_config(p); "
            "print(hcml.__file__); print(p); print(cfg.model.arch, cfg.train.phase, cfg.data.frames); "
            "from hcml.ops._cuda import SOURCES; print(all(s.is_file() for s in SOURCES))")
    r = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pkg, recipe, summary, sources = r.stdout.strip().splitlines()
    assert pkg.startswith(site)
    assert recipe.startswith(site)
    assert recipe.endswith("k400_r2d50_joint.yaml")
    assert summary == "r2d50 joint 16"  # base: inheritance resolved inside the installed package
    assert sources == "True"
