"""Shared fixtures: the repository root, tiny settings, and demo data built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import train_gpt  # noqa: E402

TINY = dict(profile="test", vocab_size=64, num_layers=2, model_dim=32, num_heads=2,
            num_kv_heads=1, mlp_mult=2, rope_dims=8, xsa_layers=1, enc_layers=2, dec_hidden=32,
            eam_key_dim=8, eam_locations=64, eam_read_k=4, eam_write_k=4, eval_seq_len=32,
            eval_stride=8, eval_batch_windows=4, knn_chunk_tokens=16, knn_k=4, compile=False)


def tiny_args(**overrides) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**{**TINY, **overrides})


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Challenge-format shards and a tokenizer made from the stdlib's docstrings (no downloads)."""
    import make_demo_data

    out = tmp_path_factory.mktemp("demo") / "demo_sp1024"
    make_demo_data.build_demo_data(out, max_train_tokens=400_000, challenge_tokenizer=None)
    return out


def run_script(env: dict[str, str], cwd: Path, nproc: int = 1,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_gpt.py as a user would (plain python, or torchrun for several processes)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([*launcher, str(REPO / "train_gpt.py")], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"train_gpt.py failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result
