"""Packing: quantization, the artifact's round trip and header, size accounting and fitting."""

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest
import torch
import zstandard

import train_gpt
from tests.helpers import CPU, REPO, tiny_args, tiny_student, write_artifact


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_quantization_error_is_within_half_a_step(bits):
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]
    codes, scale = train_gpt.quantize_rows(weight, bits)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1
    error = (train_gpt.dequantize_rows(codes, scale) - weight).abs()
    # Half a quantization step, plus the fp16 rounding of the scale itself.
    bound = scale.float()[:, None] * (0.5 + 2 ** (bits - 1) * 1e-3)
    assert (error <= bound).all()


def round_trip(model, args, path):
    return train_gpt.load_artifact(write_artifact(path, args, model), torch.device("cpu"))


def scores(model, tokens):
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        return train_gpt.student_scorer(model.eval())(tokens, mask)[0]


# Options that change what is packed: the memory's lengths (the gate's inputs), no memory.
@pytest.mark.parametrize("options", [{}, dict(eam_learned_lengths="4,8"),
                                     dict(eam_context_order=0)])
def test_round_trip_is_the_model_up_to_quantization_and_packing_it_again_changes_nothing(
        tmp_path, options):
    args, student = tiny_student(**options)
    rebuilt = round_trip(student, args, tmp_path / "once.eam")
    assert rebuilt.config == student.config
    original, got = student.state_dict(), rebuilt.state_dict()
    assert got.keys() == original.keys()
    for name, value in original.items():
        if name in train_gpt.MEMORY_BUFFERS:  # exactly
            assert torch.equal(got[name], value), name
            continue
        if value.ndim == 2:  # at worst QUANT_BITS rows: half a step of max|row| / levels
            levels = 2 ** (args.quant_bits - 1) - 1
            bound = value.abs().amax(1, keepdim=True) / (2 * levels) * 1.01 + 1e-6
        else:  # fp16
            bound = value.abs() * 2**-10 + 1e-6
        assert ((got[name] - value).abs() <= bound).all(), name
    # A packed model is on the quantization grid: a second round trip is exact.
    again = round_trip(rebuilt, args, tmp_path / "twice.eam")
    for name, value in got.items():
        torch.testing.assert_close(again.state_dict()[name], value, atol=1e-6, rtol=0)
    tokens = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(scores(again, tokens), scores(rebuilt, tokens), atol=1e-5, rtol=0)
    assert (scores(rebuilt, tokens) - scores(student, tokens)).abs().max() < 0.5


def test_the_loaded_model_needs_no_settings(tmp_path, monkeypatch):
    args, student = tiny_student()
    path = write_artifact(tmp_path / "model.eam", args, student)

    def no_settings(*_, **__):
        raise AssertionError("load_artifact built a Hyperparameters")

    monkeypatch.setattr(train_gpt, "Hyperparameters", no_settings)
    model = train_gpt.load_artifact(path, torch.device("cpu"))
    assert not any(hasattr(module, "args") for module in model.modules())
    assert model.config == student.config


def test_encoder_as_deep_as_the_teacher_packs_and_loads(tmp_path):
    """ENC_LAYERS = NUM_LAYERS = 12, once refused at loading by a rebuilt settings object."""
    args, student = tiny_student(num_layers=12, enc_layers=12)
    rebuilt = round_trip(student, args, tmp_path / "deep.eam")
    assert rebuilt.config.encoder.num_layers == len(rebuilt.encoder.blocks) == 12


def rewrite_header(raw: bytes, change) -> bytes:
    """The artifact with its header's JSON changed by `change(header)`, checksum renewed."""
    payload = zstandard.ZstdDecompressor().decompress(raw[train_gpt.ARTIFACT_PREFIX.size:])
    (length,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4: 4 + length])
    change(header)
    encoded = json.dumps(header).encode()
    blob = zstandard.ZstdCompressor().compress(
        struct.pack("<I", len(encoded)) + encoded + payload[4 + length:])
    return train_gpt.ARTIFACT_PREFIX.pack(train_gpt.ARTIFACT_MAGIC, train_gpt.ARTIFACT_VERSION,
                                          hashlib.sha256(blob).digest()) + blob


