import math
import time
import types

import numpy as np
import pytest
import torch

import train_gpt
from tests.helpers import CPU, random_contexts, tiny_args, tiny_student
from tools import _runs


def gpt_config(args, num_layers: int = 2) -> train_gpt.GPTConfig:
    return train_gpt.settings_view(train_gpt.GPTConfig, args, num_layers=num_layers)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (96, 96)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    singular = torch.linalg.svdvals(train_gpt.newton_schulz(torch.randn(shape)))
    assert singular.min() > 0.5 and singular.max() < 1.35


def test_exclusive_self_attention_matches_direct_computation():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = train_gpt.exclusive_self_attention(y, v)
    for b in range(2):
        for t in range(5):
            for h in range(4):
                own = v[b, t, h // 2] / v[b, t, h // 2].norm()
                expected = y[b, t, h] - (y[b, t, h] @ own) * own
                torch.testing.assert_close(out[b, t, h], expected, atol=1e-5, rtol=1e-5)
                assert abs(out[b, t, h] @ own) < 1e-4


def test_qk_gain_starts_at_its_setting_and_learns():
    model = train_gpt.GPT(gpt_config(tiny_args(qk_gain_init=4.5)))
    gain = model.blocks[0].attn.qk_gain
    assert torch.equal(gain, torch.full_like(gain, 4.5)) and gain.requires_grad


def test_ema_ramps_in_then_tracks_with_its_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = train_gpt.EMA(model, decay=0.997)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    ema.updates = 10**6
    assert ema.current_decay() == pytest.approx(0.997)


def test_lr_multiplier_warms_up_and_down():
    assert train_gpt.lr_multiplier(0, 0.0, 10, 0.5) == pytest.approx(0.1)
    assert train_gpt.lr_multiplier(50, 0.25, 10, 0.5) == 1.0
    assert train_gpt.lr_multiplier(50, 0.75, 10, 0.5) == pytest.approx(0.5)
    assert train_gpt.lr_multiplier(50, 1.0, 10, 0.5) == 0.0


def test_compile_falls_back_to_eager_on_cpu():
    module = torch.nn.Linear(2, 2)
    assert train_gpt.maybe_compile(module, tiny_args(compile=True), CPU) is module


def test_parameter_groups_follow_what_a_parameter_is():
    _, student = tiny_student()
    groups = train_gpt.parameter_groups(student)
    assert groups["table"] == ["encoder.embed.weight"]
    # By what a parameter is, never its name: any nn.Embedding's weight is a token table.
    modules = torch.nn.ModuleDict(dict(rows=torch.nn.Embedding(8, 4), mix=torch.nn.Linear(4, 4)))
    assert train_gpt.parameter_groups(modules) == {
        "table": ["rows.weight"], "matrix": ["mix.weight"], "vector": ["mix.bias"]}
    assert "decoder.fc.weight" in groups["matrix"]
    # The gate's weights are vectors (Adam, fp16 when packed), beside the attention's gains.
    assert {"gate.weight", "gate.bias"} <= set(groups["vector"])
    assert all(name.endswith("qk_gain") or name.startswith("gate.") for name in groups["vector"])
    optimizers = train_gpt.build_optimizers(student, tiny_args())
    in_adam = {id(p) for group in optimizers["adam"].param_groups for p in group["params"]}
    in_muon = {id(p) for group in optimizers["muon"].param_groups for p in group["params"]}
    assert not in_adam & in_muon
    assert in_adam | in_muon == {id(p) for p in student.parameters()}


def test_teacher_loss_falls_on_demo_data(demo_data):
    args = tiny_args(vocab_size=1024, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=16,
                     train_seq_len=64, train_batch_tokens=1024, grad_accum_world=1,
                     warmup_steps=2, warmdown_frac=0.2, train_log_every=1000)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(str(demo_data), "train"), CPU)
    torch.manual_seed(0)
    model = train_gpt.GPT(gpt_config(args))
    x, y = loader.next_batch(4096, 64)
    with torch.no_grad():
        before = model(x, y).item()
    phase = train_gpt.Phase("teacher", lambda m, a, b: m(a, b), batch_tokens=1024, seq_len=64,
                            stop_at=math.inf, max_steps=40)
    train_gpt.run_training(CPU, args, model, phase, loader)
    with torch.no_grad():
        after = model(x, y).item()
    assert after < before - 1.0, (before, after)


class RandomTokens:
    """A loader of uniformly random tokens, in DistributedTokenLoader's shapes, whose every batch
    is said to start at stream index 0 (first_target_index) of a corpus of corpus_tokens."""

    def __init__(self, vocab_size: int, corpus_tokens: int = 10**6):
        self.vocab_size = vocab_size
        self.first_target_index = 0
        self.stream = types.SimpleNamespace(taken=0, corpus_tokens=corpus_tokens,
                                            tail=np.zeros(0, dtype=np.int64))
        self.last_read = None

    def next_batch(self, rank_tokens: int, seq_len: int):
        tokens = torch.randint(0, self.vocab_size, (rank_tokens + 1,))
        self.last_read = (self.stream.tail, tokens.numpy(), self.stream.taken)
        self.stream.taken += tokens.numel()
        self.stream.tail = tokens.numpy()[-train_gpt.STREAM_TAIL_TOKENS:]
        return tokens[:-1].view(-1, seq_len), tokens[1:].view(-1, seq_len)


