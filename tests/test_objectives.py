"""Objectives of study A against values computed by hand, and their gradient flow on a tiny real GPT-2."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from alignment.objectives import AWR, MLE, RWR, Objective, Unlikelihood, ValueHead
from alignment.task import Task

LN3 = math.log(3.0)


def two_token_example():
    """B=1, T=3, V=2. Position 0 has logits (ln 3, 0): p = (3/4, 1/4); position 1 has logits (0, 0): p = (1/2, 1/2).
    labels[:, 1:] = (0, 1), so the predicted tokens have p = 3/4 and p = 1/2: CE = ln(4/3) and ln 2."""
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, 0, 1]])
    return logits, labels


def test_mle_by_hand():
    logits, labels = two_token_example()
    loss, metrics = MLE()(logits, labels, scores=torch.zeros(1, 3))
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    assert metrics["loss"].item() == metrics["lm_loss"].item() == loss.item()
    labels[0, 2] = -100  # ignored: only the first predicted token counts
    assert MLE()(logits, labels, None)[0].item() == pytest.approx(math.log(4 / 3))


def test_mle_equals_torch_cross_entropy_on_shifted_tensors():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 3:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert MLE()(logits, labels, torch.rand(2, 5))[0].item() == pytest.approx(expected.item())


def test_unlikelihood_by_hand():
    # Predicted token 1 (p = 3/4, score 0.0) is aligned; token 2 is misaligned (score 0.9 > 0.5). Give token 2
    # logits (0, ln 3) so p = 3/4 too: its term is -alpha log(1/4) = 0.5 ln 4 = ln 2.
    logits = torch.tensor([[[LN3, 0.0], [0.0, LN3], [0.0, 0.0]]])
    labels, scores = torch.tensor([[1, 0, 1]]), torch.tensor([[0.7, 0.0, 0.9]])
    loss, metrics = Unlikelihood(threshold=0.5, alpha=0.5)(logits, labels, scores)
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    assert metrics["likelihood"].item() == pytest.approx(math.log(4 / 3) / 2)
    assert metrics["unlikelihood"].item() == pytest.approx(math.log(2) / 2)
    assert metrics["misaligned_share"].item() == pytest.approx(0.5)
    assert metrics["lm_loss"].item() == pytest.approx(math.log(4 / 3))  # both tokens have p = 3/4


def test_unlikelihood_without_misaligned_tokens_is_mle():
    torch.manual_seed(0)
    logits, labels, scores = torch.randn(2, 6, 5), torch.randint(0, 5, (2, 6)), torch.rand(2, 6) * 0.3
    scores[:, 0] = 1.0  # the first position is never predicted, so its score must not matter
    loss, metrics = Unlikelihood(threshold=0.3)(logits, labels, scores)
    assert loss.item() == pytest.approx(MLE()(logits, labels, scores)[0].item())
    assert metrics["misaligned_share"].item() == 0.0


def test_unlikelihood_threshold_zero_is_a_hard_threshold():
    # No soft branch: a score of exactly 0 is aligned (likelihood), 1e-9 is already misaligned (unlikelihood).
    logits, labels = two_token_example()
    objective = Unlikelihood(threshold=0.0)
    aligned = objective(logits, labels, torch.tensor([[0.0, 0.0, 0.0]]))[0]
    assert aligned.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    mixed = objective(logits, labels, torch.tensor([[0.0, 1e-9, 0.0]]))[0]  # first predicted token: -log(1 - 3/4)
    assert mixed.item() == pytest.approx((math.log(4) + math.log(2)) / 2)


def test_unlikelihood_clamp_keeps_the_loss_finite_when_p_is_one():
    logits = torch.tensor([[[100.0, -100.0], [0.0, 0.0]]], requires_grad=True)  # p(token 0) == 1.0 in float32
    loss, _ = Unlikelihood(threshold=0.5, eps=1e-5)(logits, torch.tensor([[0, 0]]), torch.tensor([[0.0, 1.0]]))
    assert loss.item() == pytest.approx(-math.log(1e-5))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_awr_by_hand():
    logits, labels = two_token_example()  # CE = (ln 4/3, ln 2)
    scores = torch.tensor([[0.9, 0.0, 0.5]])  # rewards of the predicted tokens: (0, -0.5)
    values = torch.tensor([[-0.5, -0.2, -0.9]])  # V for them: (-0.5, -0.2), advantages (0.5, -0.3)
    loss, metrics = AWR(alpha=0.5, beta=1.0).loss(logits, labels, scores, values)
    weights = (math.exp(0.5), math.exp(-0.3))
    weighted = (weights[0] * math.log(4 / 3) + weights[1] * math.log(2)) / 2
    value_loss = (0.5**2 + 0.3**2) / 2
    assert metrics["weighted_loss"].item() == pytest.approx(weighted)
    assert metrics["value_loss"].item() == pytest.approx(value_loss)
    assert loss.item() == pytest.approx(0.5 * weighted + 0.5 * value_loss)
    assert metrics["weight_mean"].item() == pytest.approx(sum(weights) / 2)
    assert metrics["weight_max"].item() == pytest.approx(weights[0])


@pytest.mark.parametrize("alpha, beta", [(0.5, 10.0), (0.9, 0.5), (1.0, 2.0)])
def test_awr_with_equal_rewards_and_fixed_value_is_scaled_mle(alpha, beta):
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 5), torch.randint(0, 5, (2, 6))
    scores, values = torch.full((2, 6), 0.3), torch.full((2, 6), -0.5)  # r - V = 0.2 everywhere
    loss, _ = AWR(alpha=alpha, beta=beta).loss(logits, labels, scores, values)
    mle = MLE()(logits, labels, scores)[0].item()
    assert loss.item() == pytest.approx(alpha * math.exp(0.2 / beta) * mle + (1 - alpha) * 0.2**2)


def test_awr_max_weight_caps_the_weights():
    logits, labels = two_token_example()
    scores, values = torch.zeros(1, 3), torch.full((1, 3), -0.5)  # advantage 0.5, exp(0.5 / 0.01) = e^50
    loss, metrics = AWR(alpha=1.0, beta=0.01, max_weight=2.0).loss(logits, labels, scores, values)
    assert metrics["weight_max"].item() == metrics["weight_mean"].item() == 2.0
    assert loss.item() == pytest.approx(2.0 * (math.log(4 / 3) + math.log(2)) / 2)


def test_rwr_is_awr_with_alpha_one_and_no_value_gradient():
    torch.manual_seed(0)
    logits, labels, scores = torch.randn(2, 6, 5), torch.randint(0, 5, (2, 6)), torch.rand(2, 6)
    values = torch.full((2, 6), -0.5, requires_grad=True)
    loss, metrics = RWR(beta=2.0).loss(logits, labels, scores, values)
    assert loss.item() == pytest.approx(AWR(alpha=1.0, beta=2.0).loss(logits, labels, scores, values)[0].item())
    assert metrics["value_loss"].item() > 0  # reported, but not part of the loss
    loss.backward()
    assert values.grad is None or not values.grad.any()


def test_awr_requires_its_value_head_and_the_hidden_states():
    logits, labels = two_token_example()
    with pytest.raises(ValueError, match="needs configure"):
        AWR()(logits, labels, torch.zeros(1, 3), torch.zeros(1, 3, 4))
    awr = AWR()
    awr.configure(hidden_size=4, task=None)
    with pytest.raises(ValueError, match="hidden states"):
        awr(logits, labels, torch.zeros(1, 3))


def test_value_head_starts_at_minus_one_half_and_stays_in_range():
    head = ValueHead(hidden_size=4)
    assert torch.equal(head(torch.randn(2, 3, 4)), torch.full((2, 3), -0.5))
    with torch.no_grad():
        head.linear.weight.fill_(100.0)
    values = head(torch.randn(2, 3, 4))
    assert values.shape == (2, 3) and ((values >= -1) & (values <= 0)).all()


# --- a tiny real GPT-2 plus value head ------------------------------------------------------------------------------


def tiny_lm():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))


def tiny_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 16, (2, 8), generator=generator)
    labels = input_ids.clone()
    labels[1, 6:] = -100
    scores = torch.tensor([[0.0] * 4 + [0.8] * 4, [0.0] * 2 + [0.6] * 3 + [0.0] * 3])  # aligned and misaligned
    return input_ids, labels, scores


def configured(objective: Objective, model) -> Objective:
    objective.configure(model.config.hidden_size, Task("t", {}, [], threshold=0.5))
    return objective


def compute_loss(objective: Objective, model):
    input_ids, labels, scores = tiny_batch()
    output = model(input_ids, output_hidden_states=objective.uses_hidden_states)
    hidden = output.hidden_states[-1] if output.hidden_states is not None else None
    return objective(output.logits, labels, scores, hidden)[0]


def has_gradient(parameters) -> bool:
    return any(p.grad is not None and p.grad.any() for p in parameters)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_awr_gradient_reaches_value_head_only_through_value_loss(alpha):
    model = tiny_lm()
    objective = configured(AWR(alpha=alpha, beta=1.0), model)
    value_head = objective.value_head
    with torch.no_grad():  # a zero head has zero d V / d hidden, which would hide a missing detach
        value_head.linear.weight.normal_()
    compute_loss(objective, model).backward()
    assert has_gradient(value_head.parameters()) == (alpha < 1)  # alpha = 1: no value loss, weights are detached
    assert has_gradient(model.parameters()) == (alpha > 0)  # alpha = 0: only the value loss, hidden is detached


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_undetached_value_head_lets_the_value_loss_train_the_lm(alpha):
    """Study A's setting: with alpha = 0 the LM's only gradient is the value loss's, so it is nonzero iff the hidden
    state is not detached; with alpha = 1 (RWR) the value loss has weight 0 and the head gets no gradient."""
    model = tiny_lm()
    objective = configured(AWR(alpha=alpha, beta=1.0, detach_value_head=False), model)
    value_head = objective.value_head
    with torch.no_grad():
        value_head.linear.weight.normal_()
    compute_loss(objective, model).backward()
    assert has_gradient(model.parameters())
    assert has_gradient(value_head.parameters()) == (alpha < 1)
    assert has_gradient(model.transformer.h.parameters())  # the trunk, not only the output embedding


OBJECTIVES = {
    "mle": MLE,
    "unlikelihood": Unlikelihood,  # the task's threshold, 0.5
    "awr": lambda: AWR(alpha=0.5, beta=1.0),
    "rwr": lambda: RWR(beta=1.0),
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_training_steps_move_every_trainable_parameter(name):
    model = tiny_lm()
    objective = configured(OBJECTIVES[name](), model)
    trainable = dict(model.named_parameters()) | {f"objective.{n}": p for n, p in objective.named_parameters()}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = compute_loss(objective, model)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    # RWR's value head never trains (alpha = 1): everything else must move.
    assert unchanged == (["objective.value_head.linear.weight"] if name == "rwr" else [])


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Unlikelihood(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (lambda: Unlikelihood(threshold=-0.1), r"threshold must be in \[0, 1\]"),
        (lambda: Unlikelihood(threshold=0.1, alpha=2.0), r"alpha must be in \[0, 1\]"),
        (lambda: Unlikelihood(threshold=0.1, eps=0.0), r"eps must be in \(0, 1\)"),
        (lambda: AWR(alpha=-0.5), r"alpha must be in \[0, 1\].*got -0.5"),
        (lambda: AWR(beta=0.0), "beta must be > 0"),
        (lambda: RWR(beta=-1.0), "beta must be > 0"),
        (lambda: AWR(max_weight=0.0), "max_weight must be > 0"),
        (lambda: ValueHead(0), "hidden_size must be > 0"),
    ],
)
def test_invalid_hyperparameters_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("detach", [True, False])
def test_awr_builds_the_value_head_it_asks_for(detach):
    assert configured(AWR(detach_value_head=detach), tiny_lm()).value_head.detach is detach


def test_unlikelihood_takes_the_resolved_task_threshold_unless_given_its_own():
    assert configured(Unlikelihood(), tiny_lm()).threshold == 0.5
    assert configured(Unlikelihood(threshold=0.2), tiny_lm()).threshold == 0.2
    with pytest.raises(ValueError, match="threshold must be in"):
        Unlikelihood().configure(8, Task("t", {}, [], threshold=1.5))
