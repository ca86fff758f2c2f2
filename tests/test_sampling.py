"""Sampling on a tiny real GPT-2 (random weights): every rule checked against the model itself."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alignment.evaluation.sampling import _ngram_completions, _prompt_uniforms, _sorted_descending, sample

VOCAB, EOS, PAD = 32, 0, 31
PROMPTS = [[3, 4, 5], [7], [9, 10, 11, 12, 13, 14], [2, 8], [20, 21, 22, 23]]


@pytest.fixture(autouse=True)
def one_thread():
    # A tiny model is dominated by thread hand-offs: on a busy 2-core machine two threads make each op ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(token_bias: dict[int, float] | None = None) -> GPT2LMHeadModel:
    """A 2-layer GPT-2; `token_bias` adds a logit bias so the model strongly prefers (or avoids) given tokens."""
    torch.manual_seed(0)
    # A large init spread makes the next-token distribution peaked, so greedy choices are not near-ties.
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_layer=2, n_embd=16, n_head=2, initializer_range=0.3,
                        bos_token_id=EOS, eos_token_id=EOS)
    model = GPT2LMHeadModel(config)
    if token_bias:
        bias = torch.zeros(VOCAB)
        for token, value in token_bias.items():
            bias[token] = value
        model.lm_head.bias = torch.nn.Parameter(bias)
    return model.eval()  # so that reference forward passes in the tests run without dropout


def tiny_llama() -> LlamaForCausalLM:
    """Llama's rotary positions depend on position_ids too (the offline pretrained model, SmolLM2, is a Llama)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3,
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def run(model, prompts=PROMPTS, **kwargs):
    settings = dict(eos_id=EOS, pad_id=PAD, max_new_tokens=12) | kwargs
    return sample(model, prompts, **settings)


def greedy_without_cache(model, prompt, max_new_tokens, uncond=None, guidance_scale=1.0):
    """The reference: re-run the whole sequence each step (no cache, no padding) and take the argmax."""
    model.eval()
    sequence, uncond_sequence, generated = list(prompt), list(uncond or []), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logprobs = model(torch.tensor([sequence])).logits[0, -1].log_softmax(-1)
            if uncond is not None:
                uncond_logprobs = model(torch.tensor([uncond_sequence])).logits[0, -1].log_softmax(-1)
                logprobs = uncond_logprobs + guidance_scale * (logprobs - uncond_logprobs)
            token = int(logprobs.argmax())
            if token == EOS:
                break
            generated.append(token)
            sequence.append(token)
            uncond_sequence.append(token)
    return generated


@pytest.mark.parametrize("make_model", [tiny_model, tiny_llama])
def test_greedy_matches_argmax_loop_without_cache(make_model):
    model = make_model()
    samples = run(model, temperature=0, batch_size=len(PROMPTS))
    assert samples == [greedy_without_cache(model, prompt, 12) for prompt in PROMPTS]
    assert any(len(s) > 3 for s in samples)


def test_guided_greedy_matches_manual_guidance():
    model = tiny_model()
    uncond = [[1], [7, 6], [9], [2], [4, 5, 6, 7, 8, 9, 10]]  # lengths differ from the conditioned prompts
    samples = run(model, temperature=0, guidance_scale=2.5, uncond_prompts=uncond)
    assert samples == [greedy_without_cache(model, p, 12, u, 2.5) for p, u in zip(PROMPTS, uncond)]


def test_blocked_ids_never_generated_even_when_preferred():
    model = tiny_model({5: 20.0, 6: 20.0})
    free = run(model)
    assert sum(token in (5, 6) for s in free for token in s) > 30  # the model really wants them
    blocked = run(model, blocked_ids=[5, 6], min_new_tokens=12)
    assert all(token not in (5, 6) for s in blocked for token in s)
    assert all(len(s) == 12 for s in blocked)


def test_min_new_tokens_holds_eos_back_and_sampling_stops_at_eos():
    model = tiny_model({EOS: 20.0})  # EOS is almost certain at every step
    assert run(model) == [[]] * len(PROMPTS)
    samples = run(model, min_new_tokens=4)
    assert [len(s) for s in samples] == [4] * len(PROMPTS)  # EOS comes right after the minimum, and is cut off
    assert all(EOS not in s for s in samples)


