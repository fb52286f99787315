"""What must not lose a run on 8 GPUs, shown on CPU: a compiled graph that fails, ranks whose
clocks disagree near a deadline, a packing slower than its estimate."""

import datetime
import math
import time

import torch

import train_gpt
from tests.helpers import CPU, TINY_RUN, tiny_args, tiny_student
from tools import _runs


class Failing(torch.nn.Module):
    """A 'compiled' model whose graph fails to build, as a backend's error would."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        raise RuntimeError("the backend could not build this graph")


class Compiled(torch.nn.Module):
    """A 'compiled' model that works: the eager one behind another object."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class RandomBatches:
    def __init__(self, vocab: int, seed: int):
        self.vocab, self.generator = vocab, torch.Generator().manual_seed(seed)

    def next_batch(self, rank_tokens: int, seq_len: int):
        tokens = torch.randint(0, self.vocab, (rank_tokens + 1,), generator=self.generator)
        return tokens[:-1].view(-1, seq_len), tokens[1:].view(-1, seq_len)


def train_a_few_steps(runtime, steps: int = 3, stop_in: float = math.inf, seed: int = 0):
    args = tiny_args(compile=True, train_seq_len=16, grad_accum_world=1, warmup_steps=1,
                     train_log_every=1000)
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.settings_view(train_gpt.GPTConfig, args))
    phase = train_gpt.Phase("teacher", lambda m, x, y: m(x, y),
                            batch_tokens=64 * runtime.world_size, seq_len=16,
                            stop_at=time.perf_counter() + stop_in, max_steps=steps)
    stats = train_gpt.run_training(runtime, args, model, phase, RandomBatches(64, seed))
    return model, stats


def test_a_graph_that_fails_to_build_trains_the_phase_eager(monkeypatch, capsys):
    monkeypatch.setattr(train_gpt, "maybe_compile", lambda module, args, runtime: Failing(module))
    model, stats = train_a_few_steps(CPU)
    record = _runs.parse_log(capsys.readouterr().out)[train_gpt.COMPILE_RECORD]
    assert record == {"phase": "teacher", "mode": "eager", "reason": "RuntimeError"}
    assert stats["steps"] == 3 and math.isfinite(stats["loss"])
    # A graph that builds is used, and its probe's gradients are dropped: the same training.
    monkeypatch.setattr(train_gpt, "maybe_compile", lambda module, args, runtime: Compiled(module))
    again, _ = train_a_few_steps(CPU)
    assert _runs.parse_log(capsys.readouterr().out)[train_gpt.COMPILE_RECORD]["mode"] == (
        "compiled")
    for mine, theirs in zip(model.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def on_ranks(function, world: int, folder, *args) -> None:
    """function(runtime, folder, *args) on `world` gloo ranks (forked), failing on a hang."""
    def rank_main(rank: int) -> None:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60))
        runtime = train_gpt.Runtime(rank, world, 0, torch.device("cpu"), None)
        function(runtime, folder, *args)
        torch.distributed.destroy_process_group()

    torch.multiprocessing.start_processes(rank_main, nprocs=world, start_method="fork")


def compile_fails_on_rank_one(runtime, folder) -> None:
    wrap = Failing if runtime.rank == 1 else Compiled
    train_gpt.maybe_compile = lambda module, args, rt: wrap(module)
    model, stats = train_a_few_steps(runtime, seed=runtime.rank)
    digest = train_gpt.assert_replicas_identical(runtime, "model", list(model.parameters()))
    torch.save((stats["steps"], digest), f"{folder}/rank{runtime.rank}.pt")


def test_a_graph_that_fails_on_one_rank_trains_every_rank_eager_without_a_hang(tmp_path):
    on_ranks(compile_fails_on_rank_one, 2, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0] == results[1] and results[0][0] == 3


def skewed_clocks(runtime, folder) -> None:
    """Each rank's clock advances by its own step at every reading (rank 1's 500 times rank
    0's): rank 1 alone would stop training and shed the evaluation's learners at once, rank 0
    much later. The stop, the shedding and the fit before distillation are decided for all
    ranks: a rank deciding alone would leave the other in a collective, until the timeout."""
    clock, step = [0.0], 0.001 if runtime.rank == 0 else 0.5
    train_gpt.time.perf_counter = lambda: clock.__setitem__(0, clock[0] + step) or clock[0]
    _, stats = train_a_few_steps(runtime, steps=0, stop_in=4.0, seed=runtime.rank)
    args, student = tiny_student_for(runtime)
    reserve_s = train_gpt.fit_memories(runtime, args, student)
    tokens = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    totals = train_gpt.score_model(runtime, args, student, tokens,
                                   train_gpt.ByteTables(torch.ones(256, dtype=torch.int32),
                                                        torch.zeros(256, dtype=torch.bool),
                                                        torch.zeros(256, dtype=torch.bool)))
    torch.save((stats["steps"], reserve_s, student.context_counts.numel(),
                totals["model"].reduced(runtime)), f"{folder}/rank{runtime.rank}.pt")


def tiny_student_for(runtime):
    # A limit that makes the fit cut pairs, and an evaluation whose time passes its limit (on
    # rank 1's clock) at once, with TTT and memory writes to shed.
    args, student = tiny_student(eval_memory_writes=True, ttt_steps=1, eval_chunk_tokens=16,
                                 max_wallclock_seconds=20.0)
    full = len(train_gpt.build_artifact(student, args))
    limit = train_gpt.code_size(args) + full - 500
    return train_gpt.dataclasses.replace(args, size_limit=limit), student


def test_ranks_whose_clocks_disagree_near_a_deadline_decide_together(tmp_path):
    on_ranks(skewed_clocks, 2, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0] == results[1]
    assert 0 < results[0][0] < 10  # rank 1's clock stopped both


def test_a_packing_slower_than_its_estimate_still_ends_training_inside_the_limit(
        monkeypatch, tmp_path, demo_data):
    """Packing here takes twice what the fit before distillation measured for a packing (the
    estimate the reserve is made from): training still ends inside MAX_WALLCLOCK_SECONDS."""
    real_compress, real_pack = train_gpt.compress, train_gpt.pack

    def slow_compress(payload: bytes, level: int) -> bytes:
        started = time.perf_counter()
        packed = real_compress(payload, level)
        time.sleep(time.perf_counter() - started)  # twice as long as it took
        return packed

    def slow_pack(*args, **kwargs):
        monkeypatch.setattr(train_gpt, "compress", slow_compress)
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(train_gpt, "pack", slow_pack)
    monkeypatch.setattr(train_gpt, "process_age_s", lambda: 0.0)  # this process is pytest's
    monkeypatch.chdir(tmp_path)
    environ = {**TINY_RUN, "DATA_PATH": str(demo_data),
               "TOKENIZER_PATH": str(demo_data / "tokenizer.model"), "RUN_ID": "slow_pack",
               "MAX_WALLCLOCK_SECONDS": "8", "ITERATIONS": "0", "DISTILL_ITERATIONS": "0",
               "EAM_CONTEXT_TOKENS": "131072"}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    train_gpt.main()
    records = _runs.parse_log((tmp_path / "logs" / "slow_pack.txt").read_text())
    train_time = records[train_gpt.TRAIN_TIME_RECORD]
    assert train_time["within_limit"] == "1", train_time
    assert int(records[train_gpt.stage_record("pack")]["time_ms"]) > 0
