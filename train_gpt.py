"""eam-golf: a Parameter Golf language model, a transformer with a memory of next-token counts.

  1. settings      one frozen Hyperparameters from environment variables (PROFILE picks presets)
  2. runtime       torchrun or single process, NCCL on CUDA, gloo on CPU, one log function
  3. data          challenge-format shards, each rank its own part, bits-per-byte tables
  4. teacher       a modern GPT trained with DDP + Muon inside its share of the time budget
  5. memory        next-token counts of exact recent contexts (by default none ship)
  6. distillation  the teacher, a decoder and a prefix-only gate that mixes in the memory
  7. packing       quantized, zstd-compressed artifact that fits 16,000,000 bytes with this file
  8. evaluation    from the artifact alone: sliding windows, score-first learning (the memory
                   counts scored text, test-time training, a kNN store)

`PROFILE=cpu_smoke python train_gpt.py` on a laptop, `torchrun --standalone --nproc_per_node=8
train_gpt.py` on 8xH100. Nothing runs at import.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import importlib
import itertools
import json
import math
import os
import platform
import re
import struct
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------
# 1. Settings
#
# Every knob is a field of one frozen dataclass, read from its upper-case environment variable;
# PROFILE selects a preset of defaults. Bad values and unknown settings fail naming the variable.
# -------------------------------------------------------------------------------------------------

DEMO_DATA = "./data/demo_sp1024"
SHIPPED_MODELS = ("eam", "transformer")  # MODEL: the memory model, or the built-in baseline
# What the CPU profiles share: a small teacher with the options that help below ~2M parameters,
# no compilation, no kNN store (on two cores it would take most of the evaluation's time).
CPU_COMMON: dict[str, object] = dict(
    val_tokens=65536, compile=False, teacher_reference=True, grad_accum_world=2,
    num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=2, xsa_layers=2,
    enc_layers=2, rope_dims=0, qk_gain_init=1.5, ln_scale=False, dec_hidden=256,
    train_seq_len=256, train_batch_tokens=8192, distill_batch_tokens=8192, eval_seq_len=256,
    eval_batch_windows=32, eval_chunk_tokens=4096, warmup_steps=10, knn_key_dim=64,
    distill_history_tokens=1_048_576, quant_bits=6, knn_lambda=0.0,
)
PROFILES: dict[str, dict[str, object]] = {
    "competition": {},  # 8xH100, 600 s of training and 600 s of evaluation
    # The whole pipeline in about a minute on 2 CPU cores, on the demo data.
    "cpu_smoke": CPU_COMMON | dict(
        data_path=DEMO_DATA, tokenizer_path=f"{DEMO_DATA}/tokenizer.model",
        max_wallclock_seconds=30.0, teacher_time_frac=0.5, distill_time_frac=0.5,
        train_seq_len=128, train_batch_tokens=4096, distill_batch_tokens=4096, eval_seq_len=128,
        eval_batch_windows=64, warmup_steps=5, knn_key_dim=32, eam_context_tokens=262_144),
    # A benchmark on 2 CPU cores (8-10 minutes), its teacher trained from scratch: steep.
    "cpu_proxy": CPU_COMMON | dict(
        max_wallclock_seconds=420.0, teacher_time_frac=0.45, distill_time_frac=0.55,
        size_limit=1_000_000, eam_context_tokens=1_048_576),
    # Where transformers are strong: every run continues a teacher trained to 100 tokens a
    # parameter (tools.pretrain_teacher); the limit and the code's share bind as at 16 MB.
    "cpu_converged": CPU_COMMON | dict(
        init_checkpoint="checkpoints/cpu_converged_teacher.pt", num_layers=4, xsa_layers=4,
        enc_layers=4, dec_hidden=128, quant_bits=5, max_wallclock_seconds=300.0,
        teacher_time_frac=0.45, distill_time_frac=0.55, size_limit=470_000, size_code_bytes=4_700,
        val_tokens=262_144),
}
LOWEST_QUANT_BITS = 5  # the fewest bits a matrix value packs to (the baseline's floor)


@dataclass(frozen=True)
class Hyperparameters:
    # Run and data.
    profile: str = "competition"
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    vocab_size: int = 1024
    seed: int = 1337
    run_id: str = ""  # default <profile>_seed<seed>; logs/RUN_ID.txt
    val_tokens: int = 0  # 0: the whole split
    artifact_path: str = ""  # default RUN_ID.eam
    model: str = "eam"  # or "transformer": the baseline, the teacher trained for the whole budget
    eval_only: bool = False
    compile: bool = True
    init_checkpoint: str = ""  # a teacher from tools.pretrain_teacher: benchmarks only
    # MAX_WALLCLOCK_SECONDS from the process's start to the packed artifact, and again for the
    # evaluation; the stages end at cumulative shares of it, less packing's reserve.
    max_wallclock_seconds: float = 600.0
    train_reserve_frac: float = 0.05
    teacher_time_frac: float = 0.62
    distill_time_frac: float = 0.38
    # Teacher.
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 3
    mlp_leaky_slope: float = 0.5
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    qk_gain_init: float = 4.0
    ln_scale: bool = True
    xsa_layers: int = 11
    ema_decay: float = 0.997
    train_seq_len: int = 1024
    train_batch_tokens: int = 524288
    grad_accum_world: int = 8
    iterations: int = 20000
    warmup_steps: int = 20
    warmdown_frac: float = 0.35
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    embed_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_weight_decay: float = 0.04
    muon_row_norm: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    train_log_every: int = 50
    # The memory: counts of the empty context and of EAM_CONTEXT_MIN_LENGTH..ORDER - 1 tokens
    # (ORDER 0: no memory) from EAM_CONTEXT_TOKENS training tokens (0: none ship), pairs seen
    # fewer than MIN_COUNT times dropped; and of EAM_LEARNED_LENGTHS, longer contexts counted
    # only from text already read.
    eam_context_order: int = 4
    eam_context_min_length: int = 2
    eam_context_tokens: int = 0
    eam_context_min_count: int = 2
    eam_learned_lengths: str = "4,6,8,12,16"
    # Distillation: the student's encoder is the teacher's lowest ENC_LAYERS blocks; its memory
    # counts DISTILL_HISTORY_TOKENS of the text it trains on before it starts afresh.
    enc_layers: int = 11
    dec_hidden: int = 512
    distill_lr_scale: float = 0.5
    distill_batch_tokens: int = 262144
    distill_kl_weight: float = 0.5
    distill_temperature: float = 1.0
    distill_iterations: int = 0
    distill_history_tokens: int = 16_777_216
    # Packing. SIZE_CODE_BYTES: the code's bytes the size rule counts (0: train_gpt.py on disk,
    # as a submission must; a benchmark far below 16 MB may give the code its share there).
    quant_bits: int = 5
    size_limit: int = 16_000_000
    size_code_bytes: int = 0
    zstd_level: int = 22
    # Evaluation: sliding windows, then score-first learners after each EVAL_CHUNK_TOKENS chunk.
    eval_seq_len: int = 1024
    eval_stride: int = 64
    eval_batch_windows: int = 32
    eval_chunk_tokens: int = 65536
    knn_lambda: float = 0.1  # the score-first kNN store's weight x the best similarity (0: off)
    knn_k: int = 32
    knn_beta: float = 20.0
    knn_key_dim: int = 128
    knn_capacity: int = 4_000_000
    ttt_steps: int = 1  # score-first test-time training: optimizer steps per chunk (0: off)
    ttt_params: str = "all"  # what adapts: parameter name prefixes, comma-separated, or all
    ttt_lr_scale: float = 0.01  # times the training learning rates (Muon matrices, Adam others)
    ttt_batch_rows: int = 8  # windows per gradient micro-batch, fixed whatever the world size
    eval_memory_writes: bool = True  # the memory counts the scored text (the baseline has none)
    teacher_reference: bool = False  # also score the teacher and the model before packing

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Hyperparameters:
        environ = dict(os.environ if environ is None else environ)
        profile = environ.get("PROFILE", "competition")
        if profile not in PROFILES:
            raise ValueError(f"PROFILE={profile!r}: expected one of {sorted(PROFILES)}")
        check_setting_names(environ)
        values: dict[str, object] = {"profile": profile, **PROFILES[profile]}
        types = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            name = field.name.upper()
            if field.name != "profile" and name in environ:
                values[field.name] = _parse_setting(name, environ[name], types[field.name])
        if values.get("eval_only") and "ARTIFACT_PATH" not in environ:
            raise ValueError("EVAL_ONLY=1: set ARTIFACT_PATH to the artifact to score")
        # On by default for the memory model; asked for by name, the baseline cannot have it.
        if ("EVAL_MEMORY_WRITES" in environ and values["eval_memory_writes"]
                and values.get("model", "eam") != "eam" and not values.get("eval_only")):
            raise ValueError(f"EVAL_MEMORY_WRITES=1 writes into the memory: MODEL="
                             f"{values['model']!r} has none")
        return cls(**values)

    def __post_init__(self) -> None:
        types = typing.get_type_hints(type(self))
        object.__setattr__(self, "run_id", self.run_id or default_run_id(self.profile, self.seed))
        object.__setattr__(self, "artifact_path", self.artifact_path or f"{self.run_id}.eam")
        for field in dataclasses.fields(self):
            value, name = getattr(self, field.name), field.name.upper()
            if types[field.name] is float and not math.isfinite(value):
                raise ValueError(f"{name}={value}: must be a finite number")
            if types[field.name] in (int, float) and value < 0:
                raise ValueError(f"{name}={value}: must not be negative")
        positive = ["vocab_size", "model_dim", "num_heads", "num_kv_heads", "num_layers",
                    "mlp_mult", "logit_softcap", "rope_base", "train_seq_len",
                    "train_batch_tokens", "grad_accum_world", "train_log_every", "knn_key_dim",
                    "enc_layers", "dec_hidden", "distill_batch_tokens", "distill_temperature",
                    "eval_seq_len", "eval_stride", "eval_batch_windows", "knn_k",
                    "eval_chunk_tokens", "knn_capacity", "ttt_batch_rows", "eam_context_min_count",
                    "max_wallclock_seconds", "size_limit", "distill_history_tokens"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.upper()}={getattr(self, name)}: must be positive")
        for name in ["teacher_time_frac", "distill_time_frac", "warmdown_frac", "ema_decay"]:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name.upper()}={getattr(self, name)}: must lie in [0, 1]")
        if not 0 <= self.train_reserve_frac < 1:
            raise ValueError(f"TRAIN_RESERVE_FRAC={self.train_reserve_frac}: must lie in [0, 1)")
        if self.teacher_time_frac + self.distill_time_frac > 1 + 1e-9:
            raise ValueError(f"TEACHER_TIME_FRAC + DISTILL_TIME_FRAC = {self.teacher_time_frac} + "
                             f"{self.distill_time_frac} must be <= 1")
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} must divide by NUM_HEADS="
                             f"{self.num_heads}, NUM_HEADS by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        if self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ValueError(f"ROPE_DIMS={self.rope_dims}: must be even and <= head dim {head_dim}")
        if self.enc_layers > self.num_layers:
            raise ValueError(f"ENC_LAYERS={self.enc_layers}: must be <= NUM_LAYERS")
        longest = min(exact_length(self.vocab_size), STREAM_TAIL_TOKENS) + 1
        if not 0 <= self.eam_context_order <= longest:
            raise ValueError(f"EAM_CONTEXT_ORDER={self.eam_context_order}: 0 (no memory) to "
                             f"{longest}, while its codes are exact (VOCAB_SIZE={self.vocab_size})")
        if self.eam_context_order > 1 and not (
                1 <= self.eam_context_min_length <= self.eam_context_order - 1):
            raise ValueError(f"EAM_CONTEXT_MIN_LENGTH={self.eam_context_min_length}: must lie in "
                             f"1..EAM_CONTEXT_ORDER - 1 = {self.eam_context_order - 1}")
        try:
            learned = list(learned_lengths(self))
        except ValueError:
            learned = [-1]
        if (learned and (learned != sorted(set(learned)) or learned[0] < self.eam_context_order
                         or learned[-1] > STREAM_TAIL_TOKENS)):
            raise ValueError(f"EAM_LEARNED_LENGTHS={self.eam_learned_lengths!r}: increasing "
                             f"lengths from EAM_CONTEXT_ORDER={self.eam_context_order} to "
                             f"{STREAM_TAIL_TOKENS}, comma-separated")
        if not 0 <= self.knn_lambda < 1:
            raise ValueError(f"KNN_LAMBDA={self.knn_lambda}: must lie in [0, 1)")
        if self.model not in SHIPPED_MODELS:
            raise ValueError(f"MODEL={self.model!r}: expected one of {list(SHIPPED_MODELS)}")
        if not LOWEST_QUANT_BITS <= self.quant_bits <= 8:
            raise ValueError(f"QUANT_BITS={self.quant_bits}: must lie in {LOWEST_QUANT_BITS}..8")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"ZSTD_LEVEL={self.zstd_level}: must lie in 1..22")
        if self.eval_stride > self.eval_seq_len:
            raise ValueError(f"EVAL_STRIDE={self.eval_stride} must be <= "
                             f"EVAL_SEQ_LEN={self.eval_seq_len}")


def check_setting_names(environ: dict[str, str]) -> None:
    """Refuse a variable that looks like a setting (its first word starts two settings' names)
    but is none, naming the closest: a misspelt or retired name must not be silently ignored."""
    import difflib

    names = [field.name.upper() for field in dataclasses.fields(Hyperparameters)]
    families = {word for word in (name.split("_")[0] for name in names)
                if sum(other.startswith(word + "_") for other in names) >= 2}
    for variable in sorted(environ):
        if variable.split("_")[0] in families and "_" in variable and variable not in names:
            close = difflib.get_close_matches(variable, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see the settings in train_gpt.py"
            raise ValueError(f"{variable}={environ[variable]!r} is not a setting ({hint})")


def default_run_id(profile: str, seed: int) -> str:
    return f"{profile}_seed{seed}"


def _parse_setting(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError
            return lowered in ("1", "true", "yes")
        if kind is int:
            return int(raw.replace("_", ""))
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a value of type {kind.__name__}") from None


def settings_view(config_type: type, args: Hyperparameters, prefix: str = "", **given):
    """A model config from the settings named PREFIX + field, `given` filling the rest: the
    shipped model holds small frozen configs, which the artifact carries whole."""
    return config_type(**{field.name: given[field.name] if field.name in given
                          else getattr(args, prefix + field.name)
                          for field in dataclasses.fields(config_type)})


def config_from_dict(config_type: type, values: object, source: str):
    """The exact inverse of dataclasses.asdict through JSON: a missing or unknown key, or a
    value of another type, is an error naming `source` and the key."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: {config_type.__name__} is not an object: {values!r}")
    types = typing.get_type_hints(config_type)
    missing, unknown = sorted(types.keys() - values.keys()), sorted(values.keys() - types.keys())
    if missing or unknown:
        raise ValueError(f"{source}: {config_type.__name__} has missing keys {missing} "
                         f"and unknown keys {unknown}")
    fields = {}
    for name, kind in types.items():
        value = values[name]
        if dataclasses.is_dataclass(kind):
            value = config_from_dict(kind, value, f"{source} ({name})")
        elif typing.get_origin(kind) is tuple and isinstance(value, list) and all(
                type(item) is int for item in value):
            value = tuple(value)  # JSON keeps a tuple of ints as a list
        elif kind is float and type(value) is int:
            value = float(value)  # JSON does not keep 1.0 apart from 1
        elif type(value) is not kind:
            raise ValueError(f"{source}: {config_type.__name__}.{name}={value!r} is not of type "
                             f"{kind.__name__}")
        fields[name] = value
    return config_type(**fields)


