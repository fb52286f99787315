import dataclasses

import pytest
import torch

import train_gpt
from tests.helpers import CPU, tiny_args, tiny_student, unit_byte_tables, write_artifact
from tools import _runs


@pytest.mark.parametrize("num_tokens, seq_len, stride", [
    (1000, 64, 16), (65, 64, 16), (30, 64, 16), (1000, 64, 64), (777, 100, 7), (2, 8, 4)])
def test_windows_score_every_target_exactly_once_with_full_context(num_tokens, seq_len, stride):
    windows = train_gpt.sliding_windows(num_tokens, seq_len, stride)
    scored = torch.cat([torch.arange(f, t) for _, f, t in windows.tolist()])
    assert torch.equal(scored, torch.arange(num_tokens - 1))
    starts, score_from, score_to = windows.T
    assert ((score_to - starts) <= seq_len).all() and (score_from >= starts).all()
    if num_tokens - 1 >= seq_len:
        assert ((score_from[1:] - starts[1:]) >= seq_len - stride).all()


@pytest.mark.parametrize("score_from, score_to, seq_len", [
    (0, 40, 16), (100, 140, 32), (5, 6, 8), (64, 128, 64), (3, 200, 7)])
def test_chunk_rows_train_on_each_scored_target_once_reading_nothing_later(score_from, score_to,
                                                                          seq_len):
    rows = train_gpt.chunk_rows(score_from, score_to, seq_len)
    trained = torch.cat([torch.arange(f, t) for _, f, t in rows.tolist()])
    assert torch.equal(trained, torch.arange(score_from, score_to))
    tokens = torch.arange(1000)  # each token is its own position
    inputs, mask, indices = train_gpt.window_batch(tokens, rows, torch.arange(seq_len),
                                                   score_to - 1)
    targets, previous = tokens[indices + 1], tokens[indices]
    # No input or target past token score_to (the target of score_to - 1, the last scored).
    assert inputs.max() < score_to and targets.max() == score_to
    assert torch.equal(targets, trained + 1) and torch.equal(previous, trained)


def run_eval(tokens: torch.Tensor, **overrides):
    """Per-target NLLs ('model', 'knn') of one evaluation, and its totals."""
    args, student = tiny_student(**overrides)
    student.eval().requires_grad_(False)
    ttt = train_gpt.TestTimeTraining(CPU, args, student) if args.ttt_steps else None
    writes = student if args.eval_memory_writes else None
    totals = train_gpt.evaluate(CPU, args, train_gpt.student_scorer(student), tokens,
                                unit_byte_tables(256), student.config.key_dim, keep_rows=True,
                                ttt=ttt, writes=writes)
    return {name: -torch.cat(total.rows).gather(1, tokens[1:, None]).squeeze(1)
            for name, total in totals.items()}, totals


def test_every_target_is_scored_once():
    tokens = torch.randint(0, 256, (257,))
    per_token, totals = run_eval(tokens)
    for name in ("model", "knn"):
        assert per_token[name].numel() == 256
        assert totals[name].reduced(CPU)[2] == 256


def test_lambda_zero_reproduces_the_memory_only_score():
    tokens = torch.randint(0, 256, (200,))
    per_token, _ = run_eval(tokens, knn_lambda=0.0)
    torch.testing.assert_close(per_token["knn"], per_token["model"], atol=1e-6, rtol=0)


def test_knn_helps_on_repeated_text():
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (100,)).repeat(4)
    per_token, _ = run_eval(tokens, knn_lambda=0.5)
    assert per_token["knn"][200:].mean() < per_token["model"][200:].mean()


@pytest.mark.parametrize("adapts", ["decoder", "all"])
def test_test_time_training_learns_repeated_text_once_it_is_scored(adapts):
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (64,)).repeat(4)
    settings = dict(knn_lambda=0.0, eval_chunk_tokens=64, ttt_params=adapts, ttt_lr_scale=1.0)
    before, _ = run_eval(tokens, **settings)
    after, _ = run_eval(tokens, **settings, ttt_steps=3)
    # The first chunk is scored before anything is learned; the repeats are then predicted better.
    first = train_gpt.sliding_windows(tokens.numel(), 32, 8)[7, 2]  # end of the first chunk
    torch.testing.assert_close(after["model"][:first], before["model"][:first], atol=0, rtol=0)
    assert after["model"][first:].mean() < before["model"][first:].mean() - 0.02