@pytest.mark.parametrize("change, message", [
    (lambda h: h["model"].pop("dec_hidden"), r"missing keys \['dec_hidden'\]"),
    (lambda h: h["model"]["encoder"].pop("rope_base"), r"\(encoder\).*missing keys"),
    (lambda h: h["model"].update(mystery=1), r"unknown keys \['mystery'\]"),
    (lambda h: h["model"].update(key_dim="4"), r"StudentConfig.key_dim='4' is not of type int"),
    (lambda h: h["model"].update(key_dim=4.0), r"StudentConfig.key_dim=4.0 is not of type int"),
    (lambda h: h["model"]["encoder"].update(ln_scale=1), "ln_scale=1 is not of type bool"),
    (lambda h: h["model"].update(dec_hidden=65), "tensors do not match its model config"),
    (lambda h: h["model"].update(context_lengths=[0, 2, 3, 4]),
     "tensors do not match its model config"),  # the gate reads one evidence more
    (lambda h: h["model"].update(context_lengths=[0, 2.0]),
     r"context_lengths=\[0, 2.0\] is not of type tuple"),
    (lambda h: h["tensors"].pop("context_counts"),
     r"the memory's \['context_counts'\] are missing"),
])
def test_the_header_is_read_back_exactly_or_not_at_all(tmp_path, change, message):
    args, student = tiny_student()
    path = tmp_path / "edited.eam"
    path.write_bytes(rewrite_header(train_gpt.build_artifact(student, args), change))
    with pytest.raises(ValueError, match=message) as error:
        train_gpt.load_artifact(path, torch.device("cpu"))
    assert "edited.eam" in str(error.value)


def test_same_model_gives_byte_identical_artifacts():
    args, student = tiny_student()
    first = train_gpt.build_artifact(student, args)
    second = train_gpt.build_artifact(student, args)
    assert first == second


@pytest.mark.parametrize("largest, width", [(0, 1), (255, 1), (256, 2), (2**32 - 1, 4),
                                            (2**32, 8), (2**62, 8)])
