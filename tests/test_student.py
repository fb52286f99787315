"""The student's options: a recurrent (weight-tied) encoder and a low-rank vocabulary prior."""

import dataclasses

import pytest
import torch

import train_gpt
from tests.helpers import tiny_args, tiny_student, write_artifact


class PassBoundary(torch.nn.Module):
    """A block that first adds the token embeddings back: where one pass over the tied blocks
    ends and the next begins, built from the outside of the plain network."""

    def __init__(self, block: torch.nn.Module, embeddings: dict):
        super().__init__()
        self.block, self.embeddings = block, embeddings

    def forward(self, x, cos, sin):
        return self.block(x + self.embeddings["output"], cos, sin)


def test_recurrent_passes_equal_a_deeper_plain_stack_of_the_same_blocks():
    args = tiny_args()
    config = train_gpt.settings_view(train_gpt.GPTConfig, args, num_layers=2, recur_steps=3)
    torch.manual_seed(0)
    recurrent = train_gpt.GPT(config)
    with torch.no_grad():
        for param in recurrent.parameters():
            param.add_(0.05 * torch.randn_like(param))
    idx = torch.randint(0, args.vocab_size, (2, 16))

    # The reference: the plain network, six blocks deep, blocks 3-6 the same two again, the
    # embeddings re-entering before blocks 3 and 5 (through a hook on the embedding's output).
    plain = train_gpt.GPT(dataclasses.replace(config, num_layers=6, recur_steps=1))
    plain.embed = recurrent.embed
    embeddings: dict = {}
    plain.embed.register_forward_hook(lambda module, inputs, out: embeddings.update(output=out))
    blocks = list(recurrent.blocks)
    plain.blocks = torch.nn.ModuleList(
        [*blocks, PassBoundary(blocks[0], embeddings), blocks[1],
         PassBoundary(blocks[0], embeddings), blocks[1]])
    torch.testing.assert_close(recurrent.body(idx)[0], plain.body(idx)[0])

    # The tied passes add no parameter: a one-pass network loads the same weights.
    once = train_gpt.GPT(dataclasses.replace(config, recur_steps=1))
    once.load_state_dict(recurrent.state_dict())
    assert not torch.allclose(once.body(idx)[0], recurrent.body(idx)[0])


def test_more_passes_at_evaluation_than_in_training_still_give_a_distribution(tmp_path):
    args, student = tiny_student(enc_recur_steps=2)
    path = write_artifact(tmp_path / "model.eam", args, student)
    tokens = torch.randint(0, 256, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.bool)
    scores = {}
    for steps in (2, 4):
        model = train_gpt.load_artifact(path, torch.device("cpu"), encoder_recur_steps=steps)
        assert model.encoder.config.recur_steps == steps
        with torch.no_grad():
            scores[steps], _ = train_gpt.student_scorer(model)(tokens, mask)
        assert torch.isfinite(scores[steps]).all()
        torch.testing.assert_close(scores[steps].exp().sum(1), torch.ones(64))
    assert not torch.equal(scores[2], scores[4])


def test_a_fresh_prior_leaves_the_logits_unchanged_and_then_adds_a_bigram_term():
    _, without = tiny_student()
    with_prior = train_gpt.MemoryLM(dataclasses.replace(without.config, dec_prior_rank=4),
                                    without.tables)
    missing, unexpected = with_prior.load_state_dict(without.state_dict(), strict=False)
    assert unexpected == [] and all(name.startswith("prior.") for name in missing)
    tokens = torch.randint(0, 256, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.bool)
    with torch.no_grad():
        reference, _ = train_gpt.student_scorer(without.eval())(tokens, mask)
        fresh, _ = train_gpt.student_scorer(with_prior.eval())(tokens, mask)
        torch.testing.assert_close(fresh, reference)
        assert with_prior.prior(tokens.flatten()).shape == (64, 256)
        with_prior.prior.next_table.weight.normal_()
        trained, _ = train_gpt.student_scorer(with_prior)(tokens, mask)
    expected = torch.log_softmax(
        torch.log_softmax(reference, 1) + with_prior.prior(tokens.flatten()), 1)
    torch.testing.assert_close(trained, expected, atol=1e-4, rtol=0)
    assert (trained - reference).abs().max() > 0.1


def test_distillation_loss_is_cross_entropy_plus_the_scaled_kl():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(5, 11), torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    cross_entropy = -torch.log_softmax(logits, 1)[torch.arange(5), targets].mean()
    assert train_gpt.distillation_loss(logits, targets, teacher_logits, 0.0, 2.0) == (
        pytest.approx(cross_entropy.item(), rel=1e-6))
    student, teacher = torch.softmax(logits / 2, 1), torch.softmax(teacher_logits / 2, 1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()
    got = train_gpt.distillation_loss(logits, targets, teacher_logits, 0.5, 2.0)
    assert got == pytest.approx((cross_entropy + 0.5 * 4 * kl).item(), rel=1e-6)


def test_with_a_memory_mixture_the_cross_entropy_reads_it_and_the_kl_the_model_part():
    torch.manual_seed(0)
    model_logits, teacher_logits = torch.randn(5, 11), torch.randn(5, 11)
    mixture = torch.log(0.7 * torch.softmax(model_logits, 1) + 0.3 * torch.softmax(
        torch.randn(5, 11), 1))
    targets = torch.randint(0, 11, (5,))
    student, teacher = torch.softmax(model_logits, 1), torch.softmax(teacher_logits, 1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()
    expected = -mixture[torch.arange(5), targets].mean() + 0.5 * kl
    got = train_gpt.distillation_loss(mixture, targets, teacher_logits, 0.5, 1.0, model_logits)
    assert got == pytest.approx(expected.item(), rel=1e-6)
