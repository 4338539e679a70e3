"""Files between machines through the project's DVC remote, named by their DVC hash.

A flow's units of work run in other checkouts: the run's dvc.lock, params.yaml and config/ go to
them, and their partial outputs (an extraction shard's units, a sampler configuration's folder)
come back, as content-addressed objects of the DVC remote. Only the hash travels through Prefect.
A scratch DVC repo (no git) does the transfers, so the checkout gains no .dvc files.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DVC = str(Path(sys.executable).parent / "dvc")


def _dvc(*args: str, cwd: Path) -> str:
    out = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` in {cwd} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout


def _scratch(tmp: Path, project: Path) -> Path:
    """A DVC repo in tmp with the project's default remote and cache."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise RuntimeError(f"{project}: no default DVC remote; add one (`dvc remote add -d NAME URL`)")
        url, cache = repo.config["remote"][name]["url"], repo.cache.local_cache_dir
    _dvc("init", "-q", "--no-scm", cwd=tmp)
    _dvc("remote", "add", "-q", "-d", "run", url, cwd=tmp)
    _dvc("cache", "dir", cache, cwd=tmp)
    return tmp


def upload(path: Path, project: Path) -> str:
    """Push a file or folder to the DVC remote; its DVC hash (md5, `.dir` for a folder)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        scratch = _scratch(Path(tmp), project)
        _dvc("add", "-q", str(Path(path).resolve()), "--to-remote", "-o", "out", cwd=scratch)
        return yaml.safe_load((scratch / "out.dvc").read_text())["outs"][0]["md5"]


def download(md5: str, project: Path, dest: Path, overwrite: bool) -> None:
    """Pull object `md5` and copy its files into dest; `overwrite` off keeps files already there
    (units of work own disjoint files: a store's shared metadata is the same everywhere)."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = _scratch(Path(tmp), project)
        (scratch / "out.dvc").write_text(f"outs:\n- md5: {md5}\n  hash: md5\n  path: out\n")
        _dvc("pull", "-q", cwd=scratch)
        src = scratch / "out"
        files = [f for f in src.rglob("*") if f.is_file()] if src.is_dir() else [src]
        for f in files:
            target = Path(dest) / f.relative_to(src) if src.is_dir() else Path(dest)
            if overwrite or not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
