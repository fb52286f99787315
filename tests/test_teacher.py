import pytest
import torch
from conftest import tiny_args, train_gpt


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
    model = train_gpt.GPT(train_gpt.GPTConfig.from_args(tiny_args(qk_gain_init=4.5), 2))
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
    runtime = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None)
    assert train_gpt.maybe_compile(module, tiny_args(compile=True), runtime) is module


def test_teacher_loss_falls_on_demo_data(demo_data):
    args = tiny_args(vocab_size=1024, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=16,
                     train_seq_len=64, train_batch_tokens=1024, grad_accum_world=1,
                     warmup_steps=2, warmdown_frac=0.2, train_log_every=1000)
    runtime = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(str(demo_data), "train"),
                                              runtime)
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.GPTConfig.from_args(args, 2))
    x, y = loader.next_batch(4096, 64)
    with torch.no_grad():
        before = model(x, y).item()
    train_gpt.run_training(runtime, args, model, lambda m, a, b: m(a, b), loader, 1024, 64,
                           budget_s=60, max_steps=40, lr_scale=1.0, name="teacher")
    with torch.no_grad():
        after = model(x, y).item()
    assert after < before - 1.0, (before, after)
