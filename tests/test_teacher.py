import math
import time

import pytest
import torch

import train_gpt
from tests.helpers import CPU, random_contexts, tiny_args, tiny_student


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
    assert "key_head.weight" in groups["matrix"] and "decoder.fc.weight" in groups["matrix"]
    # The gate's weights are vectors (Adam, fp16 when packed), beside the attention's gains.
    assert {"gate.weight", "gate.bias"} <= set(groups["vector"])
    assert all(name.endswith("qk_gain") or name.startswith("gate.") for name in groups["vector"])
    optimizers = train_gpt.build_optimizers(student, tiny_args())
    in_adam = {id(p) for group in optimizers["adam"].param_groups for p in group["params"]}
    in_muon = {id(p) for group in optimizers["muon"].param_groups for p in group["params"]}
    assert not in_adam & in_muon
    assert in_adam | in_muon == {id(p) for p in student.parameters()}


def test_each_distillation_phase_uses_every_parameter_it_trains():
    """What lets DDP run without find_unused_parameters: the key phase freezes the decoder side
    (decoder and gate) and uses all the rest; the LM phase uses everything."""
    _, student = tiny_student()
    idx = torch.randint(0, 256, (2, 16))
    read_side = {id(p) for m in (student.decoder, student.gate)
                 for p in m.parameters()}
    for keys_only in (True, False):
        student.zero_grad(set_to_none=True)
        queries, scores, logits = student(idx, keys_only=keys_only)
        (queries.sum() + (0 if scores is None else scores.sum() + logits.sum())).backward()
        used = {id(p) for p in student.parameters() if p.grad is not None}
        expected = {id(p) for p in student.parameters()}
        assert used == (expected - read_side if keys_only else expected)


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
    """A loader of uniformly random tokens, in DistributedTokenLoader's shapes."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.first_target_index = 0

    def next_batch(self, rank_tokens: int, seq_len: int):
        tokens = torch.randint(0, self.vocab_size, (rank_tokens + 1,))
        return tokens[:-1].view(-1, seq_len), tokens[1:].view(-1, seq_len)


def teacher_and_memory(args):
    """A random teacher and a next-token memory placed on random keys and written from them."""
    torch.manual_seed(0)
    teacher = train_gpt.GPT(gpt_config(args))
    memory = train_gpt.ElasticMemory(train_gpt.memory_write_config(args), args.vocab_size,
                                     CPU.device)
    keys = torch.nn.functional.normalize(torch.randn(256, args.eam_key_dim), dim=1)
    memory.place(keys)
    memory.accumulate(keys, torch.randint(0, args.vocab_size, (256,)))
    return teacher, (memory, random_contexts(args), train_gpt.CountedText(0, 0, 1))


def test_key_distance_is_one_minus_the_mean_cosine():
    torch.manual_seed(0)
    queries, keys = (torch.nn.functional.normalize(torch.randn(9, 8), dim=1) for _ in range(2))
    cosine = torch.nn.functional.cosine_similarity(queries, keys, dim=1).mean()
    assert train_gpt.key_distance(queries, keys).item() == pytest.approx(1 - cosine.item())
    assert train_gpt.key_distance(keys, keys).item() == pytest.approx(0, abs=1e-6)
    assert train_gpt.key_distance(-keys, keys).item() == pytest.approx(2)


@pytest.mark.parametrize("enc_layers", [1, 2])
def test_an_encoder_with_all_the_teachers_layers_starts_with_its_keys(enc_layers):
    """Why the CPU profiles give the key phase no share: an encoder initialised from every
    teacher layer queries exactly the teacher's keys, so the key loss starts at its minimum;
    with fewer layers it starts above it, and the phase has something to learn."""
    args = tiny_args(num_layers=2, enc_layers=enc_layers, xsa_layers=2)
    teacher, memories = teacher_and_memory(args)
    with torch.no_grad():  # a fresh block adds nothing (zero-initialised projections)
        for parameter in teacher.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    student = train_gpt.init_student(args, teacher, memories[0].tables(), memories[1])
    x = torch.randint(0, args.vocab_size, (2, 16))
    projection = train_gpt.key_projection(args.model_dim, args.eam_key_dim, args.seed)
    keys, _ = train_gpt.teacher_keys_values(teacher, x, projection, CPU)
    with torch.no_grad():
        distance = train_gpt.key_distance(student(x, keys_only=True)[0], keys).item()
    if enc_layers == args.num_layers:
        assert distance == pytest.approx(0, abs=1e-5)
    else:
        assert distance > 1e-3


def test_the_key_weight_holds_the_key_head_near_the_teachers_keys(capsys):
    """The encoder starts as the teacher's copy (key drift ~0); end-to-end steps move the key
    head away, less so with DISTILL_KEY_WEIGHT (the drift that stage:distill logs)."""
    drift = {}
    for weight in (0.0, 10.0):
        args = tiny_args(distill_key_frac=0.0, distill_iterations=12,
                         distill_key_weight=weight, train_seq_len=32, distill_batch_tokens=512,
                         grad_accum_world=1, max_wallclock_seconds=1e5, train_log_every=1000)
        teacher, memories = teacher_and_memory(args)
        train_gpt.distill(CPU, args, teacher, memories, RandomTokens(args.vocab_size),
                          run_started=time.perf_counter())
        line = capsys.readouterr().out.splitlines()[-1]
        drift[weight] = float(train_gpt.parse_log(line)[train_gpt.stage_record("distill")][
            "key_drift"])
    assert 0 <= drift[10.0] < 0.5 * drift[0.0], drift


@pytest.mark.parametrize("counted, share", [((0, 4096), 1.0), ((10**5, 10**5 + 4096), 0.0)])
def test_distillation_leaves_out_what_it_reads_of_the_counted_text(capsys, counted, share):
    """left_out_share: the share of the targets read that the context memory counted. The loader
    reads stream indices [0, 512) each step: inside the counted text all of them, beyond it
    none."""
    args = tiny_args(distill_key_frac=0.0, distill_iterations=2, train_seq_len=32,
                     distill_batch_tokens=512, grad_accum_world=1, max_wallclock_seconds=1e5)
    teacher, (memory, contexts, _) = teacher_and_memory(args)
    memories = (memory, contexts, train_gpt.CountedText(*counted, 10**6))
    train_gpt.distill(CPU, args, teacher, memories, RandomTokens(args.vocab_size),
                      run_started=time.perf_counter())
    line = capsys.readouterr().out.splitlines()[-1]
    record = train_gpt.parse_log(line)[train_gpt.stage_record("distill")]
    assert float(record["left_out_share"]) == share


def test_the_short_key_phase_runs_eager_and_the_end_to_end_phase_compiled(monkeypatch):
    """On one H100 the key phase's compiled graph took its whole share of time to build (README,
    "Measured on one H100"), so distill asks for compilation only in the long phase."""
    args = tiny_args()
    teacher, memories = teacher_and_memory(args)
    phases = []

    def record(runtime, args, model, phase, loader):
        phases.append((phase.name, phase.compiled))
        return dict(steps=0, loss=0.0, time_s=0.0, tokens=0, step_ms=0.0)

    monkeypatch.setattr(train_gpt, "run_training", record)
    train_gpt.distill(CPU, args, teacher, memories, RandomTokens(args.vocab_size),
                      run_started=time.perf_counter())
    assert phases == [(train_gpt.KEY_PHASE, False), (train_gpt.LM_PHASE, True)]


@pytest.mark.parametrize("fit_s, stop_after", [(1.0, 950.0), (100.0, 800.0)])
def test_distillation_leaves_packing_twice_the_time_the_fit_took(monkeypatch, fit_s,
                                                                  stop_after):
    """The end-to-end phase ends at the stages' share of the budget less the reserve (950 s of
    1,000), or earlier where packing's fit, which repeats the one before distillation, would
    not fit in the reserve: 1,000 s less twice the fit's seconds."""
    args = tiny_args(max_wallclock_seconds=1000.0, train_reserve_frac=0.05)
    teacher, memories = teacher_and_memory(args)
    stops = {}

    def record(runtime, args, model, phase, loader):
        stops[phase.name] = phase.stop_at
        return dict(steps=0, loss=0.0, time_s=0.0, tokens=0, step_ms=0.0)

    monkeypatch.setattr(train_gpt, "fit_memories", lambda runtime, args, student: fit_s)
    monkeypatch.setattr(train_gpt, "run_training", record)
    started = time.perf_counter()
    train_gpt.distill(CPU, args, teacher, memories, RandomTokens(args.vocab_size), started)
    assert stops[train_gpt.LM_PHASE] - started == pytest.approx(stop_after)
