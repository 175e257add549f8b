"""The `ray up` files in cluster/: Ray's own config validation, and that their setup installs the package.

No cloud calls: ``prepare_config`` + ``validate_config`` are what ``ray up`` runs before it asks the
provider anything (they merge Ray's defaults and check ``ray/autoscaler/ray-schema.json`` plus
cross-field rules). The install check mirrors the file_mounts into a temporary HOME and runs the
YAML's own venv + ``pip install -e`` commands there (offline: ``--no-deps``, dependencies come
from this project's environment through a ``.pth`` file).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
INSTALL_RE = re.compile(r"pip install (?:[^|;&]*\s)?-e\s+(\S+)")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(raw: dict) -> dict:
    """What `ray up` does to a config before any cloud call; returns the filled-out config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def _install_commands(cfg: dict) -> list[str]:
    return [c for c in cfg.get("setup_commands", []) if INSTALL_RE.search(c)]


def _ids(paths):
    return [p.name for p in paths]


def test_cluster_folder_has_the_documented_files():
    names = {p.name for p in YAMLS}
    assert {"minimal.yaml", "gpu_aws.yaml", "onprem.yaml"} <= names
    assert (CLUSTER / "README.md").exists()


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_passes_ray_cluster_config_validation(path):
    raw = _load(path)
    cfg = ray_validate(raw)
    # every node (head and workers) runs the package install, after the common setup
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(INSTALL_RE.search(c) for c in cfg[key]), f"{path.name}: no `pip install -e` in {key}"
    assert cfg["head_node_type"] in cfg["available_node_types"]


# each: (what is broken, how) -- applied to a copy of every YAML it concerns, all must be rejected by Ray
COMMON_BREAKAGES = {
    "typo_top_level_key": lambda c: c.update(max_worker=c.pop("max_workers")),
    "max_workers_not_int": lambda c: c.update(max_workers="four"),
    "setup_command_not_string": lambda c: c.update(setup_commands=[*c.get("setup_commands", []), 42]),
}
# cloud providers: node types
NODE_TYPE_BREAKAGES = {
    "node_type_without_resources": lambda c: next(iter(c["available_node_types"].values())).pop("resources"),
    "unknown_node_type_field": lambda c: next(iter(c["available_node_types"].values())).update(gpus=1),
    "head_type_missing": lambda c: c.update(head_node_type="no_such_type"),
    "min_workers_above_max": lambda c: [t.update(min_workers=50) for n, t in c["available_node_types"].items()
                                        if n != c["head_node_type"]],
}
# own machines (`local` provider): a fixed list of addresses, no node types
LOCAL_BREAKAGES = {
    "head_ip_missing": lambda c: c["provider"].pop("head_ip"),
    "worker_ips_missing": lambda c: c["provider"].pop("worker_ips"),
    "node_types_on_own_machines": lambda c: c.update(available_node_types={"w": {"node_config": {}, "resources": {}}}),
}


def _breakage_cases():
    cases = []
    for path in YAMLS:
        local = _load(path)["provider"]["type"] == "local"
        for name in sorted(COMMON_BREAKAGES | (LOCAL_BREAKAGES if local else NODE_TYPE_BREAKAGES)):
            cases.append(pytest.param(path, name, id=f"{path.name}-{name}"))
    return cases


ALL_BREAKAGES = COMMON_BREAKAGES | NODE_TYPE_BREAKAGES | LOCAL_BREAKAGES


