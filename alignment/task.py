"""The task: what is scored, how scores become levels and control tokens, and what evaluation asks for.

A task is a list of *attributes* (toxicity, sentiment, PII, ...). Each attribute has a scorer,
ascending thresholds that cut its scores into levels, and one control token per level. A task
*tags* some of its attributes: their tokens go before every sentence (or once per document), in
the task's order, e.g. `<|nontoxic|><|pos|>The service was great.` Every attribute is scored
either way, so untagged baselines are judged on the same scale.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def resolve_threshold(spec: Any, scores: np.ndarray) -> float:
    """A threshold is a number, or `{quantile: q}`: the q-quantile of `scores` (the corpus).

    Quantiles make thresholds portable across scorers: study A's 0.00056 means something for
    Detoxify only, while "the 10% most toxic sentences" means the same for any classifier.
    """
    if isinstance(spec, (Mapping, DictConfig)):
        if set(spec.keys()) != {"quantile"} or not 0.0 <= float(spec["quantile"]) <= 1.0:
            raise ValueError(f"A threshold must be a number or {{quantile: q}} with q in [0, 1], got {dict(spec)}")
        if len(scores) == 0:
            raise ValueError("Cannot take a quantile threshold of an empty corpus")
        return float(np.quantile(scores, float(spec["quantile"])))
    return float(spec)


@dataclass
class Attribute:
    """One scored property of text with graded levels (2 for the studies; any number, as in SteerLM)."""

    name: str
    scorer: Any                  # alignment.scorers.base.Scorer
    thresholds: list             # ascending; numbers or {quantile: q} until resolve() is called
    tokens: list[str]            # one control token per level, lowest score first
    aligned: str                 # the level we want (the token of the aligned level)
    untagged_fraction: float = 0.0
    judge: Any = None            # optional independent scorer, used only to judge samples
    precomputed: str | None = None  # name of scores a source ships (pile-detoxify: "detoxify_original") to reuse

    def __post_init__(self):
        if len(self.tokens) != len(self.thresholds) + 1:
            raise ValueError(
                f"attribute '{self.name}': {len(self.thresholds)} thresholds make {len(self.thresholds) + 1} levels, "
                f"so it needs that many tokens; got {len(self.tokens)}: {self.tokens}")
        if self.aligned not in self.tokens:
            raise ValueError(f"attribute '{self.name}': aligned={self.aligned!r} is not one of its tokens "
                             f"{self.tokens}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"attribute '{self.name}': tokens must be distinct, got {self.tokens}")
        if not 0.0 <= self.untagged_fraction <= 1.0:
            raise ValueError(f"attribute '{self.name}': untagged_fraction must be in [0, 1], "
                             f"got {self.untagged_fraction}")
        self._check_order()

    def _check_order(self):
        numbers = [t for t in self.thresholds if not isinstance(t, (Mapping, DictConfig))]
        if len(numbers) == len(self.thresholds) and any(a >= b for a, b in zip(numbers, numbers[1:])):
            raise ValueError(f"attribute '{self.name}': thresholds must be strictly ascending, got {numbers}")

    @property
    def level_names(self) -> list[str]:
        """Metric-safe names of the levels: `<|nontoxic|>` -> `nontoxic` (MLflow keys allow no `<|>`)."""
        return [t.strip("<|>") for t in self.tokens]

    @property
    def aligned_level(self) -> int:
        return self.tokens.index(self.aligned)

    def levels(self, scores: np.ndarray) -> np.ndarray:
        """Level of each score: a score <= thresholds[i] (and above the previous one) is level i."""
        return np.searchsorted(np.asarray(self.thresholds, dtype=float), np.asarray(scores, dtype=float), side="left")


@dataclass
class Task:
    name: str
    attributes: dict[str, Attribute]
    tagged: list[str]
    placement: str = "sentence"
    untagged_fraction: float = 0.01
    combine: str = "max"
    threshold: Any = None  # on the combined misalignment (unlikelihood); a number or {quantile: q} until resolved
    eval_unit: str = "sentence"  # what evaluation scores: generated sentences, or whole samples (code)
    # Training units per combination of the tagged attributes' levels, {(level, ...): count}; set from the build.
    level_counts: dict | None = None
    config: dict | None = field(default=None, repr=False, compare=False)  # what it was built from: the cache key

    def __post_init__(self):
        unknown = [a for a in self.tagged if a not in self.attributes]
        if unknown:
            raise ValueError(f"task '{self.name}': tagged attributes {unknown} are not among {list(self.attributes)}")
        if self.placement not in ("sentence", "document"):
            raise ValueError(f"task '{self.name}': placement must be 'sentence' or 'document', got {self.placement!r}")
        if self.eval_unit not in ("sentence", "sample"):
            raise ValueError(f"task '{self.name}': eval_unit must be 'sentence' or 'sample', got {self.eval_unit!r}")
        if self.combine not in ("max", "mean"):
            raise ValueError(f"task '{self.name}': combine must be 'max' or 'mean', got {self.combine!r}")
        tokens = self.control_tokens
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"task '{self.name}': two tagged attributes share a control token: {tokens}")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Task":
        attributes = {}
        for name, a in cfg.attributes.items():
            attributes[name] = Attribute(
                name=name, scorer=instantiate(a.scorer), judge=instantiate(a.judge) if a.get("judge") else None,
                thresholds=list(OmegaConf.to_container(a.thresholds)), tokens=list(a.tokens), aligned=a.aligned,
                untagged_fraction=float(a.get("untagged_fraction", 0.0)), precomputed=a.get("precomputed"))
        return cls(name=cfg.name, attributes=attributes, tagged=list(cfg.tagged), placement=cfg.placement,
                   untagged_fraction=float(cfg.untagged_fraction), combine=cfg.combine,
                   eval_unit=cfg.get("eval_unit", "sentence"),
                   threshold=OmegaConf.to_container(cfg.threshold) if isinstance(cfg.threshold, DictConfig)
                   else cfg.threshold, config=OmegaConf.to_container(cfg, resolve=True))

    def resolve(self, scores: Mapping[str, np.ndarray], combined: np.ndarray) -> "Task":
        """This task with its quantile thresholds turned into numbers: each attribute's on its `scores`, the
        task's own `threshold` on `combined` (the training sentences' combined misalignment)."""
        attributes = {name: replace(a, thresholds=[resolve_threshold(t, scores[name]) for t in a.thresholds])
                      for name, a in self.attributes.items()}
        threshold = None if self.threshold is None else resolve_threshold(self.threshold, combined)
        return replace(self, attributes=attributes, threshold=threshold)

    def as_trained(self, meta: dict, tagging: bool) -> "Task":
        """This task as a build trained it (`meta`: the build's dataset.json): the thresholds it resolved, the
        training mix of tagged levels, and no tagged attribute unless the objective tagged. (`.get`: run folders
        saved before the build wrote `threshold` still evaluate.)"""
        attributes = {name: replace(a, thresholds=meta["thresholds"][name]) for name, a in self.attributes.items()}
        return replace(self, attributes=attributes, threshold=meta.get("threshold"),
                       tagged=self.tagged if tagging else [],
                       level_counts={tuple(int(level) for level in key.split("-")): count
                                     for key, count in meta.get("level_counts", {}).items()})

    @property
    def aligned_levels(self) -> dict[str, int]:
        """The aligned level of every tagged attribute: the conditioning a user gives to get aligned text."""
        return {name: self.attributes[name].aligned_level for name in self.tagged}

    @property
    def control_tokens(self) -> list[str]:
        return [t for name in self.tagged for t in self.attributes[name].tokens]

    def combined_misalignment(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """One misalignment in [0, 1] per sentence for the objectives that need a single score.

        Default `max`: a sentence is as misaligned as its worst attribute, so a polite insult does
        not average out. Each scorer maps its own units to [0, 1] first (Scorer.misalignment).
        """
        per_attr = np.stack([a.scorer.misalignment(np.asarray(scores[n])) for n, a in self.attributes.items()])
        return per_attr.max(0) if self.combine == "max" else per_attr.mean(0)

    def tag_prefixes(self, levels: Mapping[str, np.ndarray], rng: np.random.Generator) -> list[list[str]]:
        """Control tokens for each unit (sentence or document), given the levels of every attribute.

        A unit loses all its tokens with probability `untagged_fraction` (this is what teaches the
        unconditional mode that classifier-free guidance contrasts with), and each attribute's token
        alone with that attribute's `untagged_fraction` (study A's drop_token_fraction).
        """
        n = len(next(iter(levels.values()))) if levels else 0
        keep_all = rng.random(n) >= self.untagged_fraction
        keep = {name: rng.random(n) >= self.attributes[name].untagged_fraction for name in self.tagged}
        prefixes = []
        for i in range(n):
            prefixes.append([self.attributes[name].tokens[levels[name][i]] for name in self.tagged
                             if keep_all[i] and keep[name][i]])
        return prefixes

    def combinations(self) -> list[dict[str, int]]:
        """Every conditioning to evaluate: none, each level of each tagged attribute alone, and every
        full combination of the tagged attributes' levels (e.g. 1 + 5 + 6 for toxicity x 3 sentiments)."""
        combos: list[dict[str, int]] = [{}]
        if len(self.tagged) > 1:
            combos += [{name: lvl} for name in self.tagged for lvl in range(len(self.attributes[name].tokens))]
        ranges = [range(len(self.attributes[name].tokens)) for name in self.tagged]
        combos += [dict(zip(self.tagged, lv)) for lv in itertools.product(*ranges)] if self.tagged else []
        return combos

    def complete(self, combo: Mapping[str, int], n: int, rng: np.random.Generator) -> list[dict[str, int]]:
        """n full combinations that agree with `combo`; the tagged attributes it leaves free are drawn from the
        training corpus's joint distribution of levels given the ones it fixes (i.e. marginalised over)."""
        if all(name in combo for name in self.tagged):
            return [dict(combo)] * n
        if not self.level_counts:
            raise ValueError(f"task '{self.name}': no level counts from the dataset build to draw the missing "
                             "control tokens from; rebuild the dataset, or evaluate with eval.missing=untagged")
        options = [(levels, count) for levels, count in self.level_counts.items()
                   if all(levels[i] == combo[name] for i, name in enumerate(self.tagged) if name in combo)]
        if not options:
            raise ValueError(f"task '{self.name}': no training sentence has levels {dict(combo)} to condition on")
        counts = np.array([count for _, count in options], dtype=float)
        picks = rng.choice(len(options), size=n, p=counts / counts.sum())
        return [dict(zip(self.tagged, (int(level) for level in options[i][0]))) for i in picks]

    def combination_tokens(self, combo: Mapping[str, int]) -> list[str]:
        return [self.attributes[name].tokens[combo[name]] for name in self.tagged if name in combo]

    def combination_name(self, combo: Mapping[str, int]) -> str:
        """A metric-safe name: `<|nontoxic|><|pos|>` -> `nontoxic-pos` (MLflow keys allow no `<|>`)."""
        return "-".join(t.strip("<|>") for t in self.combination_tokens(combo)) or "none"
