"""Study B's way of training, as a user would set it up with Hugging Face: `transformers.Trainer` on GPT-2's 50k
tokenizer with every example padded to 64 tokens, against the project's step (trained BPE, length-grouped batches).

Interleaved as benchmarks.loop does it: a TrainerCallback runs one project step after each Trainer step, and the
Trainer's time for a step is everything between the end of one project step and the start of the next. Both sides
train on the same sentences, batch by batch, so the unit is sentences (text) per second.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence

import torch

MAX_LENGTH = 64  # study B padded and cut every example to 64 GPT-2 tokens


def accelerate_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is None  # transformers.Trainer needs it


def padded_examples(tokenizer, sentences: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """EOS + sentence + EOS, padded (right) and cut to MAX_LENGTH, labels -100 on padding: study B's examples."""
    eos = tokenizer.eos_token
    encoded = tokenizer([eos + s + eos for s in sentences], padding="max_length", truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels)]


def trainer_vs_project(model, examples, optimizer: dict, batch_size: int, steps: int, bf16: bool,
                       project_step: Callable[[], int], warmup: int = 2) -> tuple[float, float]:
    """Sentences per second of the Trainer and of `project_step` (one step per call, returns its tokens)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    timings: dict[str, list[float]] = {"trainer": [], "project": []}

    class Interleave(TrainerCallback):
        resumed: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.resumed is not None and state.global_step > warmup:
                timings["trainer"].append(now - self.resumed)
            start = time.perf_counter()
            project_step()
            if state.global_step > warmup:
                timings["project"].append(time.perf_counter() - start)
            self.resumed = time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        # The same optimiser settings; a user's defaults otherwise (logging every 10 steps, no checkpoints).
        args = TrainingArguments(
            output_dir=folder, per_device_train_batch_size=batch_size, max_steps=steps + warmup + 1,
            learning_rate=optimizer["lr"], weight_decay=optimizer["weight_decay"], adam_beta1=optimizer["betas"][0],
            adam_beta2=optimizer["betas"][1], max_grad_norm=1.0, warmup_steps=1, lr_scheduler_type="cosine",
            logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16, seed=0,
            dataloader_num_workers=0, disable_tqdm=False)
        Trainer(model=model, args=args, train_dataset=examples, data_collator=default_data_collator,
                callbacks=[Interleave()]).train()
    n = len(timings["trainer"])
    return batch_size * n / sum(timings["trainer"]), batch_size * n / sum(timings["project"][:n])