# -------------------------------------------------------------------------------------------------
# 2. Runtime
#
# One code path for a laptop and for 8 GPUs: torchrun sets RANK/WORLD_SIZE, NCCL serves CUDA,
# gloo CPU. Only rank 0 logs (stdout + logs/RUN_ID.txt); the header holds what reproduces the run.
# -------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    log_path: Path | None
    attention: str = "sdpa"  # choose_attention's choice

    @property
    def distributed(self) -> bool:
        """Several ranks, or one launched by torchrun (DDP and NCCL in a world of one)."""
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if not self.master:
            return
        print(message, flush=True)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(message + "\n")


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a container's cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = None
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = limit / period if limit > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(cpus or 1, math.ceil(quota) if quota else cpus or 1))


def cpu_share() -> int:
    """This rank's share of its host's CPUs (torchrun's LOCAL_WORLD_SIZE): its CPU threads."""
    ranks = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    return max(1, usable_cpus() // int(ranks))


def init_runtime(args: Hyperparameters) -> tuple[Runtime, Hyperparameters]:
    """The process group, seeds, and the run's own log (its name settled on rank 0)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_share())  # two ranks on two cores: not a thread per core each
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun, even of one rank
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                device if device.type == "cuda" else None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    log_path = None
    if rank == 0:
        args, log_path = claim_run(args)
    if dist.is_initialized():
        names = [args.run_id, args.artifact_path]
        dist.broadcast_object_list(names, 0)
        args = dataclasses.replace(args, run_id=names[0], artifact_path=names[1])
    runtime = Runtime(rank, world_size, local_rank, device, log_path)
    runtime.attention = choose_attention(runtime)
    return runtime, args


LOG_DIR = Path("logs")


def claim_run(args: Hyperparameters) -> tuple[Hyperparameters, Path]:
    """Create logs/RUN_ID.txt exclusively, so no run overwrites another's log or artifact: a
    chosen RUN_ID whose log exists is refused, the default one moves on to RUN_ID_2, ..., and a
    derived artifact path follows it."""
    LOG_DIR.mkdir(exist_ok=True)
    fresh = args.run_id == default_run_id(args.profile, args.seed)
    derived = args.artifact_path == f"{args.run_id}.eam" and not args.eval_only
    for attempt in itertools.count(1):
        run_id = args.run_id if attempt == 1 else f"{args.run_id}_{attempt}"
        artifact = f"{run_id}.eam" if derived else args.artifact_path
        if fresh and derived and Path(artifact).exists():
            continue
        path = LOG_DIR / f"{run_id}.txt"
        try:
            path.open("x", encoding="utf-8").close()
        except FileExistsError:
            if fresh:
                continue
            raise FileExistsError(f"RUN_ID={run_id}: {path} exists (an earlier run's log); "
                                  "choose another RUN_ID or remove that file") from None
        return dataclasses.replace(args, run_id=run_id, artifact_path=artifact), path


@contextlib.contextmanager
def failures_logged(runtime: Runtime):
    """An exception also reaches logs/RUN_ID.txt, so a failed run's log says why."""
    try:
        yield
    except BaseException as error:
        runtime.log(f"error rank:{runtime.rank} type:{type(error).__name__}\n"
                    f"{traceback.format_exc().rstrip()}")
        raise


def process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): start-up counts in the budget."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def stage_end(started: float, args: Hyperparameters, share: float) -> float:
    """When the training stages must have used `share` (cumulative) of the budget, less
    packing's reserve: a stage's overrun comes out of the next ones, never on top."""
    return started + share * args.max_wallclock_seconds * (1 - args.train_reserve_frac)


def flash_attn_version() -> str:
    """The installed flash-attn's version for the header, or 'none'."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return str(getattr(__import__(module), "__version__", "unknown"))
        except (ImportError, OSError):
            continue
    return "none"


def log_header(runtime: Runtime, args: Hyperparameters) -> None:
    code = Path(__file__).read_bytes()
    runtime.log(f"run_id:{args.run_id} profile:{args.profile} code_sha256:"
                f"{hashlib.sha256(code).hexdigest()} code_bytes:{len(code)}")
    device_name = (torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
                   else platform.processor() or platform.machine())
    runtime.log(f"python:{platform.python_version()} torch:{torch.__version__} "
                f"device:{runtime.device.type} device_name:{device_name.replace(' ', '_')} "
                f"world_size:{runtime.world_size} threads:{torch.get_num_threads()} "
                f"attention:{runtime.attention} "
                f"cuda:{torch.version.cuda or 'none'} flash_attn:{flash_attn_version()}")
    for field in dataclasses.fields(args):
        runtime.log(f"setting {field.name.upper()}={getattr(args, field.name)}")


# The log contract's line names, written once (tools._runs.parse_log reads the lines back);
# docs/design.md lists every line's fields.
STAGES = ("teacher", "eam_write", "distill", "pack", "eval")
TRAIN_STAGES = STAGES[:3]  # they read training data, so they share the training budget
# The score lines per shipped model: (the model alone, the final score: with the kNN store where
# it is on, else the same number).
SCORE_RECORD, MEMORY_RECORD = "final_eam_knn_roundtrip_exact", "final_eam_roundtrip_exact"
BASELINE_SCORE_RECORD = "final_baseline_knn_roundtrip_exact"
BASELINE_RECORD = "final_baseline_roundtrip_exact"
SCORE_RECORDS = {"eam": (MEMORY_RECORD, SCORE_RECORD),
                 "transformer": (BASELINE_RECORD, BASELINE_SCORE_RECORD)}
TEACHER_RECORD = "teacher_reference_exact"  # diagnostics: the teacher on the same windows,
PREPACK_RECORD = "prepack_reference_exact"  # and the shipped model before packing
DATA_RECORD = "data"  # the tokens scored and trained on, with fingerprints
ARTIFACT_RECORD = "artifact"  # code_bytes model_bytes total_bytes limit: what reviewers read
COMPONENT_RECORD = "artifact_component"  # each packed group's bytes
FIT_RECORD = "artifact_fit"  # each fit of the memory to the limit: at:distill, at:pack
TRAIN_TIME_RECORD, EVAL_TIME_RECORD = "train_time", "eval_time"  # each against its limit
COMPILE_RECORD = "compile"  # each compiled phase: compiled, or eager and why
COMPILE_GRAPHS_RECORD = "compile_graphs"  # its graphs (after the first step, at the end), breaks
TTT_RECORD = "ttt"  # test-time training's cost
SHED_RECORD = "eval_shed"  # the evaluation's learners stopped to keep its deadline
MEMORY_WRITES_RECORD, KNN_STORE_RECORD = "memory_writes", "knn_store"  # after the evaluation
TEACHER_PHASE, DISTILL_PHASE = STEP_RECORDS = ("teacher", "distill")  # each step line's name


def stage_record(stage: str) -> str:
    assert stage in STAGES, stage
    return f"stage:{stage}"


def log_stage(runtime: Runtime, stage: str, time_ms: float, details: str = "") -> None:
    runtime.log(f"{stage_record(stage)} time_ms:{time_ms:.0f} {details}".rstrip())


def elapsed_ms(started: float) -> float:
    return 1000 * (time.perf_counter() - started)


def log_time_limit(runtime: Runtime, record: str, started: float, limit_s: float) -> None:
    """The time since `started` against a limit, and on CUDA the peak memory since the last."""
    time_ms = elapsed_ms(started)
    peak = ""
    if runtime.device.type == "cuda":
        peak = f" peak_memory_bytes:{torch.cuda.max_memory_allocated(runtime.device)}"
        torch.cuda.reset_peak_memory_stats(runtime.device)
    runtime.log(f"{record} {record}_ms:{time_ms:.0f} limit_ms:{1000 * limit_s:.0f} "
                f"within_limit:{int(time_ms <= 1000 * limit_s)}{peak}")


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; CPU stays in float32 (bf16 is slower there)."""
    if runtime.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate each rank's rows in rank order; counts[r] is rank r's row count."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)])


def assert_replicas_identical(runtime: Runtime, name: str, tensors: list[torch.Tensor]) -> str:
    """Hash the tensors on every rank and fail loudly if any rank differs."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach() if tensor.dtype == torch.int64 else tensor.detach().float()
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    words = torch.tensor(np.frombuffer(digest.digest()[:16], dtype=np.int64).copy(),
                         device=runtime.device)
    if runtime.distributed:
        gathered = [torch.empty_like(words) for _ in range(runtime.world_size)]
        dist.all_gather(gathered, words)
        if any(not torch.equal(words, other) for other in gathered):
            raise RuntimeError(f"replicas differ across ranks: {name}")
    hexdigest = digest.hexdigest()[:16]
    runtime.log(f"replicas {name}:identical ranks:{runtime.world_size} digest:{hexdigest}")
    return hexdigest


# -------------------------------------------------------------------------------------------------
# 3. Data
#
# The challenge's shards: 256 int32 header words (magic, version, token count), uint16 tokens.
# Each rank reads its own disjoint slice of every global batch. Bits per byte need each target's
# bytes, which depend on the token before it (a leading "▁" is no space after a boundary token).
# -------------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256


def shard_token_count(path: Path) -> int:
    """Check a shard's header against its size, reading only the header; its token count."""
    with Path(path).open("rb") as handle:
        raw = handle.read(HEADER_WORDS * 4)
    if len(raw) < HEADER_WORDS * 4:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes)")
    header = np.frombuffer(raw, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: wrong magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    declared, body = int(header[2]), Path(path).stat().st_size - HEADER_WORDS * 4
    if body != 2 * declared:
        raise ValueError(f"{path}: header declares {declared} tokens but file holds {body / 2:g}")
    return declared


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str,
                    owner: str = "VOCAB_SIZE", offset: int = 0) -> None:
    """Every id must index the vocabulary of `owner` (a setting, or an artifact); offset is the
    position of tokens[0] in `where`."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise ValueError(f"{where}: token id {int(tokens[position])} at position "
                         f"{offset + position} is >= {owner}={vocab_size}")


def read_shard(path: Path, vocab_size: int = 0) -> np.ndarray:
    """A shard's tokens, its header checked, and with vocab_size its token ids as well."""
    shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", offset=HEADER_WORDS * 4)
    if vocab_size:
        check_token_ids(tokens, vocab_size, str(path))
    return tokens