def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny_model()
    assert run(model, seed=3) == run(model, seed=3)
    assert run(model, seed=3) != run(model, seed=4)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_samples_do_not_depend_on_batch_size(batch_size):
    model = tiny_model()
    assert run(model, batch_size=batch_size, top_p=0.9, seed=7) == run(model, batch_size=32, top_p=0.9, seed=7)


@pytest.mark.parametrize("make_model", [tiny_model, tiny_llama])
def test_left_padded_prompt_samples_what_it_samples_alone(make_model):
    model = make_model()
    short, long = [7, 8], [1, 2, 3, 4, 5, 6, 9]
    for settings in (dict(temperature=0), dict(temperature=1.0, seed=6)):
        alone = run(model, [short], **settings)[0]
        padded = run(model, [short, long], **settings)[0]
        assert padded == alone
    assert len(alone) == 12


def test_guidance_one_equals_plain_conditioning():
    model = tiny_model()
    plain = run(model, seed=2)
    assert run(model, seed=2, guidance_scale=1.0, uncond_prompts=[[1]] * len(PROMPTS)) == plain


def test_guidance_with_identical_streams_equals_plain_and_other_streams_differ():
    model = tiny_model()
    plain = run(model, seed=2)
    # l_uncond + g * (l_cond - l_uncond) = l_cond when both streams see the same tokens: checks the two-stream path.
    assert run(model, seed=2, guidance_scale=3.0, uncond_prompts=PROMPTS) == plain
    guided = run(model, seed=2, guidance_scale=3.0, uncond_prompts=[[1]] * len(PROMPTS))
    assert guided != plain


@pytest.mark.parametrize("settings", [dict(), dict(blocked_ids=[5, 6], min_new_tokens=4, top_p=0.9)])
def test_guidance_zero_samples_the_unconditional_prompts(settings):
    # l_uncond + 0 * (l_cond - l_uncond) = l_uncond: g = 0 ignores the conditioned stream, token for token,
    # also where blocked tokens are -inf in both streams (inf - inf must not turn into nan).
    model = tiny_model()
    uncond = [[1], [7, 6], [9], [2], [4, 5, 6, 7, 8, 9, 10]]
    unconditional = run(model, uncond, seed=5, **settings)
    assert run(model, seed=5, guidance_scale=0.0, uncond_prompts=uncond, **settings) == unconditional
    assert unconditional != run(model, seed=5, **settings)  # the conditioned prompts alone sample something else


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model()
    greedy = run(model, temperature=0)
    assert run(model, top_k=1, seed=9) == greedy
    assert run(model, top_p=1e-6, seed=9) == greedy


def test_top_k_restricts_to_the_k_best_tokens():
    model = tiny_model()
    prompt = [3, 4, 5]
    with torch.no_grad():
        best_two = set(model(torch.tensor([prompt])).logits[0, -1].topk(2).indices.tolist())
    samples = run(model, [prompt] * 40, top_k=2, temperature=5.0, max_new_tokens=1, seed=1)
    firsts = {s[0] if s else EOS for s in samples}
    assert firsts == best_two  # a high temperature would otherwise spread over the whole vocabulary


def test_no_repeat_ngram_size():
    model = tiny_model({5: 20.0})  # the model would emit 5 again and again
    assert any(s.count(5) > 1 for s in run(model))
    for s in run(model, no_repeat_ngram_size=1, min_new_tokens=12):
        assert len(set(s)) == len(s) == 12
    for s in run(model, no_repeat_ngram_size=2):
        bigrams = list(zip(s, s[1:]))
        assert len(set(bigrams)) == len(bigrams)


def test_no_repeat_ngram_prompt_also_bans_the_prompts_ngrams_but_not_its_leading_eos():
    model = tiny_model({5: 20.0, 6: 19.0})  # greedy picks 5, then 6 once 5 is banned
    prompts = [[EOS, 5, 6], [5, 9]]
    assert [s[:2] for s in run(model, prompts, no_repeat_ngram_size=1, temperature=0.0)] == [[5, 6], [5, 6]]
    banned = run(model, prompts, no_repeat_ngram_size=1, no_repeat_ngram_prompt=True, temperature=0.0)
    assert 5 not in banned[0] + banned[1] and 6 not in banned[0] and 9 not in banned[1]
    assert 6 in banned[1]  # [5, 9] bans 5 and 9 only
    ends = tiny_model({EOS: 20.0})  # EOS stays allowed although every prompt starts with it
    assert run(ends, [[EOS, 3]], no_repeat_ngram_size=1, no_repeat_ngram_prompt=True, temperature=0.0) == [[]]


