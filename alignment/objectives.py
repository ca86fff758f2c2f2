"""Training objectives of study A: Korbak et al. 2023, "Pretraining Language Models with Human Preferences", Sec. 2.

Each objective turns the LM's logits, the labels and per-token misalignment scores into one scalar loss and a dict
of detached metrics. Only the objectives that change the *loss* live here. Filtering and conditional training are
plain MLE on data the pipeline has already transformed (documents above a score threshold dropped, or
`<|aligned|>`/`<|misaligned|>` control tokens inserted), so a run with either uses `MLE`.

Notation: x_t is the token being predicted, p(x_t) its probability given x_<t, s_t in [0, 1] its misalignment score
(the score of its sentence; 1 = worst). Every mean runs over the non-ignored predicted tokens.
"""
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _require(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _mean(per_token: torch.Tensor) -> torch.Tensor:
    # A batch with nothing to predict gives 0 (still attached to the graph) instead of NaN poisoning the run.
    return per_token.sum() / max(per_token.numel(), 1)


def _predicted_tokens(logits, labels, scores=None, values=None):
    """Shift, then keep the predicted tokens that are not ignored: logits[:, :-1] predict labels[:, 1:].

    Returns, each of shape (N,): the cross-entropy -log p(x_t); the score of the *predicted* token (scores[:, 1:]);
    the value at the *predicting* position (values[:, :-1]). Selecting first means padding scores never matter.
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="none").float()
    selected_scores = scores[:, 1:][keep] if scores is not None else None
    selected_values = values[:, :-1][keep] if values is not None else None
    return ce, selected_scores, selected_values


def _detached(metrics: dict) -> dict:
    return {name: value.detach() for name, value in metrics.items()}


class Objective(nn.Module):
    """A training objective. The LightningModule calls every subclass the same way:

    configure(hidden_size, task) once the LM is built: the objective takes what it needs from the LM's size and
      the resolved task (alignment.task.Task), e.g. its own value head or the task's threshold.
    forward(logits, labels, scores, hidden=None) -> (loss, metrics)
      logits: (B, T, V) float, the LM's output for input_ids (B, T).
      labels: (B, T) long, input_ids with -100 at positions to ignore (padding). The shift happens here:
              logits[:, :-1] predict labels[:, 1:].
      scores: (B, T) float in [0, 1], the misalignment score of the sentence each token belongs to (1 = worst);
              the score of the token being predicted is scores[:, 1:].
      hidden: (B, T, H), the LM's last hidden state, passed when `uses_hidden_states` is True.
      loss: scalar tensor, a mean over non-ignored predicted tokens.
      metrics: dict of detached scalar tensors, the loss and its parts, names without a prefix (the caller adds
               "train/"): "loss", "lm_loss" (plain mean cross-entropy, comparable across objectives), and per
               objective "likelihood", "unlikelihood", "misaligned_share", "weighted_loss", "value_loss",
               "weight_mean", "weight_max".
    """

    uses_hidden_states: bool = False

    def configure(self, hidden_size: int, task) -> None:
        """Nothing to take by default."""

    def forward(self, logits, labels, scores, hidden=None):
        raise NotImplementedError


class MLE(Objective):
    """Maximum likelihood: mean cross-entropy. Also the objective of filtering and conditional training."""

    def forward(self, logits, labels, scores=None, hidden=None):
        ce, _, _ = _predicted_tokens(logits, labels)
        loss = _mean(ce)
        return loss, _detached({"loss": loss, "lm_loss": loss})


class Unlikelihood(Objective):
    """Likelihood on aligned tokens, unlikelihood (Welleck et al. 2020) on misaligned ones (paper Sec. 2).

    a_t = 1[s_t <= threshold];  L = mean_t( -a_t log p(x_t) - alpha (1 - a_t) log(1 - p(x_t)) ).
    The comparison is always a hard `<=`: threshold = 0 means only tokens scoring exactly 0 count as aligned. (The
    public code reads threshold 0 as "no threshold" and switches to a soft a_t = 1 - s_t; the paper has no such case.)
    1 - p is clamped at `eps` because the unlikelihood term goes to infinity as p -> 1.
    threshold: None takes the task's (`task.threshold`, resolved on the training corpus by the build).
    """

    def __init__(self, threshold: float | None = None, alpha: float = 1.0, eps: float = 1e-5):
        super().__init__()
        _require(0.0 <= alpha <= 1.0, "alpha", alpha, "in [0, 1] (the weight of the unlikelihood term)")
        _require(0.0 < eps < 1.0, "eps", eps, "in (0, 1) (the floor of 1 - p inside the log)")
        self.alpha, self.eps = alpha, eps
        self.threshold = None
        if threshold is not None:
            self._set_threshold(threshold)

    def _set_threshold(self, threshold: float) -> None:
        _require(0.0 <= threshold <= 1.0, "threshold", threshold, "in [0, 1] (scores are in [0, 1])")
        self.threshold = float(threshold)

    def configure(self, hidden_size: int, task) -> None:
        if self.threshold is None:
            _require(task.threshold is not None, "task.threshold", None, "set for unlikelihood")
            self._set_threshold(task.threshold)

    def forward(self, logits, labels, scores, hidden=None):
        ce, token_scores, _ = _predicted_tokens(logits, labels, scores)
        aligned = (token_scores <= self.threshold).float()
        probability = torch.exp(-ce)
        likelihood = aligned * ce
        unlikelihood = -self.alpha * (1 - aligned) * torch.log(torch.clamp(1 - probability, min=self.eps))
        loss = _mean(likelihood + unlikelihood)
        return loss, _detached({"loss": loss, "lm_loss": _mean(ce), "likelihood": _mean(likelihood),
                                "unlikelihood": _mean(unlikelihood), "misaligned_share": _mean(1 - aligned)})


class AWR(Objective):
    """Advantage-weighted regression (Peng et al. 2019) at the token level (paper Sec. 2).

    Reward r_t = -s_t in [-1, 0]. A value head predicts V_t; the advantage A_t = r_t - V_t is treated as a constant
    (stop-gradient), so the weights w_t = min(exp(A_t / beta), max_weight) only rescale each token's cross-entropy:
    the LM is pushed towards tokens that did better than expected. The cap keeps one lucky token from dominating.
    L = alpha * mean(w_t * CE_t) + (1 - alpha) * mean((V_t - r_t)^2).
    V_t comes from the objective's own ValueHead on the LM's last hidden state, built by `configure`;
    detach_value_head: whether it cuts the value loss off the LM (see ValueHead).
    """

    uses_hidden_states = True

    def __init__(self, alpha: float = 0.5, beta: float = 10.0, max_weight: float = 1000.0,
                 detach_value_head: bool = True):
        super().__init__()
        _require(0.0 <= alpha <= 1.0, "alpha", alpha, "in [0, 1] (it mixes the weighted LM loss and the value loss)")
        _require(beta > 0, "beta", beta, "> 0 (the temperature of exp(advantage / beta))")
        _require(max_weight > 0, "max_weight", max_weight, "> 0 (the cap on the token weights)")
        self.alpha, self.beta, self.max_weight = alpha, beta, max_weight
        self.detach_value_head = bool(detach_value_head)
        self.value_head: ValueHead | None = None

    def configure(self, hidden_size: int, task) -> None:
        self.value_head = ValueHead(hidden_size, detach=self.detach_value_head)

    def forward(self, logits, labels, scores, hidden=None):
        if self.value_head is None or hidden is None:
            raise ValueError(f"{type(self).__name__} needs configure() (its value head) and the LM's hidden states")
        return self.loss(logits, labels, scores, self.value_head(hidden))

    def loss(self, logits, labels, scores, values):
        """The loss given the values V_t, (B, T) in (-1, 0); values[:, :-1] is V_t for predicting token t+1."""
        ce, token_scores, token_values = _predicted_tokens(logits, labels, scores, values)
        reward = -token_scores
        advantage = reward - token_values.detach()  # the weights must not push gradient into the value head
        weight = torch.exp(advantage / self.beta).clamp(max=self.max_weight)  # exp is already >= 0
        weighted_loss = _mean(weight * ce)
        value_loss = _mean((token_values - reward) ** 2)
        # Kept even when 1 - alpha = 0: the value head then gets zero gradients rather than none, so DDP does not
        # see an unused parameter.
        loss = self.alpha * weighted_loss + (1 - self.alpha) * value_loss
        weight_max = weight.max() if weight.numel() else weight.new_zeros(())
        return loss, _detached({"loss": loss, "lm_loss": _mean(ce), "weighted_loss": weighted_loss,
                                "value_loss": value_loss, "weight_mean": _mean(weight), "weight_max": weight_max})


class RWR(AWR):
    """Reward-weighted regression (Peters & Schaal 2007, paper Sec. 2): AWR with alpha = 1.

    The value loss then has weight 0, so the zero-initialised head never trains and stays at V = -sigmoid(0) = -1/2:
    w_t = exp((r_t + 1/2) / beta), i.e. exp(r_t / beta) up to a constant factor.
    """

    def __init__(self, beta: float = 10.0, max_weight: float = 1000.0, detach_value_head: bool = True):
        # detach_value_head changes nothing here (the value loss has weight 0); accepted so configs can set it.
        super().__init__(alpha=1.0, beta=beta, max_weight=max_weight, detach_value_head=detach_value_head)


class ValueHead(nn.Module):
    """V_t = -sigmoid(w . h_t) in (-1, 0), the same range as the rewards r_t = -s_t (paper Sec. 2: a linear head on
    the LM's last hidden state, no bias, zero-initialised, so every V_t starts at -1/2).

    By default the hidden state is detached. AWR separates the policy (trained by the weighted likelihood) from the
    critic (trained by regression); if the value loss could flow into the shared trunk it would become an auxiliary
    task reshaping the LM's representations to predict rewards, and alpha would trade LM quality against value
    accuracy. With the detach, the head learns only from the value loss and the LM only from the weighted CE.
    `detach=False` is study A's published setting (its configs set the head's `is_detached: false`): the value loss
    then also trains the trunk.
    """

    def __init__(self, hidden_size: int, detach: bool = True):
        super().__init__()
        _require(hidden_size > 0, "hidden_size", hidden_size, "> 0")
        self.linear = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.detach = detach

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return -torch.sigmoid(self.linear(hidden.detach() if self.detach else hidden)).squeeze(-1)