def map_shard(path: Path) -> np.ndarray:
    """A shard's tokens, its header checked, mapped: no 200 MB read on a training step's path."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_WORDS * 4,
                     shape=(shard_token_count(path),))


def shard_paths(data_path: str, split: str) -> list[Path]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    paths = sorted(Path(p) for p in glob.glob(pattern))
    if not paths:
        hint = " (run: python -m tools.make_demo_data)" if "demo" in data_path else ""
        raise FileNotFoundError(f"DATA_PATH={data_path!r}: no files match {pattern}{hint}")
    return paths


STREAM_TAIL_TOKENS = 64  # the history kept before each read: the longest context read


class TokenStream:
    """Endless reader over the training shards; `taken` is the stream index of the next token,
    and index i holds the corpus's token i mod corpus_tokens."""

    def __init__(self, paths: list[Path], vocab_size: int = 0):
        self.paths, self.vocab_size = paths, vocab_size
        self.corpus_tokens = sum(shard_token_count(path) for path in paths)
        self.shard_index = 0
        self.tokens = map_shard(paths[0])
        self.position = 0
        self.taken = 0
        self.tail = np.zeros(0, dtype=np.int64)  # the last STREAM_TAIL_TOKENS taken

    def take(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            if self.position >= len(self.tokens):
                self.shard_index = (self.shard_index + 1) % len(self.paths)
                self.tokens = map_shard(self.paths[self.shard_index])
                self.position = 0
            part = np.array(self.tokens[self.position: self.position + count])
            if self.vocab_size:
                check_token_ids(part, self.vocab_size, str(self.paths[self.shard_index]),
                                offset=self.position)
            parts.append(part)
            self.position += len(part)
            count -= len(part)
        taken = np.concatenate(parts)
        self.taken += len(taken)
        self.tail = np.concatenate([self.tail, taken[-STREAM_TAIL_TOKENS:]])[-STREAM_TAIL_TOKENS:]
        return taken


class DistributedTokenLoader:
    """Each call reads one global slice and hands this rank its own disjoint part of it."""

    def __init__(self, paths: list[Path], runtime: Runtime, vocab_size: int = 0):
        self.stream = TokenStream(paths, vocab_size)
        self.runtime = runtime
        self.first_target_index = 0  # the stream index of the last batch's y[0, 0]
        # The last global batch: (the tokens before it, its tokens, its first stream index).
        self.last_read: tuple[np.ndarray, np.ndarray, int] | None = None

    def next_batch(self, rank_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = rank_tokens + 1
        self.first_target_index = self.stream.taken + self.runtime.rank * span + 1
        history, first = self.stream.tail, self.stream.taken
        chunk = self.stream.take(span * self.runtime.world_size)
        self.last_read = (history, chunk, first)
        local = torch.from_numpy(chunk[self.runtime.rank * span:][:span].astype(np.int64))
        local = local.to(self.runtime.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def next_text(self, rank_tokens: int, history: int) -> tuple[torch.Tensor, int]:
        """This rank's part of the next rank_tokens x world tokens as running text, with the
        `history` tokens before it (-1 before the stream's start), and its first stream index."""
        if history > STREAM_TAIL_TOKENS:
            raise ValueError(f"next_text: {history} tokens of history, at most "
                             f"{STREAM_TAIL_TOKENS} are kept")
        before = self.stream.tail[max(len(self.stream.tail) - history, 0):]
        before = np.concatenate([np.full(history - len(before), -1), before])
        begin = self.runtime.rank * rank_tokens
        first_index = self.stream.taken + begin
        text = np.concatenate([before, self.stream.take(rank_tokens * self.runtime.world_size)])
        local = torch.from_numpy(text[begin: begin + history + rank_tokens].astype(np.int64))
        return local.to(self.runtime.device), first_index


def load_validation_tokens(args: Hyperparameters) -> torch.Tensor:
    """The val shards in order, the first VAL_TOKENS of them (0: all)."""
    tokens = np.concatenate([read_shard(p) for p in shard_paths(args.data_path, "val")])
    if args.val_tokens:
        tokens = tokens[: args.val_tokens]
    if len(tokens) < 2:
        raise ValueError(f"DATA_PATH={args.data_path!r} VAL_TOKENS={args.val_tokens}: "
                         f"{len(tokens)} validation tokens, at least 2 are needed")
    return torch.from_numpy(tokens.astype(np.int64))


def rank_batch_tokens(batch_tokens: int, seq_len: int, world_size: int, accum_world: int,
                      name: str) -> tuple[int, int]:
    """(micro-steps, tokens per rank and micro-step) keeping the global batch at any world size."""
    accum = max(1, accum_world // world_size)
    rank_tokens = batch_tokens // (world_size * accum)
    if rank_tokens == 0 or rank_tokens % seq_len:
        raise ValueError(f"{name}={batch_tokens} does not split into sequences of TRAIN_SEQ_LEN="
                         f"{seq_len} over {world_size} ranks x {accum} micro-steps")
    return accum, rank_tokens


def train_rank_tokens(runtime: Runtime, args: Hyperparameters) -> int:
    """Tokens per rank and micro-step of a TRAIN_BATCH_TOKENS batch."""
    return rank_batch_tokens(args.train_batch_tokens, args.train_seq_len, runtime.world_size,
                             args.grad_accum_world, "TRAIN_BATCH_TOKENS")[1]


@dataclass(frozen=True)
class ByteTables:
    base_bytes: torch.Tensor  # [V] int32: UTF-8 bytes of the piece without its leading "▁"
    leading_space: torch.Tensor  # [V] bool: the piece starts with "▁"
    is_boundary: torch.Tensor  # [V] bool: control/unknown pieces (BOS) after which no space counts

    def target_bytes(self, previous: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        space = self.leading_space[target] & ~self.is_boundary[previous]
        return self.base_bytes[target] + space.to(torch.int32)


def build_byte_tables(tokenizer_path: str, vocab_size: int, owner: str) -> ByteTables:
    """The tokenizer's byte tables; it must have the vocabulary of `owner` (setting or file)."""
    import sentencepiece as spm

    if not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"TOKENIZER_PATH={tokenizer_path!r}: no such file")
    processor = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if processor.vocab_size() != vocab_size:
        raise ValueError(f"{owner}: a vocabulary of {vocab_size} tokens, but TOKENIZER_PATH="
                         f"{tokenizer_path!r} has {processor.vocab_size()} pieces")
    base = torch.zeros(vocab_size, dtype=torch.int32)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.zeros(vocab_size, dtype=torch.bool)
    for token in range(vocab_size):
        if processor.is_control(token) or processor.is_unknown(token) or processor.is_unused(token):
            boundary[token] = True
        elif processor.is_byte(token):
            base[token] = 1
        else:
            piece = processor.id_to_piece(token)
            if piece.startswith("\u2581"):
                space[token] = True
                piece = piece[1:]
            base[token] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


DATA_MANIFEST = "manifest.json"  # tools.make_demo_data's: the tokenizer the shards were made with


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_inputs(runtime: Runtime, args: Hyperparameters) -> None:
    """Everything checkable before training, so a bad input costs seconds, not a run; then the
    data line (what is scored and trained on)."""
    code_bytes = code_size(args)
    if code_bytes >= args.size_limit:
        raise ValueError(f"SIZE_LIMIT={args.size_limit}: the code alone counts {code_bytes} bytes")
    tokens = load_validation_tokens(args)
    manifest = Path(args.data_path) / DATA_MANIFEST
    if manifest.is_file():
        try:
            named = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer_sha256")
        except (ValueError, AttributeError):
            named = None  # not a manifest of ours
        actual = file_sha256(Path(args.tokenizer_path))
        if named and named != actual:
            raise ValueError(f"TOKENIZER_PATH={args.tokenizer_path!r} has sha256 {actual}, but "
                             f"{manifest} names {named}: the shards were made with another "
                             "tokenizer")
    artifact = Path(args.artifact_path)
    split = sum(shard_token_count(path) for path in shard_paths(args.data_path, "val"))
    scored = hashlib.sha256(tokens.numpy().astype("<u2").tobytes()).hexdigest()[:16]
    data = f"{DATA_RECORD} val_tokens:{tokens.numel()} val_split_tokens:{split} val_sha256:{scored}"
    if args.eval_only:
        if not artifact.is_file():
            raise FileNotFoundError(f"ARTIFACT_PATH={args.artifact_path!r}: no such file")
        runtime.log(data)
        return
    if artifact.exists():
        raise FileExistsError(f"ARTIFACT_PATH={args.artifact_path!r} exists (an earlier run's "
                              "artifact): choose another path or remove that file")
    try:
        tempfile.TemporaryFile(dir=artifact.parent).close()
    except OSError as error:
        raise PermissionError(f"ARTIFACT_PATH={args.artifact_path!r}: cannot write in its "
                              f"folder ({error})") from None
    check_token_ids(tokens.numpy(), args.vocab_size,
                    f"DATA_PATH={args.data_path!r} validation split")
    build_byte_tables(args.tokenizer_path, args.vocab_size, "VOCAB_SIZE")
    train = shard_paths(args.data_path, "train")
    train_tokens = sum(shard_token_count(path) for path in train)
    read_shard(train[0], args.vocab_size)
    runtime.log(f"{data} train_shards:{len(train)} train_tokens:{train_tokens} "
                f"train_fingerprint:{data_fingerprint(train)}")
    for name in ("TRAIN_BATCH_TOKENS", "DISTILL_BATCH_TOKENS"):
        rank_batch_tokens(getattr(args, name.lower()), args.train_seq_len, runtime.world_size,
                          args.grad_accum_world, name)
    model = model_skeleton(args)
    bits = fewest_bits(args)
    weights = width_bytes(model, bits)
    if code_bytes + SMALLEST_PACKED_SHARE * weights > args.size_limit:
        at = f"QUANT_BITS={args.quant_bits}" + (f", the baseline's fewest {bits}"
                                                if bits < args.quant_bits else "")
        raise ValueError(
            f"SIZE_LIMIT={args.size_limit}: MODEL={args.model} at these sizes cannot fit: its "
            f"weights take {weights} bytes at the widths they pack to ({at}), and even packed "
            f"to {SMALLEST_PACKED_SHARE:.0%} of that, less than trained weights have, they need "
            f"{round(SMALLEST_PACKED_SHARE * weights)} beside the code's {code_bytes}: shrink it "
            "(NUM_LAYERS, MODEL_DIM, ENC_LAYERS, DEC_HIDDEN) or raise SIZE_LIMIT")
    if args.ttt_steps:
        adapted_parameters(model, args.ttt_params)
    if args.init_checkpoint:
        read_checkpoint(args)


# -------------------------------------------------------------------------------------------------
# 4. Teacher
#
# A GPT as in the challenge's records: RMSNorm, partial RoPE, grouped-query attention with QK-norm
# and a learned QK gain, exclusive self-attention (XSA), a LeakyReLU(0.5)^2 MLP, layer-norm
# scaling by depth, tied embeddings with a logit soft-cap. Muon (Jordan et al. 2024) trains the
# matrices, Adam the rest; the schedule warms up by steps and down by wall clock.
# -------------------------------------------------------------------------------------------------

def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, T, H, Dh], k/v: [B, T, Hkv, Dh] -> [B, T, H, Dh], causal, grouped-query."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return out.transpose(1, 2)


def flash_attention(function: Callable) -> Callable:
    """flash-attn's flash_attn_func (3 or 2) in sdpa_attention's shapes, in bf16."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = function(*(t.to(torch.bfloat16) for t in (q, k, v)), causal=True)
        return out[0] if isinstance(out, tuple) else out
    return attend


# The attention every layer calls, bound once before anything is compiled (choose_attention).
ATTENTION: dict[str, Callable] = {"sdpa": sdpa_attention}
ATTENTION_MODULES = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}  # in preference order


def attention_works(attend: Callable, device: torch.device) -> bool:
    """A tiny causal forward and backward in bf16 runs, and agrees with SDPA's."""
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 64, 2, 64, device=device, generator=generator,
                               dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        out = attend(q, k, v)
        out.float().sum().backward()
        return bool(torch.allclose(out.float(), sdpa_attention(q, k, v).float(), atol=2e-2))
    except Exception:  # noqa: BLE001 - whatever fails, SDPA remains
        return False


def choose_attention(runtime: Runtime) -> str:
    """flash-attn 3, else 2, else SDPA: the first that imports and works on every rank, bound
    as ATTENTION['chosen']."""
    found = []
    if runtime.device.type == "cuda":
        for name, module in ATTENTION_MODULES.items():
            try:
                attend = flash_attention(importlib.import_module(module).flash_attn_func)
            except Exception:  # noqa: BLE001 - missing, or built for another CUDA or GPU
                continue
            if attention_works(attend, runtime.device):
                ATTENTION[name] = attend
                found.append(name)
    working = torch.tensor([float(name in found) for name in ATTENTION_MODULES],
                           device=runtime.device)
    everywhere = all_reduce_(working) == runtime.world_size
    name = next((name for name, ok in zip(ATTENTION_MODULES, everywhere.tolist(), strict=True)
                 if ok), "sdpa")
    ATTENTION["chosen"] = ATTENTION[name]
    return name


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, T, H, Dh], k/v: [B, T, Hkv, Dh] -> [B, T, H, Dh] with the chosen attention."""
    return ATTENTION.get("chosen", sdpa_attention)(q, k, v)


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (Zhai 2026, arXiv:2603.09078): y [B, T, H, Dh] less its component along the token's
    own value v [B, T, Hkv, Dh], which the residual stream already holds."""
    v = v.repeat_interleave(y.size(2) // v.size(2), dim=2)
    v_unit = F.normalize(v.float(), dim=-1)
    return (y.float() - (y.float() * v_unit).sum(-1, keepdim=True) * v_unit).to(y.dtype)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, rope_dims: int, base: float, device: torch.device):
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, device=device).float() / rope_dims)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dims channels of each head (partial RoPE); the rest carry content."""
    rope_dims = cos.size(-1) * 2
    rotated, rest = x[..., :rope_dims], x[..., rope_dims:]
    x1, x2 = rotated.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    return torch.cat([out, rest], dim=-1)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_mult: int
    mlp_leaky_slope: float
    logit_softcap: float
    rope_base: float
    rope_dims: int
    qk_gain_init: float
    ln_scale: bool
    xsa_layers: int


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.model_dim // config.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.q = nn.Linear(config.model_dim, config.model_dim, bias=False)
        self.k = nn.Linear(config.model_dim, kv_dim, bias=False)
        self.v = nn.Linear(config.model_dim, kv_dim, bias=False)
        self.out = nn.Linear(config.model_dim, config.model_dim, bias=False)
        nn.init.zeros_(self.out.weight)
        # QK-norm fixes the logit scale; a learned per-head gain then sets the sharpness.
        self.qk_gain = nn.Parameter(torch.full((self.num_heads,), config.qk_gain_init))
        self.use_xsa = use_xsa

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_rotary(rms_norm(q), cos, sin) * self.qk_gain.view(1, 1, -1, 1).to(q.dtype)
        k = apply_rotary(rms_norm(k), cos, sin)
        # SDPA scales by 1/sqrt(Dh); unit-RMS q and k then give logits of order qk_gain.
        y = causal_attention(q.to(v.dtype), k.to(v.dtype), v)
        if self.use_xsa:
            y = exclusive_self_attention(y, v)
        return self.out(y.reshape(B, T, -1).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.model_dim, config.mlp_mult * config.model_dim, bias=False)
        self.proj = nn.Linear(config.mlp_mult * config.model_dim, config.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.slope = config.mlp_leaky_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        use_xsa = layer_index >= config.num_layers - config.xsa_layers
        self.attn = Attention(config, use_xsa)
        self.mlp = MLP(config)
        # Deeper layers see a down-scaled normalized input, which keeps their updates small.
        self.norm_scale = 1 / math.sqrt(layer_index + 1) if config.ln_scale else 1.0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x) * self.norm_scale, cos, sin)
        return x + self.mlp(rms_norm(x) * self.norm_scale)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        nn.init.normal_(self.embed.weight, std=0.005)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))

    def body(self, idx: torch.Tensor) -> torch.Tensor:
        """Normalized final hidden state [B, T, D]."""
        head_dim = self.config.model_dim // self.config.num_heads
        cos, sin = rotary_tables(idx.size(1), self.config.rope_dims or head_dim,
                                 self.config.rope_base, idx.device)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return rms_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.embed.weight.to(hidden.dtype)).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(self.body(idx))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def newton_schulz(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """U S V^T -> about U V^T by a quintic Newton-Schulz iteration (singular values land within
    about 0.3 of 1 in five steps, which is all Muon needs)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, row equalization (MuonEq-R, Chang et al. 2026, arXiv:2603.28254), then
    orthogonalization; rank r orthogonalizes every world-th matrix, one all_reduce shares them."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, row_norm: bool):
        super().__init__(params, dict(lr=lr, base_lr=lr, momentum=momentum,
                                      weight_decay=weight_decay, row_norm=row_norm))

    @torch.no_grad()
    def step(self) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
            offset = 0
            for index, param in enumerate(params):
                if index % world == rank and param.grad is not None:
                    buffer = self.state[param].setdefault("momentum", torch.zeros_like(param))
                    buffer.mul_(group["momentum"]).add_(param.grad)
                    update = param.grad.add(buffer, alpha=group["momentum"])
                    if group["row_norm"]:
                        update = update / update.norm(dim=1, keepdim=True).clamp_min(1e-7)
                    update = newton_schulz(update)
                    update = update * max(1.0, update.size(0) / update.size(1)) ** 0.5
                    flat[offset: offset + param.numel()] = update.flatten().float()
                offset += param.numel()
            if distributed:
                dist.all_reduce(flat)
            offset = 0
            for param in params:
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(flat[offset: offset + param.numel()].view_as(param), alpha=-group["lr"])
                offset += param.numel()


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's group by what it is, never by its name: "table" (nn.Embedding weights:
    Adam, int8), "matrix" (other 2-D weights: Muon, QUANT_BITS), "vector" (Adam, fp16)."""
    tables = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, nn.Embedding)}
    named = dict(model.named_parameters())
    groups = {"table": sorted(tables),
              "matrix": [name for name, p in named.items() if p.ndim == 2 and name not in tables],
              "vector": [name for name, p in named.items() if p.ndim != 2]}
    members = [name for group in groups.values() for name in group]
    assert sorted(members) == sorted(named), "every parameter must be in exactly one group"
    return groups


def build_optimizers(model: nn.Module, args: Hyperparameters,
                     lr_scale: float = 1.0) -> dict[str, torch.optim.Optimizer]:
    """{"adam": tables and vectors, "muon": matrices} over the parameters that train; an
    optimizer with nothing to train is left out."""
    named = dict(model.named_parameters())
    groups = {group: [named[name] for name in names if named[name].requires_grad]
              for group, names in parameter_groups(model).items()}
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    adam_groups = [dict(params=groups["table"], lr=args.embed_lr * lr_scale),
                   dict(params=groups["vector"], lr=args.scalar_lr * lr_scale)]
    adam_groups = [group | {"base_lr": group["lr"]} for group in adam_groups if group["params"]]
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if adam_groups:
        optimizers["adam"] = torch.optim.Adam(adam_groups, betas=(args.adam_beta1, args.adam_beta2),
                                              eps=1e-8, **fused)
    if groups["matrix"]:
        optimizers["muon"] = Muon(groups["matrix"], args.matrix_lr * lr_scale, args.muon_momentum,
                                  args.muon_weight_decay, args.muon_row_norm)
    return optimizers


def lr_multiplier(step: int, progress: float, warmup_steps: int, warmdown_frac: float) -> float:
    """Linear warm-up over steps, linear warm-down over the last part of progress in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    down = min(1.0, (1.0 - progress) / warmdown_frac) if warmdown_frac else 1.0
    return warm * max(0.0, down)


def maybe_compile(module: nn.Module, args: Hyperparameters, runtime: Runtime) -> nn.Module:
    """torch.compile on CUDA when asked for and available; the eager module otherwise."""
    if args.compile and runtime.device.type == "cuda" and hasattr(torch, "compile"):
        return torch.compile(module)
    return module