def test_memory_writes_learn_repeated_text_once_it_is_scored():
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (64,)).repeat(4)
    settings = dict(knn_lambda=0.0, eval_chunk_tokens=64)
    before, _ = run_eval(tokens, **settings)
    after, totals = run_eval(tokens, **settings, eval_memory_writes=True)
    first = train_gpt.sliding_windows(tokens.numel(), 32, 8)[7, 2]  # end of the first chunk
    torch.testing.assert_close(after["model"][:first], before["model"][:first], atol=0, rtol=0)
    assert after["model"][first:].mean() < before["model"][first:].mean() - 0.02


@pytest.mark.parametrize("min_length, learned", [(1, ""), (2, "4,6")])
def test_evaluation_counts_every_scored_target_into_the_memory_once(min_length, learned):
    """After a whole evaluation with EVAL_MEMORY_WRITES, the memory holds its artifact's counts
    plus exactly those of every (context, target) pair scored before the last chunk (which
    nothing reads after), at every length the model reads, learned ones too."""
    args, student = tiny_student(eval_memory_writes=True, eval_chunk_tokens=24,
                                 eam_context_min_length=min_length, eam_learned_lengths=learned)
    tokens = torch.randint(0, 8, (150,), generator=torch.Generator().manual_seed(3))
    shipped = student.contexts.pairs(args.vocab_size)
    train_gpt.evaluate(CPU, args, train_gpt.student_scorer(student), tokens,
                       unit_byte_tables(256), writes=student)
    windows = train_gpt.sliding_windows(tokens.numel(), args.eval_seq_len, args.eval_stride)
    last = windows.split(args.eval_chunk_tokens // args.eval_stride)[-1]
    counted = int(last[0, 1])  # the targets before the last chunk's
    recent = train_gpt.recent_tokens(tokens[None, :-1], student.recent_length)[0][:counted]
    expected = train_gpt.merge_pairs(shipped, train_gpt.count_context_pairs(
        recent, tokens[1: counted + 1], args.vocab_size, student.config.context_lengths))
    runs = student.memory.runs
    codes, counts = torch.cat([run[0] for run in runs]), torch.cat([run[1] for run in runs])
    order = codes.argsort()
    assert torch.equal(codes[order], expected[0]) and torch.equal(counts[order], expected[1])
    # The shipped tables themselves are left as they were.
    assert torch.equal(student.contexts.pairs(args.vocab_size)[1], shipped[1])


def test_an_evaluation_past_its_time_stops_learning_and_still_scores_every_target_once(capsys):
    """Projected past MAX_WALLCLOCK_SECONDS, the learners stop after the chunk that told: the
    next chunk reads what they learned, every later one the same, and every target is scored
    once."""
    tokens = torch.randint(0, 8, (200,), generator=torch.Generator().manual_seed(5))
    settings = dict(knn_lambda=0.5, eval_memory_writes=True, ttt_steps=1, ttt_lr_scale=1.0,
                    eval_chunk_tokens=32, eam_learned_lengths="4")
    full, _ = run_eval(tokens, **settings)
    capsys.readouterr()
    shed, totals = run_eval(tokens, **settings, max_wallclock_seconds=1e-6)
    record = _runs.parse_log(capsys.readouterr().out)[train_gpt.SHED_RECORD]
    assert record["after_chunk"] == "1" and int(record["chunks"]) > 3
    assert all(total.reduced(CPU)[2] == 199 for total in totals.values())
    second_end = int(train_gpt.sliding_windows(200, 32, 8).split(4)[1][-1, 2])
    for name in ("model", "knn"):
        torch.testing.assert_close(shed[name][:second_end], full[name][:second_end], atol=0,
                                   rtol=0)
        assert not torch.equal(shed[name][second_end:], full[name][second_end:])


def test_memory_writes_need_a_memory():
    with pytest.raises(ValueError, match="EVAL_MEMORY_WRITES=1 writes into the memory: "
                                         "MODEL='transformer' has none"):
        train_gpt.Hyperparameters.from_env({"MODEL": "transformer", "EVAL_MEMORY_WRITES": "1"})
    # The baseline's artifact, as EVAL_ONLY finds it: its scoring writes nothing.
    assert not train_gpt.memory_writes_on(tiny_args(eval_memory_writes=True), "transformer")


def test_test_time_training_changes_only_what_it_adapts():
    args, student = tiny_student(eval_chunk_tokens=32, ttt_steps=1, ttt_params="decoder,gate")
    student.eval().requires_grad_(False)
    before = {name: param.clone() for name, param in student.named_parameters()}
    ttt = train_gpt.TestTimeTraining(CPU, args, student)
    train_gpt.evaluate(CPU, args, train_gpt.student_scorer(student), torch.randint(0, 256, (120,)),
                       unit_byte_tables(256), ttt=ttt)
    changed = {name for name, param in student.named_parameters()
               if not torch.equal(param, before[name])}
    assert changed == {"decoder.fc.weight", "decoder.proj.weight", "gate.weight", "gate.bias"}
    assert ttt.steps == 2  # chunks of targets end at 56, 88 and 119; the last one teaches nothing


def test_ttt_params_must_name_parameters_of_the_model():
    args, student = tiny_student()
    with pytest.raises(ValueError, match=r"TTT_PARAMS='decoder,gpt.blocks': \['gpt.blocks'\] "
                                         r"names no parameter of the eam model.*'gate'"):
        train_gpt.adapted_parameters(student, "decoder,gpt.blocks")
    # Whole name parts: 'encoder.blocks.1' is one block, never also 'encoder.blocks.10'.
    names = train_gpt.adapted_parameters(student, "encoder.blocks.1")
    assert names and all(name.startswith("encoder.blocks.1.") for name in names)


def test_mixture_is_a_normalized_distribution():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(6, 50), dim=-1)
    sims = torch.rand(6, 4).sort(dim=1, descending=True).values
    sims[0] = -float("inf")  # no neighbours yet
    sims[1, 2:] = -float("inf")
    targets = torch.randint(0, 50, (6, 4))
    lam = train_gpt.knn_lambda(sims, 0.9)
    mixed = train_gpt.knn_mix(log_probs, sims, targets, 10.0, lam)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    assert lam[0] == 0 and (lam < 1).all()


