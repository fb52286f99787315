import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_args, train_gpt


def tiny_student(seed: int = 0, locations: int = 48, **overrides):
    torch.manual_seed(seed)
    args = tiny_args(vocab_size=256, dec_hidden=64, **overrides)
    tables = train_gpt.MemoryTables(F.normalize(torch.randn(locations, 8), dim=1),
                                    torch.randn(locations, 32), torch.randn(locations))
    student = train_gpt.MemoryLM(args, tables)
    with torch.no_grad():  # zero-initialised projections would hide packing mistakes
        for param in student.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return args, student


@pytest.mark.parametrize("bits", [6, 8])
def test_quantization_error_is_within_half_a_step(bits):
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]
    codes, scale = train_gpt.quantize_rows(weight, bits)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1
    error = (train_gpt.dequantize_rows(codes, scale) - weight).abs()
    # Half a quantization step, plus the fp16 rounding of the scale itself.
    bound = scale.float()[:, None] * (0.5 + 2 ** (bits - 1) * 1e-3)
    assert (error <= bound).all()


# The options of the ideas ablation change what is packed: a prior's tables, tied passes.
@pytest.mark.parametrize("options", [{}, dict(dec_prior_rank=4, enc_recur_steps=2,
                                              eam_read_steps=3)])
def test_round_trip_logits_equal_the_dequantized_model(tmp_path, options):
    args, student = tiny_student(**options)
    path = tmp_path / "model.eam"
    path.write_bytes(train_gpt.build_artifact(student.state_dict(), student.tables, args))
    rebuilt = train_gpt.load_artifact(path, torch.device("cpu"))

    entries, arrays = train_gpt.pack_tensors(student.state_dict(), student.tables, args)
    expected = {}
    for name, entry in entries.items():
        if entry["kind"] == "fp16":
            expected[name] = torch.from_numpy(arrays[name].astype(np.float32))
        else:
            expected[name] = train_gpt.dequantize_rows(torch.from_numpy(arrays[name + ".q"]),
                                                       torch.from_numpy(arrays[name + ".scale"]))
    expected["addresses"] = F.normalize(expected["addresses"], dim=1)
    reference = train_gpt.MemoryLM(args, train_gpt.MemoryTables(
        expected["addresses"], expected["patterns"], torch.zeros(48)))
    reference.load_state_dict({**expected, "log_counts": torch.zeros(48)})

    tokens = torch.randint(0, 256, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.bool)
    with torch.no_grad():
        got, _ = train_gpt.student_scorer(rebuilt)(tokens, mask)
        want, _ = train_gpt.student_scorer(reference)(tokens, mask)
        original, _ = train_gpt.student_scorer(student.eval())(tokens, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - original).abs().max() < 0.5  # quantization moves logits, but only a little


def test_same_model_gives_byte_identical_artifacts():
    args, student = tiny_student()
    first = train_gpt.build_artifact(student.state_dict(), student.tables, args)
    second = train_gpt.build_artifact(student.state_dict(), student.tables, args)
    assert first == second


def test_reported_sizes_are_the_real_file_sizes(tmp_path):
    args, student = tiny_student()
    path = tmp_path / "model.eam"
    path.write_bytes(train_gpt.build_artifact(student.state_dict(), student.tables, args))
    sizes = train_gpt.artifact_accounting(REPO / "train_gpt.py", path, 16_000_000)
    assert sizes["code_bytes"] == len((REPO / "train_gpt.py").read_bytes())
    assert sizes["model_bytes"] == len(path.read_bytes())
    assert sizes["total_bytes"] == sizes["code_bytes"] + sizes["model_bytes"]


def test_fit_drops_least_written_locations_until_under_the_limit():
    args, student = tiny_student(locations=400)
    full = train_gpt.build_artifact(student.state_dict(), student.tables, args)
    limit = len(full) - 3000
    fitted_args = tiny_args(vocab_size=256, dec_hidden=64, size_limit=limit + 100)
    artifact, dropped = train_gpt.fit_artifact(student.state_dict(), student.tables,
                                               fitted_args, code_bytes=100)
    assert dropped > 0 and 100 + len(artifact) <= fitted_args.size_limit
    _, _, arrays = train_gpt.deserialize(__import__("zstandard").ZstdDecompressor().decompress(
        artifact[train_gpt.ARTIFACT_PREFIX.size:]))
    kept = arrays["patterns.q"].shape[0]
    assert kept == 400 - dropped
    with pytest.raises(ValueError, match="SIZE_LIMIT"):
        train_gpt.fit_artifact(student.state_dict(), student.tables,
                               tiny_args(vocab_size=256, dec_hidden=64, size_limit=1000), 100)


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: b"NOTEAM!!" + raw[8:], "not an eam-golf artifact"),
    (lambda raw: raw[:8] + (99).to_bytes(4, "little") + raw[12:], "version 99"),
    (lambda raw: raw[:-10] + bytes(10), "checksum mismatch"),
    (lambda raw: raw[: len(raw) // 2], "checksum mismatch"),
    (lambda raw: raw[:20], "truncated"),
])
def test_corrupted_artifacts_are_rejected_naming_the_file(tmp_path, corrupt, message):
    args, student = tiny_student()
    raw = train_gpt.build_artifact(student.state_dict(), student.tables, args)
    path = tmp_path / "broken.eam"
    path.write_bytes(corrupt(raw))
    with pytest.raises(ValueError, match=message) as error:
        train_gpt.read_artifact(path)
    assert "broken.eam" in str(error.value)
