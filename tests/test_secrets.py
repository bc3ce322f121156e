"""Nothing leaked, nothing lost on shared storage: redaction by name and by value, Hydra's
saved configs, symlinked locks, path-safe names, one file-mode policy.

    pytest tests/test_secrets.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import REPO, compose, launch

from cpt import store
from cpt.config import validate

KEY = "sk-proj-4f9aX2mQ7rT1vB8nL3kP"  # shaped like real keys, valid nowhere
HF = "hf_QmZx8RtY2wPv7nKs4LdG"
GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2"
SITE = "s3cr3t-value-from-env"


def test_redacts_by_value_in_any_string():
    doc = {
        "judge": {"base_url": f"https://user:{KEY}@llm.example.org/v1", "api_key_env": "X_KEY"},
        "cluster": {"additional_parameters": {"export": f"ALL,HF_TOKEN={HF}"}},
        "headers": [f"Authorization: Bearer {KEY}", "Bearer short"],
        "argv": ["jobs/launch.py", f"+judge.api_key={GH}", "teacher.sampling.max_new_tokens=64"],
        "notes": f"slack xoxb-1234567890-abcdef and AKIAABCDEFGHIJKLMNOP and {GH}",
        "token_url": f"https://{KEY}@host/v1",
    }
    out = json.dumps(store.redact(doc))
    for secret in (KEY, HF, GH, "xoxb-1234567890", "AKIAABCDEFGHIJKLMNOP"):
        assert secret not in out
    red = store.redact(doc)
    assert red["judge"]["base_url"] == "https://<redacted>@llm.example.org/v1"
    assert red["judge"]["api_key_env"] == "X_KEY"  # the name of a variable, not a secret
    assert red["argv"][2] == "teacher.sampling.max_new_tokens=64"
    assert red["headers"][1] == "Bearer short"  # too short to be a token: left alone


def test_max_new_tokens_and_token_counts_are_not_redacted():
    doc = {"max_new_tokens": 256, "prompt_tokens": 10, "tokenizer": "x", "hf_token": "abc"}
    assert store.redact(doc) == {**doc, "hf_token": "<redacted>"}


def test_redacts_the_values_of_secrets_env_variables(monkeypatch):
    monkeypatch.setenv("MY_SITE_PASS", SITE)  # a name no rule recognises
    doc = {"cluster": {"setup": [f"export PASSPHRASE_X={SITE}"]}, "argv": [f"x={SITE}"]}
    assert SITE in json.dumps(store.redact(doc))
    assert SITE not in json.dumps(store.redact(doc, secrets_env=["MY_SITE_PASS"]))


def test_manifest_redacts_config_params_and_argv(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SITE_PASS", SITE)
    manifest = {
        "key": "k",
        "config": {"judge": {"base_url": f"https://u:{KEY}@h/v1"}, "secrets_env": ["MY_SITE_PASS"]},
        "params": {"cluster": {"additional_parameters": {"export": f"ALL,HF_TOKEN={HF}"}}},
        "argv": ["launch.py", f"judge.base_url=https://u:{KEY}@h/v1", f"x={SITE}"],
    }
    store.mark_done(tmp_path, manifest)
    text = (tmp_path / store.MANIFEST).read_text()
    assert KEY not in text and HF not in text and SITE not in text
    assert "<redacted>" in text


def test_launch_writes_no_secret_anywhere(tmp_path):
    """The real entry point: Hydra's .hydra/*.yaml copies and every manifest."""
    run = tmp_path / "run"
    launch(
        f"run_dir={run}",
        "stage=tasks",
        f"judge.base_url=https://user:{KEY}@llm.example.org/v1",
        f"+cluster.additional_parameters.export='ALL,HF_TOKEN={HF}'",
        env={"MY_SITE_PASS": SITE},
        timeout=300,
    )
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(
        p.name == "overrides.yaml" for p in files
    )
    assert any(p.name == store.MANIFEST for p in files)
    for p in files:
        data = p.read_bytes()
        assert KEY.encode() not in data and HF.encode() not in data, p


def test_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / ".lock").symlink_to(victim)
    with (
        pytest.raises(store.StoreError, match=r"\.lock is a symlink; refusing to follow it"),
        store.stage_lock(stage),
    ):
        pass
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["../../x", "/etc/cron.d/x", "a/b", "..", ".hidden", "x\nname"])
def test_unsafe_names_cannot_leave_run_dir(tmp_path, name):
    with pytest.raises(store.StoreError, match="not a safe folder name"):
        store.Store(tmp_path).stage_dir("train", "0123456789abcdef", name)


