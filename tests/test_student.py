"""The student's distillation loss."""

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from tests.helpers import tiny_student


def test_distillation_loss_is_cross_entropy_plus_the_scaled_kl():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(5, 11), torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    cross_entropy = -torch.log_softmax(logits, 1)[torch.arange(5), targets].mean()
    log_probs = torch.log_softmax(logits, 1)
    assert train_gpt.distillation_loss(log_probs, targets, teacher_logits, 0.0, 2.0) == (
        pytest.approx(cross_entropy.item(), rel=1e-6))
    student, teacher = torch.softmax(logits / 2, 1), torch.softmax(teacher_logits / 2, 1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()
    got = train_gpt.distillation_loss(log_probs, targets, teacher_logits, 0.5, 2.0)
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
    model_log_probs = torch.log_softmax(model_logits, 1)
    got = train_gpt.distillation_loss(mixture, targets, teacher_logits, 0.5, 1.0, model_log_probs)
    assert got == pytest.approx(expected.item(), rel=1e-6)
    # At a temperature, the model's log-probs temper as its logits would (shift invariance).
    tempered = train_gpt.distillation_loss(mixture, targets, teacher_logits, 0.5, 3.0,
                                           model_log_probs)
    student, teacher = torch.softmax(model_logits / 3, 1), torch.softmax(teacher_logits / 3, 1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()
    expected = -mixture[torch.arange(5), targets].mean() + 0.5 * 9 * kl
    assert tempered == pytest.approx(expected.item(), rel=1e-5)


def test_the_mixtures_negative_log_likelihood_trains_as_its_cross_entropy_would():
    # The scores are normalized, so the log_softmax that cross_entropy would add is an identity
    # for every parameter value: the parameters' gradients agree.
    _, student = tiny_student()
    tokens = torch.randint(0, 256, (2, 32))
    targets = torch.randint(0, 256, (64,))
    gradients = []
    for loss_of in (lambda scores: F.cross_entropy(scores, targets),
                    lambda scores: train_gpt.distillation_loss(scores, targets, scores, 0.0, 1.0)):
        student.zero_grad()
        loss_of(student(tokens)[1]).backward()
        gradients.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(gradients[1]) == len(gradients[0]) > 10
    for ours, reference in zip(*gradients, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-3)