@pytest.mark.parametrize("path,breakage", _breakage_cases())
def test_broken_copy_fails_validation(path, breakage, tmp_path):
    import click
    import jsonschema

    raw = _load(path)
    ALL_BREAKAGES[breakage](raw)
    broken = tmp_path / f"broken_{path.name}"
    broken.write_text(yaml.safe_dump(raw))
    # Ray's local-provider checks abort through its CLI logger (a click exception), or compare
    # max_workers before the schema check (a TypeError)
    with pytest.raises((jsonschema.ValidationError, ValueError, TypeError, click.ClickException)):
        ray_validate(_load(broken))


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_file_mounts_and_install_path_agree(path):
    """Local mount sources exist (relative to the repo root, where `ray up` runs), the mounts carry
    what `pip install -e` needs, and the install command points at the mounted copy."""
    raw = _load(path)
    mounts = raw.get("file_mounts") or {}
    installs = _install_commands(raw)
    assert len(installs) == 1, f"{path.name}: expected one `pip install -e` setup command, got {installs}"
    target = INSTALL_RE.search(installs[0]).group(1).rstrip("/")
    mounted = {}
    for remote, local in mounts.items():
        if str(local).startswith("~"):
            continue  # the auth token: a file on the user's machine, checked below
        src = (REPO / local).resolve()
        assert src.exists(), f"{path.name}: file_mounts source {local} does not exist in {REPO}"
        mounted[str(remote).rstrip("/")] = src
    for needed in ("instantdl_ray", "pyproject.toml", "README.md"):
        assert mounted.get(f"{target}/{needed}") == (REPO / needed).resolve(), \
            f"{path.name}: {target}/{needed} is not mounted from ./{needed}"


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_ray_version_and_token_auth(path):
    import ray

    raw = _load(path)
    pins = re.findall(r"ray\[[^\]]*\]==([0-9][\w.]*)", " ".join(raw.get("setup_commands", [])))
    assert pins == [ray.__version__], f"{path.name}: the cluster must run this machine's Ray {ray.__version__}"
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{path.name}: {key}"
    # the dashboard / job API (port 8265) is reached through `ray dashboard`'s SSH tunnel only
    heads = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in heads and "0.0.0.0" not in heads, \
        f"{path.name}: the dashboard must listen on the head's loopback only"


# ------------------------------------------------------------------ the setup really installs


def _strip_privileged(cmd: str) -> str:
    """Drop `|| (sudo apt-get ...)` fallbacks: the test never installs system packages."""
    parts = [p for p in cmd.split(" || ") if "sudo" not in p and "apt-get" not in p]
    return " || ".join(parts)


def _run(cmd: str, home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=timeout, cwd=home)


def _unique_setups() -> list[Path]:
    seen, out = set(), []
    for p in YAMLS:
        raw = _load(p)
        key = (tuple(raw.get("setup_commands", [])), tuple(sorted((raw.get("file_mounts") or {}).items())))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


SETUPS = _unique_setups()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("path", SETUPS, ids=_ids(SETUPS))
def test_setup_commands_install_package_in_fresh_venv(path, tmp_path):
    raw = _load(path)
    home = tmp_path / "home"
    home.mkdir()
    excludes = shutil.ignore_patterns(*(raw.get("rsync_exclude") or []))
    for remote, local in (raw.get("file_mounts") or {}).items():  # what `ray up` rsyncs to each node
        if str(local).startswith("~"):
            continue  # never copy the user's auth token
        assert str(remote).startswith("~/"), f"{path.name}: remote {remote} outside HOME"
        dst, src = home / str(remote)[2:], REPO / local
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, ignore=excludes) if src.is_dir() else shutil.copy2(src, dst)

    venv_cmds = [c for c in raw["setup_commands"] if re.search(r"-m venv\b", c)]
    assert len(venv_cmds) == 1, f"{path.name}: expected one venv command, got {venv_cmds}"
    venv_dir = Path(re.search(r"-m venv(?:\s+--\S+)*\s+(\S+)", _strip_privileged(venv_cmds[0])).group(1)
                    .replace("~", str(home), 1))
    # the node's python3 -> this project's interpreter, so the .pth below matches its Python version
    cmd = re.sub(r"(?<![/\w])python3\b", shlex.quote(sys.executable), _strip_privileged(venv_cmds[0]))
    r = _run(cmd, home)
    assert r.returncode == 0, f"venv: {cmd}\n{r.stdout}\n{r.stderr}"
    py = venv_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # dependencies (torch, ray, ...) from this project's environment; a plain path line, so this
    # environment's own editable install of the package is *not* activated
    Path(purelib, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Offline there is no build isolation (on a node pip fetches setuptools>=61 from PyPI): the
    # build backend then comes from the project environment, not the venv's bundled old setuptools
    # (Python < 3.12 venvs ship setuptools 65, which needs the `wheel` package to build editables).
    _run(f"{shlex.quote(str(py))} -m pip uninstall -y -q setuptools", home)

    install = _install_commands(raw)[0] + " --no-deps --no-build-isolation"
    r = _run(install, home)
    assert r.returncode == 0, f"install: {install}\n{r.stdout}\n{r.stderr}"

    r = _run(f"{shlex.quote(str(py))} -m instantdl_ray --help", home, timeout=120)
    assert r.returncode == 0 and "run" in r.stdout, r.stdout + r.stderr
    r = _run(f"{shlex.quote(str(py))} -c 'import instantdl_ray, instantdl_ray.cli; print(instantdl_ray.__file__)'",
             home, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().is_relative_to(home.resolve()), \
        f"imported {r.stdout.strip()}, not the copy mounted under {home}"