def test_integers_pack_as_byte_planes_of_the_narrowest_type_and_back_exactly(largest, width):
    values = np.array([[0, 1, largest], [largest // 3, 7, largest - 1 if largest else 0]])
    planes = train_gpt.integer_planes(values)
    assert planes.dtype == np.uint8 and planes.shape == (width, values.size)
    assert (planes[0] == values.reshape(-1) % 256).all()  # the lowest bytes come first
    assert np.array_equal(train_gpt.integers_from_planes(planes), values.reshape(-1))
    assert train_gpt.integers_from_planes(train_gpt.integer_planes(np.zeros(0, int))).size == 0
    with pytest.raises(ValueError, match="-1 is negative"):
        train_gpt.integer_planes(np.array([3, -1]))


def test_counts_past_uint32_load_back_exactly(tmp_path):
    args, student = tiny_student()
    contexts = student.contexts
    contexts.counts[0] = 2**33 + 5  # a pair counted more than 2^32 times
    path = tmp_path / "big.eam"
    path.write_bytes(train_gpt.build_artifact(student, args, contexts))
    assert torch.equal(train_gpt.load_artifact(path, CPU.device).contexts.counts, contexts.counts)


def test_the_compressed_bytes_do_not_depend_on_the_threads(monkeypatch):
    """Three jobs' worth of payload (a fast level: the jobs do not depend on it)."""
    rng = np.random.default_rng(0)
    payload = np.cumsum(rng.integers(0, 9, 3 << 20)).astype("<u4").tobytes()
    packed = set()
    for threads in (1, 2, 3):
        monkeypatch.setattr(train_gpt, "compression_threads", lambda threads=threads: threads)
        packed.add(train_gpt.compress(payload, 3))
    assert len(packed) == 1
    assert zstandard.ZstdDecompressor().decompress(packed.pop()) == payload


@pytest.mark.parametrize("quota, expected", [(None, 16), ("max 100000", 16),
                                             ("250000 100000", 3), ("50000 100000", 1)])
def test_threads_follow_the_cpus_a_container_may_use(monkeypatch, tmp_path, quota, expected):
    """The affinity shows every CPU of the host; a container's quota (cgroup v2 cpu.max) can
    allow fewer. Ranks on one host share them for their math; rank 0 alone packs, on up to 8."""
    monkeypatch.setattr(train_gpt.os, "sched_getaffinity", lambda pid: set(range(16)),
                        raising=False)
    real_path = train_gpt.Path

    def path(name, *rest):
        if str(name) == "/sys/fs/cgroup/cpu.max":
            if quota is None:
                return real_path(tmp_path / "absent")
            (tmp_path / "cpu.max").write_text(quota)
            return real_path(tmp_path / "cpu.max")
        if str(name).startswith("/sys/fs/cgroup/"):
            return real_path(tmp_path / "absent")
        return real_path(name, *rest)

    monkeypatch.setattr(train_gpt, "Path", path)
    assert train_gpt.usable_cpus() == expected
    assert train_gpt.compression_threads() == min(8, expected)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train_gpt.cpu_share() == max(1, expected // 4)


def test_reported_sizes_are_the_real_file_sizes(tmp_path):
    args, student = tiny_student()
    path = write_artifact(tmp_path / "model.eam", args, student)
    sizes = train_gpt.artifact_accounting(REPO / "train_gpt.py", path, 16_000_000)
    assert sizes["code_bytes"] == len((REPO / "train_gpt.py").read_bytes())
    assert sizes["model_bytes"] == len(path.read_bytes())
    assert sizes["total_bytes"] == sizes["code_bytes"] + sizes["model_bytes"]


def test_fit_keeps_the_most_counted_pairs_close_under_the_limit_and_they_read_back(tmp_path):
    args, student = tiny_student(eam_context_min_count=1)
    quarter = student.contexts.most_counted(student.context_counts.numel() // 4)
    limit = 100 + len(train_gpt.build_artifact(student, args, quarter))
    artifact, contexts, build_s = train_gpt.fit_artifact(
        student, dataclasses.replace(args, size_limit=limit), code_bytes=100)
    assert build_s > 0
    assert 0 <= limit - 100 - len(artifact) < 0.05 * limit
    dropped = student.context_counts.numel() - contexts.counts.numel()
    assert dropped > 0 and abs(contexts.counts.numel() - quarter.counts.numel()) < 0.2 * dropped
    # The kept pairs are the most counted: none dropped was counted more often.
    assert contexts.counts.sum() == student.context_counts.sort(descending=True).values[
        : contexts.counts.numel()].sum()
    path = tmp_path / "fit.eam"
    path.write_bytes(artifact)
    loaded = train_gpt.load_artifact(path, CPU.device)
    for name in train_gpt.CONTEXT_BUFFERS:
        assert torch.equal(getattr(loaded.contexts, name), getattr(contexts, name)), name
    # What fits keeps everything; what cannot fit even empty is refused, naming the limit.
    _, kept, _ = train_gpt.fit_artifact(student, args, code_bytes=100)
    assert torch.equal(kept.counts, student.context_counts)
    with pytest.raises(ValueError, match="SIZE_LIMIT"):
        train_gpt.fit_artifact(student, dataclasses.replace(args, size_limit=1000), 100)


@pytest.mark.parametrize("model", ["eam", "transformer"])
def test_width_bytes_are_what_the_weights_take_packed_before_compression(model):
    args = tiny_args(model=model, vocab_size=256, dec_hidden=256, model_dim=64)
    skeleton = train_gpt.model_skeleton(args)
    weighted = train_gpt.model_skeleton(args).to_empty(device="cpu")  # the shapes, with weights
    for parameter in weighted.parameters():
        torch.nn.init.normal_(parameter)
    # At QUANT_BITS=8 a quantized value is one byte as stored: the width is the raw weights'.
    _, arrays = train_gpt.pack_tensors(weighted, 8)
    raw = sum(array.nbytes for name, array in arrays.items()
              if name.split(".")[0] not in train_gpt.MEMORY_BUFFERS)
    assert train_gpt.width_bytes(skeleton, 8) == raw
    # At 6 bits the matrices take a quarter less; token tables, scales and vectors do not shrink.
    assert 0 < raw - train_gpt.width_bytes(skeleton, 6) < raw / 4


def zero_initialised(student):
    """The student as distillation starts it: the decoder's projection and the gate at zero."""
    with torch.no_grad():
        student.decoder.proj.weight.zero_()
        student.gate.weight.zero_()
    return student


@pytest.mark.parametrize("bits", [5, 6])
def test_untrained_bytes_are_about_what_the_zero_tensors_take_once_trained(bits):
    args, student = tiny_student(dec_hidden=256, quant_bits=bits)
    assert train_gpt.untrained_bytes(student, args.quant_bits) == 0  # nothing is zero
    trained = train_gpt.build_artifact(student, args)
    estimate = train_gpt.untrained_bytes(zero_initialised(student), args.quant_bits)
    packed = len(trained) - len(train_gpt.build_artifact(student, args))
    # Gaussian-like values at 6 bits carry ~5.4 bits of entropy each: the estimate is about
    # what they pack to (the rest of the payload moves compression by ~10% either way; packing's
    # own fit takes up what the estimate misses).
    assert 0.75 * estimate < packed <= 1.15 * estimate


def test_distillation_starts_with_memories_that_fit_beside_the_trained_decoder():
    args, student = tiny_student(dec_hidden=256)
    zero_initialised(student)
    reserve = train_gpt.untrained_bytes(student, args.quant_bits)
    quarter = student.contexts.most_counted(student.context_counts.numel() // 4)
    limit = train_gpt.code_size(args) + reserve + len(train_gpt.build_artifact(student, args,
                                                                                quarter))
    args = dataclasses.replace(args, size_limit=limit)
    pairs = student.context_counts.numel()
    train_gpt.fit_memories(CPU, args, student)
    assert 0 < student.context_counts.numel() < pairs
    assert train_gpt.code_size(args) + reserve + len(train_gpt.build_artifact(student, args)) \
        <= limit
    # What it kept is what packing keeps of it: no pair to drop while the decoder is zero.
    _, contexts, _ = train_gpt.fit_artifact(student, args, train_gpt.code_size(args) + reserve)
    assert torch.equal(contexts.counts, student.context_counts)


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: b"NOTEAM!!" + raw[8:], "not an eam-golf artifact"),
    (lambda raw: raw[:8] + (99).to_bytes(4, "little") + raw[12:], "version 99"),
    # An artifact of the previous format (its configs had the removed ideas' fields).
    (lambda raw: raw[:8] + (train_gpt.ARTIFACT_VERSION - 1).to_bytes(4, "little") + raw[12:],
     f"artifact version {train_gpt.ARTIFACT_VERSION - 1}, expected "
     f"{train_gpt.ARTIFACT_VERSION}"),
    (lambda raw: raw[:-10] + bytes(10), "checksum mismatch"),
    (lambda raw: raw[: len(raw) // 2], "checksum mismatch"),
    (lambda raw: raw[:20], "truncated"),
])
def test_corrupted_artifacts_are_rejected_naming_the_file(tmp_path, corrupt, message):
    args, student = tiny_student()
    raw = train_gpt.build_artifact(student, args)
    path = tmp_path / "broken.eam"
    path.write_bytes(corrupt(raw))
    with pytest.raises(ValueError, match=message) as error:
        train_gpt.read_artifact(path)
    assert "broken.eam" in str(error.value)


def test_the_baseline_round_trips_as_a_transformer_and_says_so(tmp_path):
    """MODEL=transformer ships the teacher alone: the header names its kind, the loaded model is
    a TransformerLM with the same config, and its scores are the teacher's up to quantization."""
    args = tiny_args(vocab_size=256)
    torch.manual_seed(0)
    teacher = train_gpt.GPT(train_gpt.settings_view(train_gpt.GPTConfig, args))
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.02 * torch.randn_like(param))
    baseline = train_gpt.TransformerLM.from_teacher(teacher, args)
    path = tmp_path / "baseline.eam"
    path.write_bytes(train_gpt.build_artifact(baseline, args))
    rebuilt = train_gpt.load_artifact(path, torch.device("cpu"))
    assert isinstance(rebuilt, train_gpt.TransformerLM) and rebuilt.config == baseline.config
    tokens = torch.randint(0, 256, (2, 32))
    assert (scores(rebuilt, tokens) - scores(baseline, tokens)).abs().max() < 0.5
    reference = torch.log_softmax(teacher.logits(teacher.body(tokens)), -1).flatten(0, 1)
    torch.testing.assert_close(scores(baseline, tokens), reference)
    assert not any(name in train_gpt.MEMORY_BUFFERS for name in rebuilt.state_dict())


def test_a_baseline_over_the_limit_packs_at_the_most_bits_that_fit():
    """The baseline has no memory to drop: where QUANT_BITS is over the limit it packs at the
    most bits a value below that fit, and fails, naming what to shrink, only where even the
    fewest are over."""
    args = tiny_args(vocab_size=256, model_dim=64, quant_bits=7)  # matrices large enough
    torch.manual_seed(0)
    teacher = train_gpt.GPT(train_gpt.settings_view(train_gpt.GPTConfig, args))
    with torch.no_grad():
        for param in teacher.parameters():
            param.copy_(torch.randn_like(param))
    baseline = train_gpt.TransformerLM.from_teacher(teacher, args)
    lowest = train_gpt.LOWEST_QUANT_BITS
    sizes = {bits: len(train_gpt.build_artifact(baseline,
                                                dataclasses.replace(args, quant_bits=bits)))
             for bits in range(lowest, args.quant_bits + 1)}
    assert all(sizes[bits - 1] < sizes[bits] for bits in range(lowest + 1, args.quant_bits + 1))
    for bits, size in sizes.items():
        fitted, packed_bits = train_gpt.fit_baseline(
            baseline, dataclasses.replace(args, size_limit=size), 0)
        assert packed_bits == bits and len(fitted) == size
    with pytest.raises(ValueError, match=f"needs {sizes[lowest] + 1} bytes with the code even "
                                         f"at {lowest} bits a value"):
        train_gpt.fit_baseline(baseline, dataclasses.replace(args, size_limit=sizes[lowest]), 1)


def test_an_artifact_of_unknown_kind_is_refused_naming_the_file(tmp_path):
    args, student = tiny_student()
    entries, arrays = train_gpt.pack_tensors(student, args.quant_bits)
    payload = train_gpt.serialize(entries, arrays, "lstm", dataclasses.asdict(student.config))
    blob = zstandard.ZstdCompressor().compress(payload)
    path = tmp_path / "odd.eam"
    path.write_bytes(train_gpt.ARTIFACT_PREFIX.pack(
        train_gpt.ARTIFACT_MAGIC, train_gpt.ARTIFACT_VERSION, hashlib.sha256(blob).digest()) + blob)
    with pytest.raises(ValueError, match=r"odd\.eam: unknown model kind 'lstm'"):
        train_gpt.load_artifact(path, torch.device("cpu"))


def test_every_shipped_model_has_an_artifact_kind_and_score_lines():
    assert set(train_gpt.SHIPPED_MODELS) == set(train_gpt.ARTIFACT_CONFIGS)
    assert set(train_gpt.SHIPPED_MODELS) == set(train_gpt.SCORE_RECORDS)
    with pytest.raises(ValueError, match="MODEL='gpt'"):
        tiny_args(model="gpt")
