"""`ray up cluster/onprem.yaml` for real: an SSH server on this machine, a head on 127.0.0.1 and a
worker on 127.0.0.2, a run submitted with `ray job submit` (the README's cluster command), `ray down`.

Run: python -m pytest -m slow tests/test_cluster_onprem.py -v        (needs root and Debian's apt)

Everything runs as a user made for the test (``instantdl-test``), so the template's `ray stop` and
`ray down` can only reach that user's Ray, never the Ray of whoever runs the tests. What the test
changes in the template, and why (everything else is the template as a lab uses it):
* addresses, user and key: the loopback addresses, the test user and the key made for it;
* the install: the nodes link ``~/venv`` to a venv made for the test user from an interpreter it
  may run, with this test's packages on its path, instead of creating a venv and pip-installing
  torch (minutes and gigabytes; `tests/test_cluster_configs.py` checks that the template's
  install commands install the package);
* both "machines" are one machine and one user: the worker's `ray stop` would stop the head, so it is
  left out; each node gets 2 CPUs and ports of its own; SSH listens on a free port (set for both
  addresses in the test user's ``~/.ssh/config``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_run_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
USER = "instantdl-test"
GCS, DASH = 6432, 8432
BIN = Path(f"/home/{USER}/venv-test/bin")  # the test user's python and ray (user_environment)


def _sh(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def need_debian_packages(*packages: str) -> None:
    """Skip unless this process may install Debian packages (root, apt-get); install the missing."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: installs {', '.join(packages)} with apt-get and runs them")
    if not shutil.which("apt-get"):
        pytest.skip(f"needs Debian's apt-get to install {', '.join(packages)}")
    missing = [p for p in packages if _sh(["dpkg", "-s", p]).returncode != 0]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _sh(["apt-get", "update", "-qq"], env=env)
    r = r if r.returncode else _sh(["apt-get", "install", "-y", "-qq", *missing], env=env)
    if r.returncode:
        pytest.skip(f"cannot install {missing} with apt-get: {r.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(home: Path, extra: dict | None = None) -> dict:
    """The environment of a login of the test user (nothing of ours leaks in)."""
    return {"HOME": str(home), "USER": USER, "LOGNAME": USER, "LANG": "C.UTF-8",
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "RAY_AUTH_MODE": "token",
            "RAY_TMPDIR": f"/tmp/ray-{USER}", "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}


def _run_as(cmd: list[str], home: Path, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _sh(["runuser", "-u", USER, "--", "env", "-i", *[f"{k}={v}" for k, v in _as_user(home).items()], *cmd],
               timeout=timeout, cwd=cwd)


@pytest.fixture
def ssh_machine(tmp_path):
    """The test user with a key, and an SSH server on 127.0.0.1 and 127.0.0.2 that accepts it."""
    need_debian_packages("openssh-server", "openssh-client", "rsync")  # and adds a test user
    if _sh(["id", USER]).returncode:
        _sh(["useradd", "--create-home", "--shell", "/bin/bash", USER]).check_returncode()
    # no password, but not locked: sshd (without PAM) refuses locked accounts even with a key
    _sh(["usermod", "-p", "*", USER]).check_returncode()
    home = Path(pwd.getpwnam(USER).pw_dir)
    for stale in ("instantdl-ray", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem", ".ray", "venv", "venv-test"):
        p = home / stale
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    ssh_dir = home / ".ssh"
    shutil.rmtree(ssh_dir, ignore_errors=True)
    _run_as(["mkdir", "-m", "700", str(ssh_dir)], home).check_returncode()
    _run_as(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / "id_ed25519")], home).check_returncode()
    port = _free_port()
    (ssh_dir / "authorized_keys").write_text((ssh_dir / "id_ed25519.pub").read_text())
    (ssh_dir / "config").write_text(f"Host 127.0.0.1 127.0.0.2\n  Port {port}\n")
    for f in ("authorized_keys", "config"):
        shutil.chown(ssh_dir / f, USER, USER)
        (ssh_dir / f).chmod(0o600)
    etc = tmp_path / "sshd"
    etc.mkdir()
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_key")]).check_returncode()
    (etc / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {etc / 'host_key'}\n"
        f"PidFile {etc / 'sshd.pid'}\nPubkeyAuthentication yes\nPasswordAuthentication no\nUsePAM no\n"
        f"AllowUsers {USER}\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    sshd = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(etc / "sshd_config")],
                            stdout=open(etc / "sshd.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(30):
            r = _run_as(["ssh", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes", "-i",
                         str(ssh_dir / "id_ed25519"), f"{USER}@127.0.0.2", "echo ok"], home, timeout=30)
            if r.stdout.strip() == "ok":
                break
            time.sleep(1)
        else:
            pytest.fail(f"SSH to {USER}@127.0.0.2 failed: {r.stderr}\n{(etc / 'sshd.log').read_text()[-2000:]}")
        user_environment(home)
        yield home
    finally:
        sshd.terminate()
        sshd.wait(timeout=30)


def user_environment(home: Path) -> Path:
    """A venv for the test user with this environment's packages (through a ``.pth`` line) and a
    ``ray`` command: this interpreter often lives where other users cannot go (``/root/.pyenv``),
    so the venv is made from one of the same version the user may run. Returns its ``bin``."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.executable).resolve(), Path("/usr/bin") / version, Path("/usr/local/bin") / version]
    base = next((c for c in candidates if c.exists() and _run_as([str(c), "-c", "pass"], home).returncode == 0), None)
    if base is None:
        pytest.skip(f"no {version} that the test user may run (this one: {Path(sys.executable).resolve()})")
    venv = BIN.parent
    shutil.rmtree(venv, ignore_errors=True)
    r = _run_as([str(base), "-m", "venv", "--without-pip", str(venv)], home)
    assert r.returncode == 0, r.stderr
    purelib = _run_as([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      home).stdout.strip()
    import sysconfig

    # this environment's packages, and the repository (its editable install is a .pth of its own)
    Path(purelib, "instantdl_test_env.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{REPO}\n")
    (venv / "bin" / "ray").write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ray.scripts.scripts import main\n"
                                      "sys.exit(main())\n")
    (venv / "bin" / "ray").chmod(0o755)
    r = _run_as([str(BIN / "python"), "-c", "import ray, torch, instantdl_ray; print(ray.__version__)"], home)
    assert r.returncode == 0, f"the test user's environment does not import: {r.stderr[-2000:]}"
    return BIN


def _test_yaml(home: Path, path: Path) -> dict:
    """cluster/onprem.yaml with the test's changes (module docstring)."""
    raw = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    raw["cluster_name"] = "instantdl-onprem-test"
    raw["provider"].update(head_ip="127.0.0.1", worker_ips=["127.0.0.2"])
    raw["auth"] = {"ssh_user": USER, "ssh_private_key": str(home / ".ssh" / "id_ed25519")}
    raw["max_workers"] = 1
    raw["file_mounts"] = {k: (str(REPO / v) if v.startswith("./") else v) for k, v in raw["file_mounts"].items()}
    installs = [c for c in raw["setup_commands"] if "-m venv" in c or "pip install" in c]
    assert len(installs) == 4, installs  # venv, pip upgrade, ray, the package: replaced by one link
    raw["setup_commands"] = [f"ln -sfn {BIN.parent} ~/venv"] + [c for c in raw["setup_commands"] if c not in installs]

    def ports(cmd: str, own: str) -> str:
        if "ray start" not in cmd:
            return cmd
        return cmd.replace("--port=6379", f"--port={GCS}").replace(":6379", f":{GCS}") + " --num-cpus=2 " + own

    raw["head_start_ray_commands"] = [ports(c, (
        f"--dashboard-port={DASH} --ray-client-server-port=10432 --dashboard-agent-listen-port=52432 "
        "--metrics-export-port=8532 --min-worker-port=25000 --max-worker-port=25999")) for c in raw["head_start_ray_commands"]]
    raw["worker_start_ray_commands"] = [ports(c, (
        "--dashboard-agent-listen-port=52433 --metrics-export-port=8533 --min-worker-port=26000 "
        "--max-worker-port=26999")) for c in raw["worker_start_ray_commands"] if c.strip() != "ray stop"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def _alive_node_ips(home: Path) -> list[str]:
    code = ("import json, ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); "
            "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))" % GCS)
    r = _run_as([str(BIN / "python"), "-c", code], home, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []


def test_ray_up_job_submit_ray_down_on_loopback(ssh_machine, tmp_path):
    home = ssh_machine
    work = Path(f"/tmp/{USER}-work")  # readable by the test user (pytest's tmp_path is not)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.chown(work, USER, USER)
    cluster_yaml = work / "onprem-test.yaml"
    _test_yaml(home, cluster_yaml)
    cfg = make_run_config(work, 3)
    _sh(["chown", "-R", f"{USER}:{USER}", str(work)]).check_returncode()
    t0 = time.time()
    r = _run_as([str(BIN / "ray"), "get-auth-token", "--generate"], home)
    assert r.returncode == 0, r.stderr
    up = down = None
    try:
        up = _run_as([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(cluster_yaml)], home, timeout=600, cwd=REPO)
        (tmp_path / "ray_up.log").write_text(up.stdout + up.stderr)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        t_up = time.time() - t0
        deadline = time.time() + 300  # the head's autoscaler starts the worker over SSH
        # Ray replaces a head address of 127.0.0.1 by the machine's own address; the worker keeps 127.0.0.2
        while not (len(ips := _alive_node_ips(home)) == 2 and "127.0.0.2" in ips) and time.time() < deadline:
            time.sleep(5)
        monitor = sorted(Path(f"/tmp/ray-{USER}/ray/session_latest/logs").glob("monitor*"))
        assert len(ips) == 2 and "127.0.0.2" in ips, \
            f"nodes up: {ips}\n" + "\n".join(p.read_text()[-2000:] for p in monitor if p.suffix in (".log", ".out"))
        t_nodes = time.time() - t0
        run_dir = work / "run"
        job = _run_as([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{DASH}", "--working-dir", ".",
                       "--", "python", "-m", "instantdl_ray", "run", str(cfg), "--out", str(run_dir),
                       "--set", "ray.num_workers=2", "--set", "ray.placement_strategy=SPREAD"],
                      home, timeout=900, cwd=REPO)
        (tmp_path / "job.log").write_text(job.stdout + job.stderr)
        assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
        t_job = time.time() - t0
        state = json.loads((run_dir / "run.json").read_text())
        assert state["status"] == "complete"
        train_log = (run_dir / "logs" / "train.log").read_text()
        nodes = {line.split(" on node ")[1].strip() for line in train_log.splitlines() if " on node " in line}
        assert len(nodes) == 2, f"training ran on {nodes}:\n{train_log[-2000:]}"
        assert (run_dir / "checkpoints" / "best" / "model.pt").exists()
        res = json.loads((run_dir / "evaluation" / "results.json").read_text())
        assert 0 <= res["summary"]["jaccard"] <= 1
        assert len(list((run_dir / "predictions").glob("*.tif"))) == 2
    finally:
        down = _run_as([str(BIN / "ray"), "down", "-y", str(cluster_yaml)], home, timeout=300, cwd=REPO)
        (tmp_path / "ray_down.log").write_text(down.stdout + down.stderr)
        # whatever of the test user is left (only this test runs as that user)
        _sh(["pkill", "-KILL", "-u", USER])
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
    assert _sh(["pgrep", "-u", USER, "-f", "raylet"]).returncode != 0, "ray down left a raylet running"
    print(f"ray up {t_up:.0f} s, both nodes {t_nodes:.0f} s, job done {t_job:.0f} s, "
          f"ray down {time.time() - t0:.0f} s after the start; trained on nodes {sorted(nodes)}")