def test_no_repeat_ends_a_sample_that_runs_out_of_tokens():
    model = tiny_model()
    samples = run(model, no_repeat_ngram_size=1, max_new_tokens=40, min_new_tokens=40, blocked_ids=[PAD])
    # 32 tokens minus EOS and PAD leave 30 distinct ones; then only EOS is left, so the sample ends.
    assert [len(s) for s in samples] == [30] * len(PROMPTS)


def test_ngram_completions_by_hand():
    tokens = [1, 2, 3, 1, 2]
    assert _ngram_completions(tokens, 1) == tokens
    assert _ngram_completions(tokens, 2) == [3]  # prefix (2,) was followed by 3
    assert _ngram_completions(tokens, 3) == [3]  # prefix (1, 2) was followed by 3
    assert _ngram_completions(tokens, 4) == []   # prefix (3, 1, 2) never seen before
    assert _ngram_completions([1], 3) == []


def test_restores_training_mode_and_checks_arguments():
    model = tiny_model()
    model.train()
    run(model, max_new_tokens=2)
    assert model.training
    assert run(model, max_new_tokens=0) == [[]] * len(PROMPTS)
    with pytest.raises(ValueError):
        run(model, guidance_scale=2.0)
    with pytest.raises(ValueError):
        run(model, [[1], []])


def test_nucleus_equals_the_full_sort():
    """Peaked and nearly flat rows: the most likely tokens up to top_p of the mass, as a full sort has them."""
    from alignment.evaluation.sampling import _nucleus

    torch.manual_seed(0)
    vocab = 1024
    logits = torch.randn(4, vocab)
    logits[0] *= 20  # peaked: the nucleus is a few tokens
    logits[1] *= 0.01  # nearly flat: the nucleus is most of the vocabulary
    probs = logits.softmax(-1)
    for top_p in (0.5, 0.9):
        kept, order = _nucleus(probs, top_p)
        full, full_order = probs.sort(-1, descending=True)
        expected = full.masked_fill((full.cumsum(-1) - full) >= top_p, 0.0)
        for row in range(4):
            got = dict(zip(order[row].tolist(), kept[row].tolist()))
            want = dict(zip(full_order[row].tolist(), expected[row].tolist()))
            assert {t for t, p in got.items() if p > 0} == {t for t, p in want.items() if p > 0}
            assert sum(got.values()) == pytest.approx(sum(want.values()), rel=1e-5)
    assert (_nucleus(probs, 0.9)[0][1] > 0).sum() > vocab // 2  # the flat row's nucleus is wide


def test_sorted_descending_by_hand():
    probs = torch.tensor([[0.1, 0.4, 0.1, 0.4, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [-0.0, 0.5, 0.0, 0.25, 0.25]])
    values, order = _sorted_descending(probs)
    # Largest first; equal probabilities in token order (so a seeded draw does not depend on the sort's whims).
    assert order.tolist() == [[1, 3, 0, 2, 4], [2, 0, 1, 3, 4], [1, 3, 4, 0, 2]]
    assert torch.equal(values, torch.tensor([[0.4, 0.4, 0.1, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0],
                                             [0.5, 0.25, 0.25, 0.0, 0.0]]))
    assert values.dtype == torch.float32 and order.dtype == torch.long


def test_prompt_uniforms_do_not_depend_on_how_many_are_drawn():
    uniforms = _prompt_uniforms(seed=3, index=2, steps=20)
    assert uniforms.shape == (20,) and ((0 <= uniforms) & (uniforms < 1)).all()
    # A batch draws max_new_tokens of them: a longer run of the same stream starts with the same numbers.
    assert torch.equal(_prompt_uniforms(seed=3, index=2, steps=64)[:20], uniforms)
    assert not torch.equal(_prompt_uniforms(seed=2, index=3, steps=20), uniforms)  # (seed, index) mixed, not added
