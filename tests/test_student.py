"""The student's options: a recurrent (weight-tied) encoder and a low-rank vocabulary prior."""

import dataclasses

import torch
from conftest import tiny_args, train_gpt
from test_packing import tiny_student


def test_one_recurrent_pass_is_the_plain_network_and_more_passes_reinject_the_input():
    args = tiny_args()
    torch.manual_seed(0)
    plain = train_gpt.GPT(train_gpt.GPTConfig.from_args(args, 2))
    with torch.no_grad():
        for param in plain.parameters():
            param.add_(0.05 * torch.randn_like(param))
    recurrent = train_gpt.GPT(train_gpt.GPTConfig.from_args(args, 2, recur_steps=3))
    recurrent.load_state_dict(plain.state_dict())  # weight-tied: no extra parameters
    idx = torch.randint(0, args.vocab_size, (2, 16))

    head_dim = args.model_dim // args.num_heads
    cos, sin = train_gpt.rotary_tables(16, args.rope_dims or head_dim, args.rope_base, "cpu")
    inputs = x = plain.embed(idx)
    passes = []
    for step in range(3):
        x = x + inputs if step else x
        for block in plain.blocks:
            x = block(x, cos, sin)
        passes.append(train_gpt.rms_norm(x))
    torch.testing.assert_close(plain.body(idx)[0], passes[0])
    torch.testing.assert_close(recurrent.body(idx)[0], passes[2])


def test_more_passes_at_evaluation_than_in_training_still_give_a_distribution(tmp_path):
    args, student = tiny_student(enc_recur_steps=2)
    path = tmp_path / "model.eam"
    path.write_bytes(train_gpt.build_artifact(student.state_dict(), student.tables, args))
    tokens = torch.randint(0, 256, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.bool)
    scores = {}
    for steps in (2, 4):
        model = train_gpt.load_artifact(path, torch.device("cpu"), dict(enc_recur_steps=steps))
        assert model.encoder.config.recur_steps == steps
        with torch.no_grad():
            scores[steps], _ = train_gpt.student_scorer(model)(tokens, mask)
        assert torch.isfinite(scores[steps]).all()
        torch.testing.assert_close(scores[steps].exp().sum(1), torch.ones(64))
    assert not torch.equal(scores[2], scores[4])


def test_a_fresh_prior_leaves_the_logits_unchanged_and_then_adds_a_bigram_term():
    args, without = tiny_student()
    with_prior = train_gpt.MemoryLM(dataclasses.replace(args, dec_prior_rank=4), without.tables)
    missing, unexpected = with_prior.load_state_dict(without.state_dict(), strict=False)
    assert unexpected == [] and all(name.startswith("prior.") for name in missing)
    tokens = torch.randint(0, 256, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.bool)
    with torch.no_grad():
        reference, _ = train_gpt.student_scorer(without.eval())(tokens, mask)
        fresh, _ = train_gpt.student_scorer(with_prior.eval())(tokens, mask)
        torch.testing.assert_close(fresh, reference)
        assert with_prior.prior(tokens.flatten()).shape == (64, 256)
        with_prior.prior.embed_next.weight.normal_()
        trained, _ = train_gpt.student_scorer(with_prior)(tokens, mask)
    expected = torch.log_softmax(
        torch.log_softmax(reference, 1) + with_prior.prior(tokens.flatten()), 1)
    torch.testing.assert_close(trained, expected, atol=1e-4, rtol=0)
    assert (trained - reference).abs().max() > 0.1