def teacher_and_contexts(args, counted=(0, 0)):
    """A random teacher, a context memory of random text and the text it counted."""
    torch.manual_seed(0)
    return (train_gpt.GPT(gpt_config(args)),
            (random_contexts(args), train_gpt.CountedText(*counted, 10**6)))


def test_the_distillation_step_uses_every_parameter_it_trains():
    """What lets DDP run without find_unused_parameters."""
    _, student = tiny_student()
    student.zero_grad(set_to_none=True)
    scores, model_log_probs = student(torch.randint(0, 256, (2, 16)))
    (scores.sum() + model_log_probs.sum()).backward()
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("counted, share", [((0, 4096), 1.0), ((10**5, 10**5 + 4096), 0.0)])
def test_distillation_leaves_out_what_it_reads_of_the_counted_text(capsys, counted, share):
    """left_out_share: the share of the targets read that the context memory counted. The loader
    reads stream indices [0, 512) each step: inside the counted text all of them, beyond it
    none."""
    args = tiny_args(distill_iterations=2, train_seq_len=32, distill_batch_tokens=512,
                     grad_accum_world=1, max_wallclock_seconds=1e5)
    teacher, memories = teacher_and_contexts(args, counted)
    train_gpt.distill(CPU, args, teacher, memories, RandomTokens(args.vocab_size),
                      run_started=time.perf_counter())
    line = capsys.readouterr().out.splitlines()[-1]
    record = _runs.parse_log(line)[train_gpt.stage_record("distill")]
    assert float(record["left_out_share"]) == share


def test_distillation_reads_a_memory_that_counted_the_text_before_each_batch_and_not_its_own(
        monkeypatch):
    """The evaluation's memory holds the scored text; distillation's holds the shipped counts
    and the text it trained on before the batch it reads (not the batch itself), counted at
    every length, learned ones too, and starts afresh before its history would pass
    DISTILL_HISTORY_TOKENS (here three batches)."""
    args = tiny_args(distill_iterations=6, train_seq_len=32, distill_batch_tokens=256,
                     grad_accum_world=1, max_wallclock_seconds=1e5, eam_context_order=3,
                     eam_learned_lengths="4,6", distill_history_tokens=3 * 257)
    teacher, memories = teacher_and_contexts(args)
    loader = RandomTokens(args.vocab_size)
    batches, held, memories_seen = [], [], set()
    real = train_gpt.MemoryLM.head

    def head(model, features, recent, leave_out=None):
        batches.append(loader.last_read)
        memories_seen.add(id(model.memory))
        runs = model.memory.runs
        codes, counts = torch.cat([run[0] for run in runs]), torch.cat([run[1] for run in runs])
        held.append((codes.sort().values, counts[codes.argsort()]))
        return real(model, features, recent, leave_out)

    monkeypatch.setattr(train_gpt.MemoryLM, "head", head)
    student = train_gpt.distill(CPU, args, teacher, memories, loader, time.perf_counter())
    lengths = student.config.context_lengths
    assert lengths == (0, 2, 4, 6) and len(batches) == 6
    shipped = memories[0].pairs(args.vocab_size)
    for step, first in enumerate([0, 0, 0, 0, 3, 3]):  # afresh before the fourth batch's count
        parts = [shipped]
        if step > first:
            tail = batches[first][0][-6:]
            text = np.concatenate([np.full(6 - tail.size, -1), tail,
                                   *(batches[k][1] for k in range(first, step))])
            text = torch.from_numpy(text.astype(np.int64))
            recent = train_gpt.recent_tokens(text[None, :-1], 6)[0, 5:]
            parts.append(train_gpt.count_context_pairs(recent, text[6:], args.vocab_size,
                                                       lengths))
        expected = train_gpt.merge_pairs(*parts)
        assert torch.equal(held[step][0], expected[0]) and torch.equal(held[step][1],
                                                                         expected[1]), step
    # What distillation counted is not part of the model it returns; its memory was one object
    # throughout, started afresh in place (a compiled graph that holds it stays valid).
    assert student.memory.pairs == memories[0].counts.numel()
    assert memories_seen == {id(student.memory)}


@pytest.mark.parametrize("build_s, stop_after", [(1.0, 950.0), (50.0, 800.0)])
def test_distillation_leaves_packing_two_packings_at_twice_the_time_of_the_fits(
        monkeypatch, build_s, stop_after):
    """Distillation ends at the stages' share of the budget less the reserve (950 s of 1,000), or
    earlier where packing, two packings at most, each taking up to twice the time one took in
    the fit before distillation, would not fit in the reserve: 1,000 s less 4 x 50 s."""
    args = tiny_args(max_wallclock_seconds=1000.0, train_reserve_frac=0.05)
    teacher, memories = teacher_and_contexts(args)
    stops = {}

    def record(runtime, args, model, phase, loader):
        stops[phase.name] = phase.stop_at
        return dict(steps=0, loss=0.0, time_s=0.0, tokens=0, step_ms=0.0)

    monkeypatch.setattr(train_gpt, "fit_memories", lambda runtime, args, student: build_s)
    monkeypatch.setattr(train_gpt, "run_training", record)
    started = time.perf_counter()
    train_gpt.distill(CPU, args, teacher, memories, RandomTokens(args.vocab_size), started)
    assert stops[train_gpt.DISTILL_PHASE] - started == pytest.approx(stop_after)