class EMA:
    """Exponential moving average of the weights (its decay capped at (1 + n) / (10 + n) after n
    updates); copy_to puts the averages in the model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            self.shadow[name].lerp_(value.float(), 1 - decay)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype)
                               for k, v in self.shadow.items()})


@dataclass(frozen=True)
class Phase:
    """One run of the training loop."""

    name: str
    loss_fn: Callable  # (ddp_model, x [B, T], y [B, T]) -> scalar loss
    batch_tokens: int
    seq_len: int
    stop_at: float  # a time.perf_counter() deadline (see stage_end)
    max_steps: int  # 0: the deadline alone decides
    lr_scale: float = 1.0
    ema_decay: float = 0.0


def compiled_or_eager(runtime: Runtime, phase: Phase, compiled: nn.Module, eager: nn.Module,
                      micro_step: Callable) -> nn.Module:
    """A compiled graph must not lose the run: one micro-step runs compiled without gradient
    sync (its gradients dropped), and if it fails on any rank, every rank trains this phase
    eager; the log says which, and why."""
    if compiled is eager:
        return eager
    failure = ""
    try:
        with eager.no_sync() if runtime.distributed else contextlib.nullcontext():
            micro_step(compiled)
    except Exception as error:  # any backend's failure: the eager model needs none of it
        failure = type(error).__name__
        print(f"rank {runtime.rank}: {phase.name} compiled step failed:\n"
              f"{traceback.format_exc()}", file=sys.stderr, flush=True)
    failed = int(all_reduce_(torch.tensor(float(bool(failure)), device=runtime.device),
                             "max").item())
    eager.zero_grad(set_to_none=True)
    runtime.log(f"{COMPILE_RECORD} phase:{phase.name} mode:{'eager' if failed else 'compiled'}"
                + (f" reason:{failure or 'another_rank'}" if failed else ""))
    return eager if failed else compiled


def compile_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) in this process so far; -1 where torch keeps none."""
    try:
        from torch._dynamo.utils import counters
        return (int(counters["stats"]["unique_graphs"]),
                int(sum(counters["graph_break"].values())))
    except Exception:  # noqa: BLE001 - a diagnostic, never worth a run
        return -1, -1


def mean_loss(runtime: Runtime, total: torch.Tensor) -> float:
    return all_reduce_(total.clone()).item() / runtime.world_size


def run_training(runtime: Runtime, args: Hyperparameters, model: nn.Module, phase: Phase,
                 loader: DistributedTokenLoader,
                 optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict[str, float]:
    """The training loop: DDP, gradient accumulation, schedules, and no step started that would
    end after phase.stop_at (as long as the last), decided alike on every rank. Optimizers
    continue where given (tools.pretrain_teacher resumes them)."""
    accum, rank_tokens = rank_batch_tokens(phase.batch_tokens, phase.seq_len, runtime.world_size,
                                           args.grad_accum_world, f"{phase.name} batch tokens")
    wrapped = model
    if runtime.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
            broadcast_buffers=False)
    optimizers = optimizers or build_optimizers(model, args, phase.lr_scale)
    ema = EMA(model, phase.ema_decay) if phase.ema_decay > 0 else None
    start = previous = time.perf_counter()

    def micro_step(module: nn.Module) -> torch.Tensor:
        x, y = loader.next_batch(rank_tokens, phase.seq_len)
        with autocast(runtime):
            loss = phase.loss_fn(module, x, y) / accum
        loss.backward()
        return loss.detach()

    compiled = compiled_or_eager(runtime, phase, maybe_compile(wrapped, args, runtime), wrapped,
                                 micro_step)
    budget_s = max(phase.stop_at - start, 1e-9)
    step, loss_value, counts = 0, float("nan"), compile_counts()
    while True:
        # The next step counted as taken (as long as the last); all-reduced, as clocks differ.
        now = time.perf_counter()
        next_end, previous = 2 * now - previous, now
        progress = max((next_end - start) / budget_s,
                       step / phase.max_steps if phase.max_steps else 0.0)
        progress = all_reduce_(torch.tensor(progress, device=runtime.device), "max").item()
        if progress >= 1.0:
            break
        multiplier = lr_multiplier(step, progress, args.warmup_steps, args.warmdown_frac)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * multiplier
        momentum_ramp = min(1.0, step / max(1, args.muon_momentum_warmup_steps))
        if "muon" in optimizers:  # absent only when a phase trains no matrix
            optimizers["muon"].param_groups[0]["momentum"] = (
                args.muon_momentum_warmup_start
                + momentum_ramp * (args.muon_momentum - args.muon_momentum_warmup_start))
        total = torch.zeros((), device=runtime.device)
        for micro in range(accum):
            last = micro == accum - 1 or not runtime.distributed
            with contextlib.nullcontext() if last else wrapped.no_sync():
                total += micro_step(compiled)
        for optimizer in optimizers.values():
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        step += 1
        if step == 1:
            first_step = compile_counts()
        if step == 1 or step % args.train_log_every == 0:  # the loss read (a sync) only here
            runtime.log(f"{phase.name} step:{step} loss:{mean_loss(runtime, total):.4f} "
                        f"lr_mult:{multiplier:.3f} elapsed_ms:{elapsed_ms(start):.0f}")
    if step:
        loss_value = mean_loss(runtime, total)
    if compiled is not wrapped and step:
        graphs, breaks = compile_counts()
        runtime.log(f"{COMPILE_GRAPHS_RECORD} phase:{phase.name} graphs:{graphs - counts[0]} "
                    f"after_first_step:{first_step[0] - counts[0]} "
                    f"graph_breaks:{breaks - counts[1]}")
    if ema is not None:
        ema.copy_to(model)
    elapsed = time.perf_counter() - start
    return dict(steps=step, loss=loss_value, time_s=elapsed,
                tokens=step * phase.batch_tokens, step_ms=1000 * elapsed / max(step, 1))


def data_fingerprint(paths: list[Path]) -> str:
    """The training shards' names, sizes and first MB, hashed."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            digest.update(f"{Path(path).name}:{Path(path).stat().st_size}:".encode())
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def read_checkpoint(args: Hyperparameters) -> dict:
    """INIT_CHECKPOINT's teacher, checked against these settings' shape and training shards."""
    path = Path(args.init_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"INIT_CHECKPOINT={args.init_checkpoint!r}: no such file (make "
                                "it with python -m tools.pretrain_teacher, same PROFILE and "
                                "DATA_PATH)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    expected = dataclasses.asdict(settings_view(GPTConfig, args))
    if checkpoint.get("config") != expected:
        raise ValueError(f"INIT_CHECKPOINT={args.init_checkpoint!r}: a teacher of config "
                         f"{checkpoint.get('config')}, but these settings make {expected}")
    data = data_fingerprint(shard_paths(args.data_path, "train"))
    if checkpoint.get("data") != data:
        raise ValueError(f"INIT_CHECKPOINT={args.init_checkpoint!r}: pretrained on data "
                         f"{checkpoint.get('data')}, but DATA_PATH={args.data_path!r} is {data}")
    return checkpoint


def train_teacher(runtime: Runtime, args: Hyperparameters, loader: DistributedTokenLoader,
                  run_started: float) -> GPT:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    teacher = GPT(settings_view(GPTConfig, args)).to(runtime.device)
    if args.init_checkpoint:
        teacher.load_state_dict(read_checkpoint(args)["state"])
    params = sum(p.numel() for p in teacher.parameters())
    # The baseline's teacher is the shipped model: it gets the whole training budget.
    teacher_share = 1.0 if args.model == "transformer" else args.teacher_time_frac
    phase = Phase(TEACHER_PHASE, lambda model, x, y: model(x, y), args.train_batch_tokens,
                  args.train_seq_len, stage_end(run_started, args, teacher_share),
                  args.iterations, ema_decay=args.ema_decay)
    stats = run_training(runtime, args, teacher, phase, loader)
    teacher.eval().requires_grad_(False)
    assert_replicas_identical(runtime, "teacher", list(teacher.state_dict().values()))
    log_stage(runtime, "teacher", elapsed_ms(started),
              f"params:{params} steps:{stats['steps']} step_ms:{stats['step_ms']:.1f} "
              f"tokens:{stats['tokens']} train_loss:{stats['loss']:.4f}")
    return teacher


# -------------------------------------------------------------------------------------------------
# 5. Memory
#
# Next-token counts of exact recent contexts: those of the shipped lengths (the empty one and
# short ones) may ship, counted from EAM_CONTEXT_TOKENS of training text; distillation and the
# evaluation count the text they have read at every length, the longer (hashed) EAM_LEARNED_LENGTHS
# only so. A read finds the position's contexts by binary search and interpolates their counts
# Witten-Bell style, shortest first, from the uniform distribution (Witten and Bell 1991):
#     p_c = (counts_c + types_c p_shorter) / (total_c + types_c),
# types being how many distinct tokens followed the context: a distribution over the whole
# vocabulary. Every rank counts the same text, so every rank holds the same whole counts.
# -------------------------------------------------------------------------------------------------

# Two polynomial hashes modulo primes below 2^31 (their products fit int64, so the arithmetic is
# exact on every device); together ~62 bits, reduced to the codes above the exact ones.
HASH_PRIMES = ((2_147_483_647, 1_000_003), (2_147_483_629, 1_234_567_891))  # (modulus, base)


def exact_length(vocab_size: int) -> int:
    """The longest context whose exact code (digits token + 1 in base V + 1) times V plus a
    token fits int64; longer ones are hashed."""
    length = 0
    while (vocab_size + 1) ** (length + 1) * vocab_size < 2**63:
        length += 1
    return length


def context_codes(recent: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Recent tokens [..., C] (own token last, -1 before the text) -> the codes of the contexts
    of 0..C tokens [..., C + 1]: 0 for the empty one, exact codes, then hashes above them (a
    collision ~2^-52), -1 where incomplete; a code times V plus a token fits int64."""
    exact = exact_length(vocab_size)
    first_hash = (vocab_size + 1) ** exact
    hashes = (2**63 - 1) // vocab_size - first_hash
    (m1, b1), (m2, b2) = HASH_PRIMES
    code = h1 = h2 = recent.new_zeros((*recent.shape[:-1], 1))
    complete = torch.ones_like(code, dtype=torch.bool)
    columns = [code]
    for back in range(recent.size(-1)):
        digit = recent[..., recent.size(-1) - 1 - back:][..., :1] + 1
        complete = complete & (digit > 0)
        h1, h2 = (h1 * b1 + digit) % m1, (h2 * b2 + digit) % m2
        if back < exact:
            code = code * (vocab_size + 1) + digit
        else:
            code = first_hash + (h1 * m2 + h2) % hashes
        columns.append(torch.where(complete, code, -1))
    return torch.cat(columns, dim=-1)


def recent_tokens(idx: torch.Tensor, count: int) -> torch.Tensor:
    """idx [B, T] -> each position's last `count` tokens [B, T, count], its own last: the
    prefix only (-1 before the row)."""
    padded = F.pad(idx, (count - 1, 0), value=-1)
    return padded.unfold(1, count, 1)


