"""The model card: the README.md of a saved model folder, so that whoever finds the folder (or the MLflow
artifact, or a hub upload of it) knows how it was trained and how to prompt it with its control tokens."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from alignment.model import GENERATION_KEYS
from alignment.task import Task


def model_card(cfg: DictConfig, task: Task, meta: dict, *, steps: int, parameters: int, eos_token: str,
               metrics: dict[str, float] | None = None, eval_table: str | None = None,
               command: str | None = None) -> str:
    """Markdown with a Hugging Face metadata header: training (task, objective, data, steps), control tokens,
    how to prompt, the generation defaults saved beside it, and the evaluation table when there is one."""
    stats = meta.get("stats", {})
    source = str(cfg.data.source.get("_target_", "")).split(".")[-1]
    sampling = OmegaConf.to_container(cfg.eval.sampling, resolve=True)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [alignment, control-tokens, {task.name}, {cfg.objective.name}]",
        "---",
        "",
        f"# {cfg.run_name}",
        "",
        f"A causal language model ({parameters:,} parameters) trained by the `alignment` project with the "
        f"**{cfg.objective.name}** objective on task **{task.name}**.",
        "",
        "## Training",
        "",
        f"- task: `{task.name}`, attributes {', '.join(f'`{name}`' for name in task.attributes)}, "
        f"control tokens on {', '.join(f'`{name}`' for name in task.tagged) or 'none (an untagged baseline)'}",
        f"- objective: `{cfg.objective.name}`",
        f"- data: `{source}`, {stats.get('train_examples', '?')} training examples, "
        f"{stats.get('train_tokens', '?')} tokens; {stats.get('val_examples', '?')} held out",
        f"- {steps} optimizer steps of {cfg.datamodule.batch_size} examples, seed {cfg.seed}",
    ]
    if metrics and "val/loss" in metrics:
        lines.append(f"- validation loss {metrics['val/loss']:.3f}")
    if command:
        lines.append(f"- reproduce: `{command}`")
    lines += ["", *_control_token_section(task, eos_token, cfg.eval), "",
              "## Generation defaults", "",
              "`generation_config.json` holds the evaluation's sampling (`eval.sampling`), so `model.generate()` and "
              "the pipeline sample as the evaluation did without arguments, and it lists the control tokens as "
              "`suppress_tokens`: they are never generated.", "",
              *(f"- {key}: {sampling[key]}" for key in GENERATION_KEYS if sampling.get(key) is not None), ""]
    if sampling.get("no_repeat_ngram_size"):
        lines += ["`no_repeat_ngram_size` is not in the generation config: transformers also counts the prompt's "
                  "n-grams, the evaluation only the generated ones.", ""]
    lines += ["## Evaluation", ""]
    if eval_table:
        lines += [f"{cfg.eval.mode.capitalize()} samples per conditioning, scored by the task's classifiers: the "
                  "share of generated sentences whose level contradicts the control tokens (a free attribute is "
                  "judged against its aligned level), in %, with 95% intervals. `g` is the classifier-free guidance "
                  "scale: g = 1 is the plain prompt above; g != 1 needs the project's sampler "
                  "(`alignment.evaluation.sampling`).", "",
                  "```", eval_table.strip(), "```"]
    else:
        lines.append("Not evaluated in this run (`python -m alignment.evaluate run=<run folder>` does it).")
    return "\n".join(lines) + "\n"


def _control_token_section(task: Task, eos_token: str, eval_cfg: DictConfig) -> list[str]:
    if not task.tagged:
        return ["## Prompting", "", "This model has no control tokens: prompt it with the EOS token "
                f"`{eos_token}` (the document separator) and, optionally, the start of a text."]
    lines = ["## Control tokens", "", "| attribute | tokens (lowest score first) | aligned |", "|---|---|---|"]
    lines += [f"| {name} | {' '.join(f'`{t}`' for t in task.attributes[name].tokens)} | "
              f"`{task.attributes[name].aligned}` |" for name in task.tagged]
    tokens = "".join(task.combination_tokens(task.aligned_levels))
    placement = ("the EOS token, the control tokens, then the start of a text" if eval_cfg.mode == "prompted"
                 and eval_cfg.control_placement == "before" else "the EOS token then the control tokens")
    example = f"{eos_token}{tokens}" + (" The weather" if eval_cfg.mode == "prompted" else "")
    lines += ["", "## Prompting", "",
              f"Training put the control tokens, one per attribute in the order {', '.join(task.tagged)}, "
              f"before each {task.placement}. Prompt with {placement}, e.g. for the aligned text:", "",
              "```python", "from transformers import pipeline", "",
              'generate = pipeline("text-generation", model="<this folder>")',
              f"print(generate({example!r})[0][\"generated_text\"])", "```", "",
              f"Training left {task.untagged_fraction:.0%} of the {task.placement}s without tokens: a prompt with "
              "one token per tagged attribute is what the model knows best."]
    return lines