def test_check_reports_an_unsafe_student_name():
    problems = validate(compose("student.name=../../escape"))
    assert any(
        p.startswith("student.name: '../../escape' is not a safe folder name") for p in problems
    )
    assert not validate(compose("student.name=qwen3-4b_v2.1"))


def test_results_follow_the_umask_and_slurm_folder_is_private(tmp_path):
    store.write_shard(tmp_path, 0, pa.table({"id": ["a"]}), {})
    mode = os.stat(store.shard_path(tmp_path, 0)).st_mode & 0o777
    assert mode == store.FILE_MODE and mode & 0o040  # group-readable under the usual umask
    private = store.private_dir(tmp_path / ".slurm")
    assert os.stat(private).st_mode & 0o777 == 0o700
    # a shared project's umask 007: results become group-writable too, others see nothing
    code = (
        "import os; os.umask(0o007); from pathlib import Path; from cpt import store; "
        f"p = Path({str(tmp_path)!r}) / 'm.json'; store.atomic_write_json(p, {{}}); "
        "print(oct(os.stat(p).st_mode & 0o777))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.stdout.strip() == "0o660"


def test_lock_files_follow_the_same_policy(tmp_path):
    with store.stage_lock(tmp_path):
        pass
    assert os.stat(tmp_path / ".lock").st_mode & 0o777 == store.FILE_MODE
    assert Path(tmp_path / ".lock").read_text().startswith("pid ")


RAY_AUTH_SCRIPT = """
set -euo pipefail
cd {repo}
export PATH={bin}:$PATH RAY_NUM_CPUS=1
unset RAY_AUTH_MODE RAY_AUTH_TOKEN RAY_ADDRESS
source slurm/ray_cluster.sh
ray_cluster_start
echo "MODE=$RAY_AUTH_MODE TOKEN_LEN=${{#RAY_AUTH_TOKEN}}"
python -c 'import ray; ray.init(address="auto", log_to_driver=False); print("WITH_TOKEN", len(ray.nodes()))'
if env -u RAY_AUTH_TOKEN HOME={home} timeout 60 python -c \\
    'import ray; ray.init(address="auto", log_to_driver=False)' 2>/dev/null; then
  echo "NO_TOKEN_ACCEPTED"
else
  echo "NO_TOKEN_REFUSED"
fi
"""


@pytest.mark.slow
def test_ray_cluster_script_uses_token_auth(tmp_path):
    """slurm/ray_cluster.sh heads demand Ray's token unless RAY_AUTH_MODE says otherwise."""
    script = RAY_AUTH_SCRIPT.format(repo=REPO, bin=Path(sys.executable).parent, home=tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    proc = subprocess.run(
        ["setsid", "bash", "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODE=token TOKEN_LEN=64" in out and "WITH_TOKEN 1" in out, out
    assert "NO_TOKEN_REFUSED" in out, out


RAY_AUTH_PY = """
import os, subprocess, sys
import ray
from cpt.cluster import ray_cluster

with ray_cluster(num_cpus=1) as address:
    print("MODE", os.environ["RAY_AUTH_MODE"], len(os.environ["RAY_AUTH_TOKEN"]))
    ray.init(address=address, log_to_driver=False)
    print("NODES", len(ray.nodes()))
    ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = sys.argv[1]
    probe = "import ray; ray.init(address=%r, log_to_driver=False)" % address
    rc = subprocess.run([sys.executable, "-c", probe], env=env, timeout=120,
                        capture_output=True).returncode
    print("NO_TOKEN_RC", rc)
print("AFTER", os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN"))
"""


@pytest.mark.slow
def test_python_ray_cluster_uses_token_auth(tmp_path):
    """cpt.cluster.ray_cluster (multi-node stage jobs) demands Ray's token by default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", RAY_AUTH_PY, str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env, cwd=REPO,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODE token 64" in out and "NODES 1" in out, out
    assert "NO_TOKEN_RC 0" not in out and "NO_TOKEN_RC" in out, out  # refused without it
    assert "AFTER None None" in out  # the token leaves the environment with the cluster