def count_context_pairs(recent: torch.Tensor, next_tokens: torch.Tensor, vocab_size: int,
                        lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Recent tokens [N, C] and their next tokens [N] -> (sorted unique pair codes, context code
    * V + next token, and their counts) of every complete context of `lengths`."""
    codes = context_codes(recent, vocab_size)[:, list(lengths)]
    pairs = codes * vocab_size + next_tokens[:, None]
    return torch.unique(pairs[codes >= 0], return_counts=True)


def merge_pairs(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (pair codes, counts) parts into sorted unique pairs, exactly in any order."""
    codes = torch.cat([part[0] for part in parts])
    unique, inverse = torch.unique(codes, return_inverse=True)
    counts = torch.zeros_like(unique).index_add_(0, inverse, torch.cat([p[1] for p in parts]))
    return unique, counts


CONTEXT_BUFFERS = ("codes", "sizes", "next_tokens", "counts")  # the model's context_* buffers


@dataclass
class ContextTables:
    """The context memory as it ships: sorted context codes with how many next tokens each
    keeps, and those tokens with their counts, grouped by context."""

    codes: torch.Tensor  # [K] int64
    sizes: torch.Tensor  # [K] next tokens kept per context
    next_tokens: torch.Tensor  # [P] int64
    counts: torch.Tensor  # [P] int64

    def owners(self) -> torch.Tensor:  # each pair's context [P]
        return torch.repeat_interleave(torch.arange(self.codes.numel(), device=self.codes.device),
                                       self.sizes)

    def pairs(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[self.owners()] * vocab_size + self.next_tokens, self.counts

    def pruned(self, min_count: int) -> ContextTables:
        return self.kept(self.counts >= min_count)

    def most_counted(self, pairs: int) -> ContextTables:
        """Only the `pairs` most counted pairs (of equal counts, the first in code order)."""
        keep = torch.zeros_like(self.counts, dtype=torch.bool)
        keep[torch.argsort(self.counts, descending=True, stable=True)[:pairs]] = True
        return self.kept(keep)

    def kept(self, keep: torch.Tensor) -> ContextTables:
        owner = self.owners()[keep]
        sizes = torch.zeros_like(self.sizes).index_add_(0, owner, torch.ones_like(owner))
        return ContextTables(self.codes[sizes > 0], sizes[sizes > 0], self.next_tokens[keep],
                             self.counts[keep])


def context_tables(pair_codes: torch.Tensor, pair_counts: torch.Tensor,
                   vocab_size: int) -> ContextTables:
    codes, sizes = torch.unique_consecutive(pair_codes // vocab_size, return_counts=True)
    return ContextTables(codes, sizes, pair_codes % vocab_size, pair_counts)


def no_contexts(device: torch.device | None = None) -> ContextTables:
    none = torch.zeros(0, dtype=torch.long, device=device)
    return ContextTables(none, none, none, none)


class ContextCounts:
    """The context memory as reads and writes use it: sorted runs of (pair code, count), no pair
    in two, the shipped tables first. A write adds to pairs where they are and puts new ones in
    a run of their own; the newest runs merge while one holds at least half the pairs of the one
    before, so a read searches about log2(pairs) runs."""

    def __init__(self, tables: ContextTables, vocab_size: int):
        self.vocab_size = vocab_size
        self.reset(tables)

    def reset(self, tables: ContextTables) -> None:
        self.tables, self._runs = tables, None

    @property
    def runs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._runs is None:
            codes, counts = self.tables.pairs(self.vocab_size)
            self._runs = [(codes, counts.clone())] if codes.numel() else []
        return self._runs

    @property
    def pairs(self) -> int:
        return sum(codes.numel() for codes, _ in self.runs)

    def add(self, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """Count sorted unique pair codes [P] with their counts [P]."""
        for run_codes, run_counts in self.runs:
            index = torch.searchsorted(run_codes, codes).clamp(max=run_codes.numel() - 1)
            found = run_codes[index] == codes
            run_counts.index_add_(0, index[found], counts[found])
            codes, counts = codes[~found], counts[~found]
        if codes.numel():
            self.runs.append((codes, counts))
        while len(self.runs) > 1 and 2 * self.runs[-1][0].numel() >= self.runs[-2][0].numel():
            (codes, counts), (later, later_counts) = self.runs[-2], self.runs.pop()
            merged, order = torch.cat([codes, later]).sort()
            self.runs[-1] = (merged, torch.cat([counts, later_counts])[order])

    def find(self, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Context codes [M] (-1: none) -> every pair they hold: (its context's index in codes,
        next token, count), each [P]."""
        vocab, found = self.vocab_size, []
        for run_codes, run_counts in self.runs:
            low = torch.searchsorted(run_codes, codes * vocab)
            sizes = torch.where(codes >= 0, torch.searchsorted(run_codes, codes * vocab + vocab)
                                - low, 0)
            owner = torch.repeat_interleave(torch.arange(codes.numel(), device=codes.device),
                                            sizes)
            pairs = (torch.repeat_interleave(low - torch.cumsum(sizes, 0) + sizes, sizes)
                     + torch.arange(owner.numel(), device=codes.device))
            found.append((owner, run_codes[pairs] % vocab, run_counts[pairs]))
        empty = codes.new_zeros(0)
        return tuple(torch.cat([part[i] for part in found] or [empty]) for i in range(3))


# Training's leave-one-out (read_contexts): each position's target [N] and how many times the
# counts hold that very occurrence [N] (CountedText.times).
LeaveOut = tuple[torch.Tensor, torch.Tensor]


@torch.compiler.disable  # its shapes depend on the data: compiled, every batch would recompile
def read_contexts(recent: torch.Tensor, memory: ContextCounts, lengths: tuple[int, ...],
                  leave_out: LeaveOut | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory's distribution [N, V] after recent tokens [N, C], and its evidence [N, L],
    log(1 + total count) of the context of each length (lengths start with 0, the empty one).
    Each length's step p -> (count + types p) / (total + types) is affine, so the read is the
    empty context's dense row, scaled, plus sparse additions, each scaled by every longer factor.

    leave_out (training only): each position's own occurrences are taken out of the counts, so
    counted text reads as unseen text, as the evaluation's does (Ney, Essen and Kneser 1994).
    """
    vocab, rows, device = memory.vocab_size, recent.size(0), recent.device
    if not lengths:
        return torch.full((rows, vocab), 1 / vocab, device=device), torch.zeros(rows, 0,
                                                                                 device=device)
    # The empty context, every row's: one dense row of counts (less each row's own occurrence).
    _, tokens, counts = memory.find(recent.new_zeros(1))
    unigram = recent.new_zeros(vocab).index_add_(0, tokens, counts)  # [V]
    total = unigram.sum().expand(rows)
    types = (unigram > 0).sum().expand(rows)
    if leave_out is not None:
        targets, times = leave_out
        total = total - times
        types = types - ((unigram[targets] == times) & (times > 0)).long()
    empty_denominator = (total + types).clamp_min(1).float()
    empty_factor = torch.where(total > 0, types / empty_denominator, 1.0)
    empty_evidence = total.float().log1p()
    # The longer contexts: every pair each position's contexts hold.
    longer = list(lengths[1:])
    codes = context_codes(recent, vocab)[:, longer]  # [N, L]
    owner, tokens, counts = memory.find(codes.flatten())  # owner indexes [N * L]
    row = owner.div(max(len(longer), 1), rounding_mode="floor")
    if leave_out is not None:
        counts = counts - torch.where(tokens == leave_out[0][row], leave_out[1][row], 0)
    # Whole counts summed as integers: exact in any order, on every device.
    total = counts.new_zeros(codes.numel()).index_add_(0, owner, counts).float()
    types = counts.new_zeros(codes.numel()).index_add_(0, owner, (counts > 0).long()).float()
    denominator = (total + types).clamp_min(1)
    # A context with no count (none held, or its only occurrences left out) leaves p as it is.
    factor = torch.where(total > 0, types / denominator, 1.0).view(rows, len(longer))
    later = torch.cat([factor, factor.new_ones(rows, 1)], dim=1).flip(1).cumprod(1).flip(1)
    scale = later[:, 0] / empty_denominator  # [N]: the empty context's row, scaled by all longer
    probs = (unigram.float()[None] + (empty_factor * empty_denominator / vocab)[:, None]) \
        * scale[:, None]
    if leave_out is not None:
        probs[torch.arange(rows, device=device), leave_out[0]] -= leave_out[1] * scale
    shares = counts.float() / denominator[owner] * later[:, 1:].flatten()[owner]
    length = owner % max(len(longer), 1)
    for index in range(len(longer)):  # within a length each (row, token) is added once: a
        pick = length == index  # deterministic sum on every device
        probs.index_put_((row[pick], tokens[pick]), shares[pick], accumulate=True)
    return probs, torch.cat([empty_evidence[:, None], total.log1p().view(rows, -1)], dim=1)


@dataclass(frozen=True)
class CountedText:
    """The stream indices [first, end) the context memory counted as targets."""

    first: int
    end: int
    corpus_tokens: int

    @property
    def tokens(self) -> int:
        return self.end - self.first

    def times(self, indices: torch.Tensor) -> torch.Tensor:
        """How many times the targets at these stream indices were counted (the corpus repeats
        every corpus_tokens)."""
        corpus = indices % self.corpus_tokens
        return ((self.end - 1 - corpus).div(self.corpus_tokens, rounding_mode="floor")
                - (self.first - 1 - corpus).div(self.corpus_tokens, rounding_mode="floor"))


def shipped_lengths(args: Hyperparameters) -> tuple[int, ...]:
    """The lengths counted from training text: 0 and MIN_LENGTH..ORDER - 1 (ORDER 0: none)."""
    if args.eam_context_order == 0:
        return ()
    return (0, *range(args.eam_context_min_length, args.eam_context_order))


def learned_lengths(args: Hyperparameters) -> tuple[int, ...]:
    return tuple(int(part) for part in args.eam_learned_lengths.split(",") if part.strip())


def count_contexts(runtime: Runtime, args: Hyperparameters, loader: DistributedTokenLoader
                   ) -> tuple[ContextTables, CountedText]:
    """The context memory, identical on every rank: each rank counts its share of
    EAM_CONTEXT_TOKENS of running text, the ranks' pairs are summed and those seen fewer than
    EAM_CONTEXT_MIN_COUNT times dropped. Returns (the tables, the text counted)."""
    lengths, vocab = shipped_lengths(args), args.vocab_size
    first = loader.stream.taken
    if not lengths or args.eam_context_tokens == 0:
        return no_contexts(runtime.device), CountedText(first, first, loader.stream.corpus_tokens)
    history = max(max(lengths), 1)
    rank_tokens = train_rank_tokens(runtime, args)
    parts = []
    while loader.stream.taken - first < args.eam_context_tokens:
        text, _ = loader.next_text(rank_tokens, history)
        recent = recent_tokens(text[None, :-1], history)[0, history - 1:]  # [rank_tokens, C]
        parts.append(count_context_pairs(recent, text[history:], vocab, lengths))
        if len(parts) == 64:  # merged now and then: the pairs of one batch repeat many times
            parts = [merge_pairs(*parts)]
    codes, counts = merge_pairs(*parts)
    if runtime.distributed:
        rank_pairs = all_gather_rows(torch.tensor([codes.numel()], device=runtime.device),
                                     [1] * runtime.world_size).tolist()
        codes, counts = merge_pairs((all_gather_rows(codes, rank_pairs),
                                     all_gather_rows(counts, rank_pairs)))
    counted = CountedText(first, loader.stream.taken, loader.stream.corpus_tokens)
    return context_tables(codes, counts, vocab).pruned(args.eam_context_min_count), counted


def memory_diagnostics(contexts: ContextTables, text: torch.Tensor, lengths: tuple[int, ...],
                       vocab_size: int) -> dict[str, float]:
    """The loss (nats per token) of the memory, and of its empty context alone, on running text
    it did not count (its first max(lengths) tokens the history): at most about ln V."""
    history = max(max(lengths, default=0), 1)
    recent = recent_tokens(text[None, :-1], history)[0, history - 1:]
    targets = text[history:]
    memory = ContextCounts(contexts, vocab_size)
    nll = {}
    for name, read in (("memory_nll", lengths), ("unigram_nll", lengths[:1])):
        probs, _ = read_contexts(recent, memory, read)
        nll[name] = -probs.gather(1, targets[:, None]).log().mean().item()
    return nll


def write_memory(runtime: Runtime, args: Hyperparameters, loader: DistributedTokenLoader
                 ) -> tuple[ContextTables, CountedText]:
    """The context memory counted from training text, and the text it counted; its diagnostics
    on the next slice of text."""
    started = time.perf_counter()
    contexts, counted = count_contexts(runtime, args, loader)
    assert_replicas_identical(runtime, "memory", [getattr(contexts, name)
                                                  for name in CONTEXT_BUFFERS])
    lengths = shipped_lengths(args)
    rank_tokens = train_rank_tokens(runtime, args)
    text, _ = loader.next_text(rank_tokens, max(max(lengths, default=0), 1))
    quality = memory_diagnostics(contexts, text, lengths, args.vocab_size)
    log_stage(runtime, "eam_write", elapsed_ms(started),
              f"context_tokens:{counted.tokens} context_contexts:{contexts.codes.numel()} "
              f"context_pairs:{contexts.counts.numel()} "
              + " ".join(f"{name}:{value:.4f}" for name, value in quality.items()))
    return contexts, counted


# -------------------------------------------------------------------------------------------------
# 6. Distillation
#
# The shipped model: an encoder (the teacher's embedding and lowest ENC_LAYERS blocks) maps tokens
# to features; the memory gives p_mem after the position's recent tokens. The decoder adds a
# zero-initialised MLP correction, which sees p_mem's expected token embedding, to the encoder's
# state. p = (1 - g) p_model + g p_mem through a gate g computed from the prefix alone: normalized
# for any g, as kNN-LM mixes (Khandelwal et al. 2020). Distillation trains it end to end on the
# mixture's loss plus KL from the teacher to the model part, with the pairs that will ship, each
# position's own occurrences left out, and the text trained on counted as it goes, as the
# evaluation counts scored text.
# -------------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    def __init__(self, model_dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(2 * model_dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, base: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """rms_norm(base + MLP([base, memory])), memory: p_mem's expected token embedding."""
        hidden = F.leaky_relu(self.fc(rms_norm(torch.cat([base, memory], dim=-1))), 0.5).square()
        return rms_norm(base + self.proj(hidden))


class MemoryGate(nn.Module):
    """The mixture weight's logit from the prefix alone: linear in the features [N, D], the
    memory's evidence [N, L] and p_mem's entropy and log peak (detached), from GATE_INIT."""

    GATE_INIT = 0.1

    def __init__(self, model_dim: int, lengths: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(model_dim + lengths + 2))
        self.bias = nn.Parameter(torch.full((1,), math.log(self.GATE_INIT / (1 - self.GATE_INIT))))

    def forward(self, features: torch.Tensor, evidence: torch.Tensor,
                p_mem: torch.Tensor) -> torch.Tensor:
        p_mem = p_mem.detach()
        entropy = torch.special.entr(p_mem).sum(1, keepdim=True)
        peak = p_mem.max(1, keepdim=True).values.log()
        inputs = torch.cat([features.float(), evidence, entropy, peak], dim=1)
        return inputs @ self.weight + self.bias


def mix_with_memory(model_log_probs: torch.Tensor, p_mem: torch.Tensor,
                    gate_logit: torch.Tensor) -> torch.Tensor:
    """log((1 - g) exp(model_log_probs) + g p_mem), g = sigmoid(gate_logit) [N]: normalized, as
    both [N, V] are; the target is not an argument: it cannot be."""
    gate_logit = gate_logit.float()[:, None]
    return torch.logaddexp(F.logsigmoid(-gate_logit) + model_log_probs,
                           F.logsigmoid(gate_logit) + p_mem.log())


def key_projection(model_dim: int, key_dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(model_dim, key_dim, generator=generator) / math.sqrt(model_dim)


class KnnKeys(nn.Module):
    """The kNN store's keys: unit vectors of a fixed random projection (from its seed) of the
    features less their mean over training text (uncentred, they share one direction)."""

    def __init__(self, model_dim: int, key_dim: int, seed: int):
        super().__init__()
        projection = key_projection(model_dim, key_dim, seed)
        self.register_buffer("projection", projection, persistent=False)
        self.register_buffer("centre", torch.zeros(model_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize((features.float() - self.centre) @ self.projection, dim=-1)


def centre_keys(runtime: Runtime, args: Hyperparameters, model: nn.Module,
                loader: DistributedTokenLoader) -> None:
    """The key centre: the features' mean over the next global training batch, the same on
    every rank."""
    rank_tokens = train_rank_tokens(runtime, args)
    x, _ = loader.next_batch(rank_tokens, args.train_seq_len)
    with torch.no_grad(), autocast(runtime):
        total = model.features(x).float().flatten(0, 1).sum(0)
    model.keys.centre.copy_(all_reduce_(total) / (x.numel() * runtime.world_size))


@dataclass(frozen=True)
class StudentConfig:
    """What the shipped model is; the artifact's header carries it whole."""

    encoder: GPTConfig
    dec_hidden: int
    context_lengths: tuple[int, ...]  # read, and counted while scoring (learned ones too)
    key_dim: int  # the kNN store's keys: a fixed projection of the features
    projection_seed: int


def student_config(args: Hyperparameters) -> StudentConfig:
    learned = shipped_lengths(args) and learned_lengths(args)
    return StudentConfig(settings_view(GPTConfig, args, num_layers=args.enc_layers),
                         args.dec_hidden, (*shipped_lengths(args), *learned), args.knn_key_dim,
                         args.seed)


class MemoryLM(nn.Module):
    """Encoder + memory + decoder and gate: the model the artifact carries."""

    kind = "eam"  # MODEL, and the artifact header's kind

    def __init__(self, config: StudentConfig, contexts: ContextTables | None = None):
        super().__init__()
        self.config = config
        dim = config.encoder.model_dim
        self.encoder = GPT(config.encoder)
        self.decoder = Decoder(dim, config.dec_hidden)
        self.gate = MemoryGate(dim, len(config.context_lengths))
        self.keys = KnnKeys(dim, config.key_dim, config.projection_seed)
        # One object for the model's life (a compiled graph holding it stays valid), reset from
        # the buffers.
        self.memory = ContextCounts(no_contexts(), config.encoder.vocab_size)
        self.load_contexts(no_contexts() if contexts is None else contexts)

    def load_contexts(self, contexts: ContextTables) -> None:
        """The shipped context memory, as the buffers packing reads."""
        for name in CONTEXT_BUFFERS:
            self.register_buffer(f"context_{name}", getattr(contexts, name))
        self.forget()

    def forget(self) -> None:  # back to the shipped counts
        self.memory.reset(self.contexts)

    def _apply(self, fn, recurse: bool = True):
        applied = super()._apply(fn, recurse)
        self.forget()  # the buffers moved (.to): the memory is made again from them
        return applied

    @property
    def contexts(self) -> ContextTables:
        return ContextTables(*(getattr(self, f"context_{name}") for name in CONTEXT_BUFFERS))

    @property
    def recent_length(self) -> int:
        return max((*self.config.context_lengths, 1))

    @property
    def vocab_size(self) -> int:
        return self.config.encoder.vocab_size

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        return self.encoder.body(idx)

    def query(self, features: torch.Tensor) -> torch.Tensor:
        return self.keys(features)

    def head(self, features: torch.Tensor, recent: torch.Tensor,
             leave_out: LeaveOut | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features [N, D], recent tokens [N, recent_length] -> (the mixture's log-probabilities,
        the model's own) [N, V]; leave_out: read_contexts' (training only)."""
        p_mem, evidence = read_contexts(recent, self.memory, self.config.context_lengths,
                                        leave_out)
        expected = rms_norm(p_mem @ self.encoder.embed.weight.float()).to(features.dtype)
        logits = self.encoder.logits(self.decoder(features, expected))
        gate_logit = self.gate(features, evidence, p_mem)
        model_log_probs = F.log_softmax(logits.float(), -1)
        return mix_with_memory(model_log_probs, p_mem, gate_logit), model_log_probs

    def forward(self, idx: torch.Tensor, leave_out: LeaveOut | None = None):
        """idx [B, T] -> head's outputs [B*T, V]."""
        features = self.features(idx).flatten(0, 1)
        return self.head(features, recent_tokens(idx, self.recent_length).flatten(0, 1),
                         leave_out)


def distillation_loss(log_probs: torch.Tensor, targets: torch.Tensor,
                      teacher_logits: torch.Tensor, kl_weight: float, temperature: float,
                      model_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of normalized log-probabilities [N, V] (the mixture; not normalized again)
    + kl_weight * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015), the
    student being model_log_probs when given (the model's part of the mixture), else log_probs."""
    loss = F.nll_loss(log_probs, targets.reshape(-1))
    if kl_weight:
        student = log_probs if model_log_probs is None else model_log_probs
        if temperature != 1:  # softmax is shift-invariant: log-probs temper as logits do
            student = F.log_softmax(student / temperature, -1)
            teacher_logits = teacher_logits / temperature
        kl = F.kl_div(student, F.log_softmax(teacher_logits.float(), -1), log_target=True,
                      reduction="batchmean")
        loss = loss + kl_weight * temperature**2 * kl
    return loss


def init_student(args: Hyperparameters, teacher: GPT, contexts: ContextTables) -> MemoryLM:
    """The student with the teacher's embedding and lowest ENC_LAYERS blocks."""
    torch.manual_seed(args.seed + 1)
    device = next(teacher.parameters()).device
    student = MemoryLM(student_config(args), contexts).to(device)
    student.encoder.embed.load_state_dict(teacher.embed.state_dict())
    for mine, theirs in zip(student.encoder.blocks, teacher.blocks, strict=False):
        mine.load_state_dict(theirs.state_dict())
    return student


def fit_memories(runtime: Runtime, args: Hyperparameters, student: MemoryLM) -> float:
    """Fit the context pairs to the size limit as packing will, reserving the bytes the
    zero-initialised tensors will take once trained; rank 0 fits, every rank keeps the pairs it
    kept. Returns the seconds one packing took (on every rank), which sizes packing's reserve."""
    started = time.perf_counter()
    reserve = untrained_bytes(student, args.quant_bits)
    fitted: list = [0, 0.0]  # pairs kept, seconds of a packing
    if runtime.master:
        _, contexts, build_s = fit_artifact(student, args, code_size(args) + reserve)
        fitted = [contexts.counts.numel(), build_s]
    if runtime.distributed:
        dist.broadcast_object_list(fitted, 0)
    contexts = student.contexts.most_counted(fitted[0])
    log_fit(runtime, "distill", student, contexts, started, fitted[1], reserve)
    student.load_contexts(contexts)
    return fitted[1]


class ReadText:
    """Distillation counts the global batches it has trained on into the student's memory, as
    the evaluation counts scored text; it starts afresh before its history would pass
    DISTILL_HISTORY_TOKENS or hold the corpus's text twice (the batch to come would be in it)."""

    def __init__(self, student: MemoryLM, loader: DistributedTokenLoader, history_tokens: int):
        self.student, self.loader = student, loader
        self.limit = min(history_tokens, loader.stream.corpus_tokens // 2)
        self.first = loader.stream.taken  # the stream index the history starts at

    def count(self) -> None:  # the global batch next_batch read last
        history, text, first = self.loader.last_read
        if first + text.size - self.first > self.limit:
            self.student.forget()
            self.first = first
        length = self.student.recent_length
        before = np.concatenate([np.full(max(length - history.size, 0), -1), history[-length:]])
        whole = torch.from_numpy(np.concatenate([before, text]).astype(np.int64))
        whole = whole.to(self.student.context_codes.device)
        recent = recent_tokens(whole[None, :-1], length)[0, length - 1:]
        self.student.memory.add(*count_context_pairs(
            recent, whole[length:], self.student.vocab_size, self.student.config.context_lengths))


def distill(runtime: Runtime, args: Hyperparameters, teacher: GPT,
            memories: tuple[ContextTables, CountedText], loader: DistributedTokenLoader,
            run_started: float) -> MemoryLM:
    started = time.perf_counter()
    contexts, counted = memories
    student = init_student(args, teacher, contexts)
    build_s = fit_memories(runtime, args, student)
    read_text = ReadText(student, loader, args.distill_history_tokens)
    left_out = torch.zeros(2, dtype=torch.long, device=runtime.device)  # targets: left out, all

    def lm_loss(model, x, y):
        # The batch's own occurrences in the counts (a small corpus read twice), always passed,
        # so the compiled model meets one kind of batch.
        times = counted.times(loader.first_target_index + torch.arange(y.numel(),
                                                                        device=y.device))
        leave_out = (y.flatten(), times)
        left_out[0] += (times > 0).sum()
        left_out[1] += y.numel()
        scores, model_log_probs = model(x, leave_out=leave_out)
        read_text.count()  # after its read: the batch never reads its own text
        with torch.no_grad():
            teacher_logits = teacher.logits(teacher.body(x)).flatten(0, 1)
        return distillation_loss(scores, y, teacher_logits, args.distill_kl_weight,
                                 args.distill_temperature, model_log_probs)

    # Packing's reserve: at most two packings (PACK_MARGIN), each allowed twice the fit's time.
    stop_at = min(stage_end(run_started, args, args.teacher_time_frac + args.distill_time_frac),
                  run_started + args.max_wallclock_seconds - 4 * build_s)
    phase = Phase(DISTILL_PHASE, lm_loss, args.distill_batch_tokens, args.train_seq_len, stop_at,
                  args.distill_iterations, args.distill_lr_scale)
    stats = run_training(runtime, args, student, phase, loader)
    student.eval().requires_grad_(False)
    student.forget()  # what distillation counted is not part of the model
    assert_replicas_identical(runtime, "student", list(student.state_dict().values()))
    left, targets = all_reduce_(left_out).tolist()
    params = sum(p.numel() for p in student.parameters())
    log_stage(runtime, "distill", elapsed_ms(started),
              f"params:{params} steps:{stats['steps']} loss:{stats['loss']:.4f} "
              f"left_out_share:{left / max(targets, 1):.4f}")
    return student


# The built-in baseline (MODEL=transformer), the teacher trained for the whole budget, with the
# memory model's interface (features -> query, head): packing and evaluation treat both alike.


@dataclass(frozen=True)
class BaselineConfig:
    gpt: GPTConfig
    key_dim: int
    projection_seed: int


class TransformerLM(nn.Module):
    kind = "transformer"  # MODEL, and the artifact header's kind
    recent_length = 1  # the recent tokens head is given (it reads none)

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.gpt = GPT(config.gpt)
        self.keys = KnnKeys(config.gpt.model_dim, config.key_dim, config.projection_seed)

    @classmethod
    def from_teacher(cls, teacher: GPT, args: Hyperparameters) -> TransformerLM:
        model = cls(BaselineConfig(teacher.config, args.knn_key_dim, args.seed))
        model.gpt.load_state_dict(teacher.state_dict())
        return model.to(next(teacher.parameters()).device).eval().requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return self.config.gpt.vocab_size

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt.body(idx)

    def query(self, features: torch.Tensor) -> torch.Tensor:
        return self.keys(features)

    def head(self, features: torch.Tensor, recent: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gpt.logits(features)
        return logits, logits


# -------------------------------------------------------------------------------------------------
# 7. Packing
#
# Matrices go per row to QUANT_BITS values in int8 containers, token tables to int8, small
# tensors to fp16; the memory exactly, as integers in byte planes of their narrowest type. A JSON
# header holds the config and names every tensor; the payload is zstd-compressed, and the file
# carries a magic, a version and a sha256. Over the limit, the memory's least-counted pairs go
# until it fits; the baseline, with no memory, packs at the most bits that fit, down to 5.
# -------------------------------------------------------------------------------------------------

ARTIFACT_MAGIC = b"EAMGOLF\x00"
ARTIFACT_VERSION = 12  # raised whenever the format or a config changes
ARTIFACT_PREFIX = struct.Struct("<8sI32s")
MEMORY_BUFFERS = tuple(f"context_{name}" for name in CONTEXT_BUFFERS)  # packed exactly
ARTIFACT_CONFIGS: dict[str, type] = {"eam": StudentConfig, "transformer": BaselineConfig}


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: int8 codes in [-(2^(b-1)-1), 2^(b-1)-1], fp16 scales."""
    levels = 2 ** (bits - 1) - 1
    weight = weight.detach().float().cpu()
    scale = (weight.abs().amax(dim=1) / levels).clamp_min(1e-12).half()
    codes = torch.round(weight / scale.float()[:, None]).clamp(-levels, levels).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


def packed_bits(model: nn.Module, quant_bits: int) -> dict[str, int | None]:
    """Each parameter's bits: 8 for tables, QUANT_BITS for matrices, None (fp16) for vectors and
    for tensors too small for row scales to pay."""
    group_bits = dict(table=8, matrix=quant_bits, vector=None)
    sizes = {name: parameter.numel() for name, parameter in model.named_parameters()}
    return {name: group_bits[group] if sizes[name] >= 4096 else None
            for group, names in parameter_groups(model).items() for name in names}


def pack_tensors(model: MemoryLM | TransformerLM, quant_bits: int,
                 contexts: ContextTables | None = None
                 ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """(header entries, raw arrays) for everything the evaluation reads (contexts: the memory to
    ship, None for the baseline)."""
    entries: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}

    def add(name: str, tensor: torch.Tensor, bits: int | None) -> None:
        if bits is None:
            arrays[name] = tensor.detach().cpu().half().numpy()
            entries[name] = dict(kind="fp16", shape=list(tensor.shape))
            return
        codes, scale = quantize_rows(tensor, bits)
        arrays[name + ".q"] = codes.numpy()
        arrays[name + ".scale"] = scale.numpy()
        entries[name] = dict(kind="int8_rows", shape=list(tensor.shape))

    def add_integers(name: str, values: torch.Tensor, differences: bool = False) -> None:
        values = values.cpu().numpy()
        if differences:  # sorted codes as their differences: small numbers
            values = np.diff(values.reshape(-1), prepend=np.int64(0))
        arrays[name] = integer_planes(values)
        entries[name] = dict(kind="uint_planes", shape=list(values.shape),
                             differences=differences)

    bits = packed_bits(model, quant_bits)  # buffers (the key centre) are not in it: fp16
    for name, tensor in model.state_dict().items():
        if name not in MEMORY_BUFFERS:
            add(name, tensor, bits.get(name))
    if contexts is not None:  # exactly
        for name in CONTEXT_BUFFERS:
            add_integers(f"context_{name}", getattr(contexts, name), differences=name == "codes")
    return entries, arrays


def integer_planes(values: np.ndarray) -> np.ndarray:
    """Non-negative integers in their narrowest unsigned type as its byte planes [width, N]:
    the high planes of small numbers are runs of zeros, which zstd packs cheaply."""
    if values.size and values.min() < 0:
        raise ValueError(f"integer_planes: {int(values.min())} is negative")
    largest = int(values.max()) if values.size else 0
    width = next(width for width in (1, 2, 4, 8) if largest < 2 ** (8 * width))
    flat = values.reshape(-1).astype(f"<u{width}")  # a new, contiguous array
    return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, width).T)


def integers_from_planes(planes: np.ndarray) -> np.ndarray:
    width = planes.shape[0]
    return np.ascontiguousarray(planes.T).view(f"<u{width}").reshape(-1).astype(np.int64)


def unpack_tensors(entries: dict[str, dict], arrays: dict[str, np.ndarray]
                   ) -> dict[str, torch.Tensor]:
    """The inverse of pack_tensors, up to the quantization: float32 tensors by name."""
    tensors = {}
    for name, entry in entries.items():
        if entry["kind"] == "fp16":
            tensors[name] = torch.from_numpy(arrays[name].astype(np.float32))
        elif entry["kind"] == "uint_planes":
            values = integers_from_planes(arrays[name])
            values = np.cumsum(values) if entry["differences"] else values
            tensors[name] = torch.from_numpy(values.reshape(entry["shape"]))
        else:
            tensors[name] = dequantize_rows(torch.from_numpy(arrays[name + ".q"].copy()),
                                            torch.from_numpy(arrays[name + ".scale"].copy()))
    return tensors


def serialize(entries: dict[str, dict], arrays: dict[str, np.ndarray], kind: str,
              model: dict) -> bytes:
    """Header JSON (length-prefixed) + the arrays' bytes, grouped by dtype for zstd."""
    layout, offset, chunks = [], 0, []
    for name in sorted(arrays, key=lambda n: (arrays[n].dtype.str, n)):
        data = np.ascontiguousarray(arrays[name]).tobytes()
        layout.append(dict(name=name, dtype=arrays[name].dtype.str,
                           shape=list(arrays[name].shape), offset=offset))
        chunks.append(data)
        offset += len(data)
    header = json.dumps(dict(kind=kind, model=model, tensors=entries, layout=layout),
                        sort_keys=True).encode()
    return struct.pack("<I", len(header)) + header + b"".join(chunks)


def deserialize(payload: bytes) -> tuple[str, dict, dict[str, dict], dict[str, np.ndarray]]:
    (header_len,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4: 4 + header_len])
    body = memoryview(payload)[4 + header_len:]
    arrays = {}
    for item in header["layout"]:
        dtype = np.dtype(item["dtype"])
        count = int(np.prod(item["shape"]))
        arrays[item["name"]] = np.frombuffer(body, dtype=dtype, count=count,
                                             offset=item["offset"]).reshape(item["shape"])
    return header.get("kind", ""), header["model"], header["tensors"], arrays


def compress(payload: bytes, level: int) -> bytes:
    """zstd in 4 MB jobs on several threads: the bytes depend on the level, not the threads."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=compression_threads(), job_size=4 << 20, window_log=23, overlap_log=6)
    return zstandard.ZstdCompressor(compression_params=params).compress(payload)


def compression_threads() -> int:
    """The host's usable CPUs, at most 8 (~130 MB each at level 22): rank 0 packs alone."""
    return min(8, usable_cpus())


def build_artifact(model: MemoryLM | TransformerLM, args: Hyperparameters,
                   contexts: ContextTables | None = None) -> bytes:
    """The artifact of `model` with the memory `contexts`, by default the model's own."""
    if contexts is None and isinstance(model, MemoryLM):
        contexts = model.contexts
    entries, arrays = pack_tensors(model, args.quant_bits, contexts)
    payload = serialize(entries, arrays, model.kind, dataclasses.asdict(model.config))
    blob = compress(payload, args.zstd_level)
    return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION,
                                hashlib.sha256(blob).digest()) + blob


def read_artifact(path: Path, sha256: str = "") -> tuple[StudentConfig | BaselineConfig,
                                                       dict[str, dict], dict[str, np.ndarray]]:
    """(the model's config, tensor entries, arrays), every check naming the file; with sha256,
    it must be the very file packed."""
    import zstandard

    raw = Path(path).read_bytes()
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(raw).hexdigest()} is not the "
                         f"{sha256} this run packed (another run wrote the same path?)")
    if len(raw) < ARTIFACT_PREFIX.size:
        raise ValueError(f"{path}: truncated artifact ({len(raw)} bytes)")
    magic, version, checksum = ARTIFACT_PREFIX.unpack_from(raw)
    if magic != ARTIFACT_MAGIC:
        raise ValueError(f"{path}: not an eam-golf artifact (magic {magic!r})")
    if version != ARTIFACT_VERSION:
        raise ValueError(f"{path}: artifact version {version}, expected {ARTIFACT_VERSION}")
    blob = raw[ARTIFACT_PREFIX.size:]
    if hashlib.sha256(blob).digest() != checksum:
        raise ValueError(f"{path}: checksum mismatch (corrupted or truncated artifact)")
    kind, model, entries, arrays = deserialize(zstandard.ZstdDecompressor().decompress(blob))
    if kind not in ARTIFACT_CONFIGS:
        raise ValueError(f"{path}: unknown model kind {kind!r} (expected one of "
                         f"{sorted(ARTIFACT_CONFIGS)})")
    return config_from_dict(ARTIFACT_CONFIGS[kind], model, str(path)), entries, arrays


def code_size(args: Hyperparameters) -> int:
    """The code's bytes the size rule counts: train_gpt.py on disk, or SIZE_CODE_BYTES."""
    return args.size_code_bytes or Path(__file__).stat().st_size


def artifact_accounting(code_path: Path, artifact_path: Path, limit: int) -> dict[str, int]:
    """The size rule: the real bytes of the code file plus those of the artifact."""
    code_bytes = Path(code_path).stat().st_size
    model_bytes = Path(artifact_path).stat().st_size
    total = code_bytes + model_bytes
    return dict(code_bytes=code_bytes, model_bytes=model_bytes, total_bytes=total, limit=limit,
                margin=limit - total)


def component_sizes(arrays: dict[str, np.ndarray], level: int) -> dict[str, tuple[int, int]]:
    """(raw, compressed-alone) bytes per component group: encoder, decoder, gate, memory."""
    groups: dict[str, list[bytes]] = {}
    for name in sorted(arrays):
        group = name.split(".")[0]
        group = f"memory.{group}" if group in MEMORY_BUFFERS else group
        groups.setdefault(group, []).append(np.ascontiguousarray(arrays[name]).tobytes())
    return {group: (sum(map(len, parts)), len(compress(b"".join(parts), level)))
            for group, parts in groups.items()}


def write_atomically(path: Path, data: bytes, replace: bool = True) -> None:
    """A reader sees the old file or the whole new one, even after a crash (fsync, then rename);
    replace=False never replaces a file that appeared meanwhile: FileExistsError."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # atomic, and fails where path exists
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if path.exists():
                    raise FileExistsError from None
                os.replace(temporary, path)
    except FileExistsError:
        raise FileExistsError(f"ARTIFACT_PATH={str(path)!r} appeared during this run (another "
                              "run's artifact?): left as it is") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def fewest_bits(args: Hyperparameters) -> int:
    """The fewest bits a matrix value of MODEL can pack to (the memory model drops pairs)."""
    return LOWEST_QUANT_BITS if args.model == "transformer" else args.quant_bits


def fit_baseline(model: TransformerLM, args: Hyperparameters, code_bytes: int
                 ) -> tuple[bytes, int]:
    """The baseline has no memory to drop: (its artifact, bits) at the most bits from
    QUANT_BITS down that fit, so that a run over the limit is not lost after training."""
    for bits in range(args.quant_bits, LOWEST_QUANT_BITS - 1, -1):
        artifact = build_artifact(model, dataclasses.replace(args, quant_bits=bits))
        if code_bytes + len(artifact) <= args.size_limit:
            return artifact, bits
    raise ValueError(f"SIZE_LIMIT={args.size_limit}: the transformer baseline needs "
                     f"{code_bytes + len(artifact)} bytes with the code even at {LOWEST_QUANT_BITS}"
                     " bits a value (QUANT_BITS's least): shrink it (NUM_LAYERS, MODEL_DIM, "
                     "MLP_MULT) or raise SIZE_LIMIT")


def fit_artifact(model: MemoryLM, args: Hyperparameters, code_bytes: int, margin: float = 1.02
                 ) -> tuple[bytes, ContextTables, float]:
    """Pack; while over SIZE_LIMIT, keep fewer pairs (the most counted), cutting `margin` times
    the excess at a pair's bytes estimated from the packings before. Returns (the artifact, the
    memory it holds, the seconds of its last packing)."""
    # Pairs that could not fit even at 1.5 bytes each go before any packing.
    contexts = model.contexts.most_counted(max(args.size_limit - code_bytes, 0) * 2 // 3)
    started = time.perf_counter()
    artifact = build_artifact(model, args, contexts)
    build_s = time.perf_counter() - started
    pairs, before, empty = contexts.counts.numel(), None, 0
    while code_bytes + len(artifact) > args.size_limit:
        if before is None:
            empty = len(build_artifact(model, args, no_contexts()))
            if code_bytes + empty > args.size_limit:
                raise ValueError(f"SIZE_LIMIT={args.size_limit}: even an empty memory does not "
                                 f"fit ({code_bytes + empty} bytes with the code)")
            before = (0, empty)
        # A pair's bytes between the last two packings (the least counted pack below average),
        # the average where noise made sizes rise, and at most twice the average.
        average = (len(artifact) - empty) / pairs
        marginal = (len(artifact) - before[1]) / (pairs - before[0])
        per_pair = max(0.5, min(marginal, 2 * average) if marginal > 0 else average)
        excess = code_bytes + len(artifact) - args.size_limit
        before = (pairs, len(artifact))
        pairs = max(0, pairs - math.ceil(margin * excess / per_pair) - 1)
        contexts = model.contexts.most_counted(pairs)
        started = time.perf_counter()
        artifact = build_artifact(model, args, contexts)
        build_s = time.perf_counter() - started
    return artifact, contexts, build_s


SMALLEST_PACKED_SHARE = 0.7  # below what trained weights pack to: refuse only what cannot fit


def width_bytes(model: nn.Module, quant_bits: int, names: set[str] | None = None) -> int:
    """The bytes the weights (or those named) take at their packed widths before compression,
    with row scales and fp16 buffers; it reads shapes alone (the meta device will do)."""
    tensors = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
               if name not in MEMORY_BUFFERS}  # what pack_tensors packs as weights
    bits = packed_bits(model, quant_bits)
    total = 0
    for name, tensor in tensors.items():
        if names is None or name in names:
            shape, width = tensor.shape, bits.get(name)
            total += (2 * shape.numel() if width is None
                      else math.ceil(shape.numel() * width / 8) + 2 * shape[0])
    return total


def untrained_bytes(model: MemoryLM, quant_bits: int) -> int:
    """About the bytes the all-zero parameters will take once trained: their width_bytes."""
    zero = {name for name, parameter in model.named_parameters() if not parameter.any()}
    return width_bytes(model, quant_bits, zero)


PACK_MARGIN = 2.0  # packing cuts twice its excess, so one packing or a second should fit


def log_fit(runtime: Runtime, at: str, model: MemoryLM, contexts: ContextTables,
            started: float, build_s: float, reserve: int = 0) -> None:
    """The FIT_RECORD line: at:distill or at:pack, the pairs kept and the last packing's time."""
    pairs = contexts.counts.numel()
    runtime.log(f"{FIT_RECORD} at:{at} context_pairs:{pairs} "
                f"dropped_context_pairs:{model.context_counts.numel() - pairs} "
                f"reserve_bytes:{reserve} fit_ms:{elapsed_ms(started):.0f} "
                f"build_ms:{1000 * build_s:.0f}")


def pack(runtime: Runtime, args: Hyperparameters, model: MemoryLM | TransformerLM) -> str:
    """Write the artifact (rank 0); every rank gets its file's sha256, which the evaluation
    checks, so it cannot score a file another run wrote to the same path."""
    started = time.perf_counter()
    path = Path(args.artifact_path)
    code_bytes = code_size(args)
    digest = [""]
    if runtime.master:
        if isinstance(model, MemoryLM):
            artifact, contexts, build_s = fit_artifact(model, args, code_bytes, PACK_MARGIN)
            log_fit(runtime, "pack", model, contexts, started, build_s)
            quant_bits = args.quant_bits
        else:
            artifact, quant_bits = fit_baseline(model, args, code_bytes)
        write_atomically(path, artifact, replace=False)
        read_artifact(path)  # the file as written reads back, before training counts as done
        sizes = artifact_accounting(Path(__file__), path, args.size_limit)
        digest[0] = file_sha256(path)
        stand_in = (f" size_code_bytes:{args.size_code_bytes} counted_total_bytes:"
                    f"{code_bytes + sizes['model_bytes']}" if args.size_code_bytes else "")
        runtime.log(f"{ARTIFACT_RECORD} code_bytes:{sizes['code_bytes']} "
                    f"model_bytes:{sizes['model_bytes']} total_bytes:{sizes['total_bytes']} "
                    f"limit:{sizes['limit']} quant_bits:{quant_bits} path:{path} "
                    f"sha256:{digest[0]}{stand_in}")
    if runtime.distributed:
        dist.broadcast_object_list(digest, 0)
    log_stage(runtime, "pack", elapsed_ms(started))
    return digest[0]


def log_artifact_components(runtime: Runtime, args: Hyperparameters) -> None:
    """Each component group's bytes compressed alone: a report, after the training clock."""
    if runtime.master:
        _, _, arrays = read_artifact(Path(args.artifact_path))
        for group, (raw, packed) in component_sizes(arrays, args.zstd_level).items():
            runtime.log(f"{COMPONENT_RECORD} name:{group} raw_bytes:{raw} zstd_bytes:{packed}")


def load_artifact(path: Path, device: torch.device, sha256: str = "") -> MemoryLM | TransformerLM:
    """The shipped model from the artifact bytes alone, nothing from the environment."""
    config, entries, arrays = read_artifact(path, sha256)
    tensors = unpack_tensors(entries, arrays)
    if isinstance(config, BaselineConfig):
        model = TransformerLM(config)
    else:
        missing = [name for name in MEMORY_BUFFERS if name not in tensors]
        if missing:
            raise ValueError(f"{path}: its tensors do not match its model config: the memory's "
                             f"{missing} are missing")
        model = MemoryLM(config, ContextTables(*(tensors[name] for name in MEMORY_BUFFERS)))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise ValueError(f"{path}: its tensors do not match its model config: {error}") from None
    return model.to(device).eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------
# 8. Evaluation
#
# Sliding windows score each target exactly once, after the first window with at least
# EVAL_SEQ_LEN - EVAL_STRIDE tokens of context, in fixed chunks in global order shared by the
# ranks. Once a chunk is scored, and not before, the learners take it in, identically on every
# rank: test-time training, the memory's counts and the kNN store, mixed as p = (1 - lambda)
# p_model + lambda p_knn (kNN-LM, Khandelwal et al. 2020), lambda from similarities alone.
# -------------------------------------------------------------------------------------------------


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> torch.Tensor:
    """[W, 3] rows (start, score_from, score_to) over targets 0..num_tokens-2 (target j is token
    j + 1): the first window scores its seq_len targets, each later one the stride after. A
    target's window depends on its index alone, so a prefix of the split scores as the split."""
    targets = num_tokens - 1
    ends = torch.arange(seq_len, max(targets, seq_len) + stride, stride)
    ends = ends[: int((ends < targets).sum()) + 1]  # up to the first that reaches the last
    score_from = torch.cat([torch.tensor([0]), ends[:-1]])
    return torch.stack([ends - seq_len, score_from, ends.clamp(max=targets)], dim=1)


def knn_mix(model_log_probs: torch.Tensor, neighbour_sims: torch.Tensor,
            neighbour_targets: torch.Tensor, beta: float, lam: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) p_model + lam p_knn) [N, V]; sims [N, k] (-inf: no neighbour), lam [N] in
    [0, 1). The target is not an argument: it cannot be."""
    weights = torch.softmax(beta * neighbour_sims, dim=1).nan_to_num(0.0)
    p_knn = torch.zeros_like(model_log_probs).scatter_add_(1, neighbour_targets, weights)
    lam = lam[:, None]
    return torch.log((1 - lam) * model_log_probs.exp() + lam * p_knn)


def knn_lambda(neighbour_sims: torch.Tensor, base_lambda: float) -> torch.Tensor:
    """The mixture weight from the prefix only: base lambda x the best neighbour's similarity
    (clamped to [0, 1]; 0 with no neighbour)."""
    best = neighbour_sims[:, 0].nan_to_num(neginf=0.0).clamp(0, 1)
    return base_lambda * best


class KnnStore:
    """Exact nearest neighbours among (key, target) entries of scored tokens: a ring buffer of
    KNN_CAPACITY entries, allocated as it fills."""

    def __init__(self, capacity: int, dim: int, device: torch.device):
        self.capacity = capacity
        self.keys = torch.zeros(0, dim, device=device, dtype=torch.float16
                                if device.type == "cuda" else torch.float32)
        self.targets = torch.zeros(0, dtype=torch.long, device=device)
        self.size = 0
        self.next_slot = 0

    def add(self, keys: torch.Tensor, targets: torch.Tensor) -> None:
        allocated = self.keys.size(0)
        if self.size + keys.size(0) > allocated and allocated < self.capacity:
            grown = min(self.capacity, max(2 * allocated, self.size + keys.size(0)))
            self.keys = torch.cat([self.keys, self.keys.new_zeros(grown - allocated,
                                                                  self.keys.size(1))])
            self.targets = torch.cat([self.targets, self.targets.new_zeros(grown - allocated)])
        keys, targets = keys[-self.capacity:], targets[-self.capacity:]
        slots = (self.next_slot + torch.arange(keys.size(0), device=keys.device)) % self.capacity
        self.keys[slots] = keys.to(self.keys.dtype)
        self.targets[slots] = targets
        self.next_slot = int((self.next_slot + keys.size(0)) % self.capacity)
        self.size = min(self.capacity, self.size + keys.size(0))

    def search(self, queries: torch.Tensor, k: int, chunk: int = 262144):
        """Top-k (sims [N, k], targets [N, k]) over the store; -inf sims where there are none."""
        best_sims = torch.full((queries.size(0), k), -math.inf, device=queries.device)
        best_index = torch.zeros(queries.size(0), k, dtype=torch.long, device=queries.device)
        for begin in range(0, self.size, chunk):
            end = min(begin + chunk, self.size)
            # Top-k in the store's dtype (fp16 on GPU); only the k winners become fp32.
            sims = queries.to(self.keys.dtype) @ self.keys[begin:end].T
            top_sims, top_index = sims.topk(min(k, sims.size(1)), dim=1)
            merged_sims = torch.cat([best_sims, top_sims.float()], dim=1)
            merged_index = torch.cat([best_index, top_index + begin], dim=1)
            best_sims, order = merged_sims.topk(k, dim=1)
            best_index = merged_index.gather(1, order)
        if self.size == 0:  # nothing stored yet: no neighbour (-inf), whatever its target
            return best_sims, best_index
        return best_sims, self.targets[best_index]


def count_scored_text(model: MemoryLM, tokens: torch.Tensor, score_from: int,
                      score_to: int) -> None:
    """Score-first memory writes: count targets [score_from, score_to), all scored, with their
    contexts at every length the model reads (every rank alike, with no communication)."""
    length = model.recent_length
    begin = max(score_from - length + 1, 0)
    text = tokens[begin: score_to + 1].to(model.context_codes.device)
    recent = recent_tokens(text[None, :-1], length)[0, score_from - begin:]
    model.memory.add(*count_context_pairs(recent, text[score_from - begin + 1:], model.vocab_size,
                                          model.config.context_lengths))


@dataclass
class ScoreTotals:
    """This rank's scored targets: loss, bytes and count summed on the device, and where asked
    every scored distribution [N, V] with its target's index [N]."""

    sums: torch.Tensor | None = None  # float64 [nll, bytes, count]
    rows: list[torch.Tensor] | None = None
    indices: list[torch.Tensor] | None = None

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor, target_bytes: torch.Tensor,
            indices: torch.Tensor) -> None:
        nll = -log_probs.gather(1, targets[:, None]).double().sum()
        part = torch.stack([nll, target_bytes.to(nll.device).double().sum(),
                            nll.new_tensor(targets.numel())])
        self.sums = part if self.sums is None else self.sums + part
        if self.rows is not None:
            self.rows.append(log_probs.cpu())
            self.indices.append(indices.cpu())

    def reduced(self, runtime: Runtime) -> tuple[float, float, int]:
        """(val_loss in nats per token, val_bpb, tokens) summed over ranks."""
        sums = (torch.zeros(3, dtype=torch.float64) if self.sums is None else self.sums.clone())
        nll, byte_count, count = all_reduce_(sums.to(runtime.device)).tolist()
        return nll / count, nll / math.log(2) / byte_count, int(count)


def window_batch(tokens: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                 last_position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (start, score_from, score_to) [B, 3] -> (inputs [B, L], mask of the targets to
    score [B, L], their indices [N]). Positions past last_position repeat it, unscored (C4)."""
    unclamped = rows[:, :1] + offsets  # [B, L]
    mask = (unclamped >= rows[:, 1:2]) & (unclamped < rows[:, 2:3])
    return tokens[unclamped.clamp(max=last_position)], mask, unclamped[mask]


def model_scores(model: MemoryLM | TransformerLM, inputs: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped model on windows [B, L]: (scores [N, V], unit queries [N, K]) at the mask."""
    features = model.features(inputs)[mask]
    scores, _ = model.head(features, recent_tokens(inputs, model.recent_length)[mask])
    return scores, model.query(features)


def chunk_rows(score_from: int, score_to: int, seq_len: int) -> torch.Tensor:
    """[R, 3] rows covering targets [score_from, score_to) once, seq_len a row, each window
    ending at its last target: a scored chunk as training rows, reading nothing past it."""
    ends = torch.arange(score_from + seq_len, score_to + seq_len, seq_len).clamp(max=score_to)
    starts = (ends - seq_len).clamp(min=0)
    froms = torch.cat([torch.tensor([score_from]), ends[:-1]])
    return torch.stack([starts, froms, ends], dim=1)


def adapted_parameters(model: nn.Module, spec: str) -> dict[str, nn.Parameter]:
    """The parameters TTT_PARAMS names: "all", or comma-separated prefixes of whole name parts."""
    named = dict(model.named_parameters())
    if spec == "all":
        return named
    prefixes = [prefix.strip() for prefix in spec.split(",") if prefix.strip()]
    chosen = {name: param for name, param in named.items()
              if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)}
    missing = [prefix for prefix in prefixes
               if not any(name == prefix or name.startswith(prefix + ".") for name in chosen)]
    if missing or not chosen:
        # Where parameters lie, blocks collapsed: 'encoder.blocks.3.mlp.fc.weight' -> .N
        parts = sorted({re.sub(r"\.\d+\..*", ".N", name.rsplit(".", 1)[0]) for name in named})
        raise ValueError(f"TTT_PARAMS={spec!r}: {missing or 'nothing'} names no parameter of the "
                         f"{model.kind} model; its parameters lie in {parts} (N: a block "
                         "index), or use 'all'")
    return chosen


def model_skeleton(args: Hyperparameters) -> MemoryLM | TransformerLM:
    """The model these settings will ship, on the meta device: what checks may ask of it."""
    with torch.device("meta"):
        if args.model == "transformer":
            gpt = settings_view(GPTConfig, args)
            return TransformerLM(BaselineConfig(gpt, args.knn_key_dim, args.seed))
        return MemoryLM(student_config(args))


class TestTimeTraining:
    """Score-first test-time training: once a chunk is scored, TTT_STEPS steps of the training's
    optimizers on it, at TTT_LR_SCALE x their rates. World-size invariant: rank r fills rows r,
    r + world, ... of a [micro-batches, parameters] gradient table, summed in one order."""

    def __init__(self, runtime: Runtime, args: Hyperparameters, model: MemoryLM | TransformerLM):
        self.runtime, self.args, self.model = runtime, args, model
        self.params = list(adapted_parameters(model, args.ttt_params).values())
        model.requires_grad_(False)
        for param in self.params:
            param.requires_grad_(True)
        self.optimizers = build_optimizers(model, args, args.ttt_lr_scale)
        self.steps, self.time_ms = 0, 0.0

    def learn(self, tokens: torch.Tensor, score_from: int, score_to: int) -> None:
        started, device = time.perf_counter(), self.runtime.device
        micro_batches = chunk_rows(score_from, score_to, self.args.eval_seq_len).split(
            self.args.ttt_batch_rows)
        offsets = torch.arange(self.args.eval_seq_len)
        sizes = [param.numel() for param in self.params]
        for _ in range(self.args.ttt_steps):
            table = torch.zeros(len(micro_batches), sum(sizes), device=device)
            for index in range(self.runtime.rank, len(micro_batches), self.runtime.world_size):
                inputs, mask, indices = window_batch(tokens, micro_batches[index], offsets,
                                                     score_to - 1)
                targets = tokens[indices + 1]
                with autocast(self.runtime):
                    scores, _ = model_scores(self.model, inputs.to(device), mask.to(device))
                loss = F.cross_entropy(scores.float(), targets.to(device), reduction="sum")
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                table[index] = torch.cat([torch.zeros(size, device=device) if grad is None
                                          else grad.flatten().float()
                                          for grad, size in zip(grads, sizes, strict=True)])
            gradient = all_reduce_(table).sum(0) / (score_to - score_from)
            for param, grad in zip(self.params, gradient.split(sizes), strict=True):
                param.grad = grad.view_as(param).to(param.dtype)
            for optimizer in self.optimizers.values():
                optimizer.step()
            self.steps += 1
        self.model.zero_grad(set_to_none=True)
        self.time_ms += elapsed_ms(started)


def evaluate(runtime: Runtime, args: Hyperparameters, score_batch, tokens: torch.Tensor,
             tables: ByteTables, knn_key_dim: int | None = None, keep_rows: bool = False,
             ttt: TestTimeTraining | None = None, writes: MemoryLM | None = None
             ) -> dict[str, ScoreTotals]:
    """Score every target once, in chunks of windows in global order; with a kNN key dim also
    the kNN mixture. score_batch(inputs [B, L], mask [B, L]) -> (log_probs [N, V], keys or None)
    at the mask. Returns this rank's totals ('model', 'knn'); keep_rows keeps every scored row
    (the causality tests compare them). After each chunk the learners take it in (ttt, writes:
    the model whose memory counts it, the store), until the projected time would pass
    MAX_WALLCLOCK_SECONDS; then they stop, on every rank at the same chunk.
    """
    started = time.perf_counter()
    windows = sliding_windows(tokens.numel(), args.eval_seq_len, args.eval_stride)
    chunk_windows = max(1, args.eval_chunk_tokens // args.eval_stride)
    chunks = windows.split(chunk_windows)
    store = (KnnStore(args.knn_capacity, knn_key_dim, runtime.device)
             if knn_key_dim is not None else None)
    totals = {name: ScoreTotals(rows=[] if keep_rows else None,
                                indices=[] if keep_rows else None)
              for name in (("model", "knn") if store is not None else ("model",))}
    offsets = torch.arange(args.eval_seq_len)
    learning = store is not None or ttt is not None or writes is not None
    for index, chunk in enumerate(chunks):
        chunk_started = time.perf_counter()
        shares = torch.tensor_split(torch.arange(chunk.size(0)), runtime.world_size)
        mine = chunk[shares[runtime.rank]]
        new_keys, new_targets = [], []
        for begin in range(0, mine.size(0), args.eval_batch_windows):
            inputs, mask, indices = window_batch(
                tokens, mine[begin: begin + args.eval_batch_windows], offsets, tokens.numel() - 2)
            host_targets = tokens[indices + 1]  # bytes are counted on the host: no device read
            targets = host_targets.to(runtime.device)
            with torch.no_grad(), autocast(runtime):
                log_probs, keys = score_batch(inputs.to(runtime.device), mask.to(runtime.device))
            log_probs = log_probs.float()
            target_bytes = tables.target_bytes(tokens[indices], host_targets)
            totals["model"].add(log_probs, targets, target_bytes, indices)
            if store is not None:
                sims, neighbour_targets = store.search(keys, args.knn_k)
                mixed = knn_mix(log_probs, sims, neighbour_targets, args.knn_beta,
                                knn_lambda(sims, args.knn_lambda))
                totals["knn"].add(mixed, targets, target_bytes, indices)
                new_keys.append(keys.float())
                new_targets.append(targets)
        if not learning or index == len(chunks) - 1:
            continue
        # Score first, then learn; TTT before the writes, so it never trains the gate on counts
        # that already hold its targets.
        score_from, score_to = int(chunk[0, 1]), int(chunk[-1, 2])
        if ttt is not None:
            ttt.learn(tokens, score_from, score_to)
        if writes is not None:
            count_scored_text(writes, tokens, score_from, score_to)
        if store is not None:
            counts = [int((chunk[s, 2] - chunk[s, 1]).sum()) for s in shares]
            none = torch.zeros(0, knn_key_dim, device=runtime.device)  # a rank with no window
            store.add(all_gather_rows(torch.cat([none, *new_keys]), counts),
                      all_gather_rows(torch.cat([none[:, 0].long(), *new_targets]), counts))
        # The chunks left, each as costly as this one and a quarter more; the slowest rank's.
        elapsed = time.perf_counter() - started
        projected = elapsed + 1.25 * (len(chunks) - index - 1) * (time.perf_counter()
                                                                 - chunk_started)
        projected = all_reduce_(torch.tensor(projected, device=runtime.device), "max").item()
        if projected > args.max_wallclock_seconds:
            learning = False
            runtime.log(f"{SHED_RECORD} after_chunk:{index + 1} chunks:{len(chunks)} "
                        f"projected_ms:{1000 * projected:.0f} "
                        f"limit_ms:{1000 * args.max_wallclock_seconds:.0f}")
    if store is not None:
        runtime.log(f"{KNN_STORE_RECORD} entries:{store.size} capacity:{store.capacity} "
                    f"bytes:{store.keys.nbytes + store.targets.nbytes}")
    return totals


def student_scorer(model: MemoryLM | TransformerLM):
    def score(inputs: torch.Tensor, mask: torch.Tensor):
        scores, queries = model_scores(model, inputs, mask)
        return F.log_softmax(scores.float(), dim=-1), queries
    return score


def teacher_scorer(teacher: GPT):
    def score(inputs: torch.Tensor, mask: torch.Tensor):
        logits = teacher.logits(teacher.body(inputs)[mask])
        return F.log_softmax(logits.float(), dim=-1), None
    return score


def score_artifact(runtime: Runtime, args: Hyperparameters, path: Path, tokens: torch.Tensor,
                   tables: ByteTables | None = None, sha256: str = "", keep_rows: bool = False
                   ) -> tuple[str, dict[str, ScoreTotals]]:
    """Every evaluation path from the artifact file on (the causality tests run through here):
    (the shipped model's kind, the totals)."""
    model = load_artifact(path, runtime.device, sha256)
    if tables is None:
        tables = build_byte_tables(args.tokenizer_path, model.vocab_size, str(path))
    check_token_ids(tokens.numpy(), model.vocab_size,
                    f"DATA_PATH={args.data_path!r} validation split", f"the vocabulary of {path}")
    return model.kind, score_model(runtime, args, model, tokens, tables, keep_rows)


def memory_writes_on(args: Hyperparameters, kind: str) -> bool:
    return args.eval_memory_writes and kind == "eam"


def score_model(runtime: Runtime, args: Hyperparameters, model: MemoryLM | TransformerLM,
                tokens: torch.Tensor, tables: ByteTables, keep_rows: bool = False
                ) -> dict[str, ScoreTotals]:
    """score_artifact's scoring of a fresh model (TTT and memory writes change it)."""
    ttt = TestTimeTraining(runtime, args, model) if args.ttt_steps else None
    writes = model if memory_writes_on(args, model.kind) else None
    totals = evaluate(runtime, args, student_scorer(model), tokens, tables,
                      model.config.key_dim if args.knn_lambda > 0 else None, keep_rows, ttt,
                      writes)
    if writes is not None:
        runtime.log(f"{MEMORY_WRITES_RECORD} pairs:{model.memory.pairs} "
                    f"runs:{len(model.memory.runs)}")
    if ttt is not None:
        runtime.log(f"{TTT_RECORD} ttt_time_ms:{ttt.time_ms:.0f} steps:{ttt.steps} "
                    f"params:{sum(p.numel() for p in ttt.params)} adapts:{args.ttt_params} "
                    f"lr_scale:{args.ttt_lr_scale}")
    return totals


def evaluate_artifact(runtime: Runtime, args: Hyperparameters, sha256: str,
                      teacher: GPT | None, shipped: MemoryLM | TransformerLM | None) -> None:
    """The submission's score, timed from reading the split; with TEACHER_REFERENCE, then the
    shipped model before packing (no kNN store) and the teacher (memory model only)."""
    started = time.perf_counter()
    tokens = load_validation_tokens(args)
    kind, results = score_artifact(runtime, args, Path(args.artifact_path), tokens, sha256=sha256)
    use_knn = "knn" in results
    time_ms = elapsed_ms(started)
    model_record, score_record = SCORE_RECORDS[kind]
    loss, bpb, count = results["model"].reduced(runtime)
    runtime.log(f"{model_record} val_loss:{loss:.8f} val_bpb:{bpb:.8f} tokens:{count}")
    loss, bpb, count = results["knn" if use_knn else "model"].reduced(runtime)
    runtime.log(f"{score_record} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time_ms:{time_ms:.0f}")
    log_stage(runtime, "eval", time_ms,
              f"tokens:{count} tokens_per_s:{count / (time_ms / 1000):.0f} knn:{int(use_knn)} "
              f"ttt_steps:{args.ttt_steps} "
              f"memory_writes:{int(memory_writes_on(args, kind))}")
    log_time_limit(runtime, EVAL_TIME_RECORD, started, args.max_wallclock_seconds)
    if teacher is None or not args.teacher_reference:
        return
    tables = build_byte_tables(args.tokenizer_path, teacher.config.vocab_size, "VOCAB_SIZE")
    references = {PREPACK_RECORD: lambda: score_model(
        runtime, dataclasses.replace(args, knn_lambda=0.0), copy.deepcopy(shipped), tokens,
        tables)}
    if kind == "eam":
        references[TEACHER_RECORD] = lambda: evaluate(runtime, args, teacher_scorer(teacher),
                                                      tokens, tables, None)
    for record, score in references.items():
        started = time.perf_counter()
        loss, bpb, count = score()["model"].reduced(runtime)
        runtime.log(f"{record} val_loss:{loss:.8f} val_bpb:{bpb:.8f} "
                    f"tokens:{count} eval_time_ms:{elapsed_ms(started):.0f}")


# -------------------------------------------------------------------------------------------------
# main: the table of contents
# -------------------------------------------------------------------------------------------------


def main() -> None:
    started = time.perf_counter() - process_age_s()  # the deadlines count the whole process
    args = Hyperparameters.from_env()                                  # 1. settings
    runtime, args = init_runtime(args)                                 # 2. runtime
    with failures_logged(runtime):
        log_header(runtime, args)
        check_inputs(runtime, args)                                    # 3. data, checked
        teacher, shipped, sha256 = None, None, ""
        if not args.eval_only:
            loader = DistributedTokenLoader(shard_paths(args.data_path, "train"), runtime,
                                            args.vocab_size)
            teacher = train_teacher(runtime, args, loader, started)    # 4. teacher
            if args.model == "transformer":                            # the built-in baseline
                shipped = TransformerLM.from_teacher(teacher, args)
            else:
                memories = write_memory(runtime, args, loader)                # 5. memory
                shipped = distill(runtime, args, teacher, memories, loader, started)  # 6. distill
            centre_keys(runtime, args, shipped, loader)
            sha256 = pack(runtime, args, shipped)                      # 7. packing
            log_time_limit(runtime, TRAIN_TIME_RECORD, started, args.max_wallclock_seconds)
            log_artifact_components(runtime, args)
        evaluate_artifact(runtime, args, sha256, teacher, shipped)     # 8. evaluation
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
        # gloo's threads can outlive the group and abort finalization (pytorch/pytorch PR
        # 179291): all is written, so leave without it (a failure never gets here).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