@pytest.mark.parametrize("gate_logit", [-80.0, -5.0, 0.0, 3.0, 80.0])
def test_the_memory_mixture_is_normalized_for_any_gate(gate_logit):
    torch.manual_seed(0)
    logits = 5 * torch.randn(6, 40)
    p_mem = torch.softmax(3 * torch.randn(6, 40), dim=1)
    mixed = train_gpt.mix_with_memory(torch.log_softmax(logits, 1), p_mem,
                                      torch.full((6,), gate_logit))
    torch.testing.assert_close(mixed.exp().sum(1), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.log_softmax(mixed, 1), mixed, atol=1e-5, rtol=0)
    gate = torch.sigmoid(torch.tensor(gate_logit))
    expected = (1 - gate) * torch.softmax(logits, 1) + gate * p_mem
    torch.testing.assert_close(mixed.exp(), expected, atol=1e-6, rtol=1e-5)


def test_knn_store_finds_exact_neighbours_and_ignores_empty_slots():
    store = train_gpt.KnnStore(10, 4, torch.device("cpu"))
    keys = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    store.add(keys, torch.arange(6))
    sims, targets = store.search(keys[2:3], 3, chunk=4)
    assert targets[0, 0] == 2 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert (targets[0] < 6).all()


def test_knn_store_overwrites_the_oldest_entries_when_full():
    store = train_gpt.KnnStore(4, 2, torch.device("cpu"))
    store.add(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    store.add(torch.ones(3, 2), torch.tensor([3, 4, 5]))
    assert store.size == 4 and sorted(store.targets.tolist()) == [2, 3, 4, 5]


def test_eval_arguments_are_validated():
    with pytest.raises(ValueError, match="EVAL_STRIDE"):
        tiny_args(eval_stride=64, eval_seq_len=32)


def artifact_and_settings(tmp_path, demo_data, **overrides):
    """A tiny artifact of the demo tokenizer's vocabulary, and evaluation settings for it."""
    args, student = tiny_student(vocab_size=1024, **overrides)
    path = write_artifact(tmp_path / "model.eam", args, student)
    settings = tiny_args(data_path=str(demo_data), val_tokens=300,
                         tokenizer_path=str(demo_data / "tokenizer.model"))
    return path, settings


def test_evaluation_takes_the_dimensions_from_the_artifact(tmp_path, demo_data, capsys):
    path, settings = artifact_and_settings(tmp_path, demo_data, knn_key_dim=12)
    # The environment's KNN_KEY_DIM and VOCAB_SIZE say other things: the artifact decides.
    other = dataclasses.replace(settings, knn_key_dim=32, vocab_size=64, artifact_path=str(path),
                                knn_lambda=0.5)
    train_gpt.evaluate_artifact(CPU, other, sha256="", teacher=None, shipped=None)
    records = _runs.parse_log(capsys.readouterr().out)
    assert float(records[train_gpt.SCORE_RECORD]["val_bpb"]) > 0
    assert records[train_gpt.stage_record("eval")]["tokens"] == "299"


def test_an_artifact_of_another_vocabulary_is_not_scored(tmp_path, demo_data):
    _, settings = artifact_and_settings(tmp_path, demo_data)
    args, student = tiny_student()  # vocabulary 256, the tokenizer has 1024 pieces
    path = write_artifact(tmp_path / "other_vocabulary.eam", args, student)
    with pytest.raises(ValueError, match="other_vocabulary.eam: a vocabulary of 256 tokens.*1024"):
        train_gpt.evaluate_artifact(CPU, dataclasses.replace(settings, artifact_path=str(path)),
                                    sha256="", teacher=None, shipped=None)


def test_the_references_score_the_shipped_model_before_packing_on_a_copy(tmp_path, demo_data,
                                                                          capsys):
    """TEACHER_REFERENCE adds the teacher's line and the unpacked model's; TTT and memory writes
    adapt a copy of it, never the model in hand (which could be packed or scored again)."""
    args, student = tiny_student(vocab_size=1024)
    path = write_artifact(tmp_path / "model.eam", args, student.eval().requires_grad_(False))
    settings = tiny_args(data_path=str(demo_data), val_tokens=300, artifact_path=str(path),
                         tokenizer_path=str(demo_data / "tokenizer.model"),
                         teacher_reference=True, ttt_steps=1, eval_memory_writes=True)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    teacher = train_gpt.GPT(student.config.encoder).eval().requires_grad_(False)
    train_gpt.evaluate_artifact(CPU, settings, sha256="", teacher=teacher, shipped=student)
    records = _runs.parse_log(capsys.readouterr().out)
    for record in (train_gpt.PREPACK_RECORD, train_gpt.TEACHER_RECORD):
        assert records[record]["tokens"] == "299"
    # int6 rows move the scores, but not far (a broken packing would).
    packed = float(records[train_gpt.MEMORY_RECORD]["val_bpb"])
    assert abs(float(records[train_gpt.PREPACK_RECORD]["val_bpb"]) - packed) < 0.05
    assert student.memory.pairs == student.context_counts.numel()  # counted nothing
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_the_knn_keys_are_centred_on_the_features_mean_over_training_text(tmp_path):
    """Uncentred, a model's features share one direction and every key is close to every other;
    centre_keys subtracts their mean over the next training batch, and the keys spread."""
    args, student = tiny_student(train_seq_len=32, train_batch_tokens=256, grad_accum_world=1)
    batch = torch.randint(0, 8, (8, 32), generator=torch.Generator().manual_seed(6))

    class OneBatch:
        def next_batch(self, rank_tokens, seq_len):
            return batch, batch

    with torch.no_grad():
        features = student.features(batch).flatten(0, 1)
        before = student.query(features)
        train_gpt.centre_keys(CPU, args, student, OneBatch())
        after = student.query(features)
    torch.testing.assert_close(student.keys.centre, features.mean(0))
    spread = [(keys @ keys.T).mean().item() for keys in (before, after)]
    assert spread[1] < spread[0] and abs(spread[1]) < 0.1
    # The centre ships in the artifact (a vector, fp16) and the loaded model's keys are the same.
    path = write_artifact(tmp_path / "centred.eam", args, student)
    loaded = train_gpt.load_artifact(path, CPU.device)
    torch.testing.assert_close(loaded.keys.centre, student.keys.centre, atol=1e-3, rtol=1e-3)
