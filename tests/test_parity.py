"""tinylm against the outside references, in the spirit of llm.c's test_gpt2: transformers'
GPT2LMHeadModel built from tinylm's config and weights (random init, nothing downloaded), and the
RLHF losses written again in torch autograd. float64 throughout, so any difference above rounding is
a bug, not precision.

Needs the parity extra (`pip install '.[parity]'`: CPU torch and transformers). Without it these tests
skip with the reason; .ci/run sets TINYLM_REQUIRE_PARITY=1, under which a missing reference is an
error, so CI can never skip them. test_parity_holds_from_an_installed_copy reruns this file from
outside the repository, against the installed tinylm.
"""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.core.generate import generate
from tinylm.core.hf import hf_config
from tinylm.core.optim import adamw_init, adamw_step, clip_grad_norm, decays
from tinylm.rlhf.reward import RewardModel, Sequences, bradley_terry_loss_and_grads
from tinylm.rlhf.policy import Preferences, dpo_loss_and_grads, policy_loss_and_grads, response_targets, sequence_logprobs


def reference_library(name):
    if os.environ.get("TINYLM_REQUIRE_PARITY"):
        return importlib.import_module(name)        # CI: a missing reference fails; it never skips
    return pytest.importorskip(name, reason=f"the parity tests need {name}: pip install '.[parity]'")


torch = reference_library("torch")
transformers = reference_library("transformers")
F = torch.nn.functional

CONFIG = GPTConfig(vocab_size=61, n_ctx=24, n_layer=2, n_head=2, d_model=16, dtype="float64")
RTOL_VALUES, RTOL_GRADS = 1e-12, 1e-10


def tinylm_model(seed=0, scale=0.3):
    """A random GPT whose weights are pushed far from init (init's tiny stds make every token
    nearly equally likely: a comparison of near-uniform logits proves little)."""
    model = GPT(CONFIG, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for p in model.params.values():
        p += rng.normal(size=p.shape) * scale
    return model


def gpt2_config(config, **overrides):
    """transformers' GPT2Config for a tinylm config: what tinylm writes as config.json."""
    settings = {k: v for k, v in hf_config(config).items() if k not in ("architectures", "torch_dtype")}
    return transformers.GPT2Config(**dict(settings, **overrides))


def hf_model(model):
    """transformers' GPT-2 holding exactly `model`'s weights (eager attention, float64, eval mode)."""
    hf = transformers.GPT2LMHeadModel(gpt2_config(model.config, attn_implementation="eager"))
    hf = hf.to(torch.float64).eval()
    state = {"transformer." + k: torch.from_numpy(v.copy()) for k, v in model.numpy_params().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)   # the head is tied
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def tokens(rng, batch, length):
    return rng.integers(0, CONFIG.vocab_size, size=(batch, length))


def torch_lm_loss(hf, seq):
    """Mean next-token cross-entropy of seq (B, T) in float64 (transformers' own `labels=` loss
    casts the logits to float32 first: 3e-8 off), and the logits."""
    logits = hf(torch.from_numpy(seq)).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.from_numpy(seq[:, 1:]).reshape(-1)), logits


def torch_grads(hf):
    """{tinylm name: gradient} of the trunk's parameters (the tied head's share is in wte's)."""
    return {name: p.grad.numpy() for name, p in hf.transformer.named_parameters()}


def assert_close(ours, theirs, rtol, what, floor=1e-300):
    """Relative to the largest magnitude of the reference, so each element is judged on its tensor's
    scale; `floor` is the scale of a tensor whose exact value is 0."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    scale = max(np.abs(theirs).max(), floor)
    err = np.abs(ours - theirs).max() / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def assert_grads_close(ours, theirs, rtol=RTOL_GRADS):
    """Each gradient on its own scale, except one that is 0 in exact arithmetic (the reward model's
    ln_f.bias and reward_bias: Bradley–Terry sees only differences of rewards), judged on a
    millionth of the largest gradient."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    largest = max(np.abs(g).max() for g in theirs.values())
    for name in theirs:
        assert_close(ours[name], theirs[name], rtol, f"gradient of {name}", floor=1e-6 * largest)


# ----------------------------------------------------------------------------- the language model
def test_logits_loss_and_every_gradient_equal_transformers():
    model = tinylm_model()
    hf = hf_model(model)
    seq = tokens(np.random.default_rng(0), 3, CONFIG.n_ctx)        # transformers sees all n_ctx
    idx, targets = seq[:, :-1], seq[:, 1:]
    loss, grads = model.loss_and_grads(idx, targets)
    torch_loss, logits = torch_lm_loss(hf, seq)
    torch_loss.backward()
    assert_close(model.forward(idx), logits[:, :-1].detach().numpy(), RTOL_VALUES, "logits")
    assert_close(loss, torch_loss.item(), RTOL_VALUES, "loss")
    assert_grads_close(grads, torch_grads(hf))


def test_the_comparison_catches_a_wrong_gradient():
    """The gradient check above fails on a 1e-8 relative error planted in one layer's gradient."""
    model = tinylm_model()
    hf = hf_model(model)
    seq = tokens(np.random.default_rng(0), 2, 9)
    _, grads = model.loss_and_grads(seq[:, :-1], seq[:, 1:])
    torch_lm_loss(hf, seq)[0].backward()
    grads["h.1.mlp.c_fc.bias"] *= 1 + 1e-8
    with pytest.raises(AssertionError, match="h.1.mlp.c_fc.bias"):
        assert_grads_close(grads, torch_grads(hf))


def test_ten_adamw_steps_with_clipping_equal_torch():
    """tinylm's clip + AdamW against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW, the same
    batches, decay on the same tensors: losses and weights equal at every step."""
    lr, weight_decay, max_norm = 1e-2, 0.1, 0.5
    model = tinylm_model()
    hf = hf_model(model)
    named = dict(hf.transformer.named_parameters())
    groups = [{"params": [p for n, p in named.items() if decays(n, p.shape)], "weight_decay": weight_decay},
              {"params": [p for n, p in named.items() if not decays(n, p.shape)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    state = adamw_init(model.params)
    rng = np.random.default_rng(1)
    clipped = 0
    for step in range(10):
        seq = tokens(rng, 4, 13)
        loss, grads = model.loss_and_grads(seq[:, :-1], seq[:, 1:])
        norm = clip_grad_norm(grads, max_norm)
        adamw_step(model.params, grads, state, lr, weight_decay=weight_decay)
        opt.zero_grad()
        torch_loss = torch_lm_loss(hf, seq)[0]
        torch_loss.backward()
        torch_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), max_norm)
        opt.step()
        assert_close(loss, torch_loss.item(), RTOL_GRADS, f"loss at step {step}")
        assert_close(norm, torch_norm.item(), RTOL_GRADS, f"gradient norm at step {step}")
        clipped += norm > max_norm
        for name, p in named.items():
            assert_close(model.params[name], p.detach().numpy(), RTOL_GRADS, f"{name} after step {step}")
    assert clipped >= 5                              # the clip did act on most steps


# ----------------------------------------------------------------------------- the reward model
def reward_model(seed=0):
    rm = RewardModel.from_lm(tinylm_model(seed))
    rng = np.random.default_rng(seed + 7)
    rm.params["reward_vector"][:] = rng.normal(size=CONFIG.d_model)
    rm.params["reward_bias"][...] = 0.3
    return rm


def torch_reward(hf, rm, idx, lengths, side):
    """The scalar head on the last real token, from transformers' final hidden states, with the
    padding on the given side (left: positions counted from the first real token)."""
    vector = torch.tensor(rm.params["reward_vector"], requires_grad=True)
    bias = torch.tensor(float(rm.params["reward_bias"]), dtype=torch.float64, requires_grad=True)
    B, T = idx.shape
    real = np.arange(T)[None, :] < lengths[:, None]
    if side == "left":
        shifted = np.zeros_like(idx)
        for b in range(B):
            shifted[b, T - lengths[b]:] = idx[b, :lengths[b]]
        idx, real = shifted, real[:, ::-1].copy()
    mask = torch.from_numpy(real.astype(np.int64))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    z = hf.transformer(torch.from_numpy(idx), attention_mask=mask, position_ids=positions).last_hidden_state
    last = torch.from_numpy(lengths - 1) if side == "right" else torch.full((B,), T - 1)
    return z[torch.arange(B), last] @ vector + bias, vector, bias


def ragged(rng, batch, T):
    lengths = rng.integers(2, T + 1, size=batch)
    lengths[0] = T
    idx = tokens(rng, batch, T)
    idx[np.arange(T)[None, :] >= lengths[:, None]] = 0                  # right padding, as tinylm packs
    return Sequences(idx, lengths)


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_on_the_last_real_token_equals_a_torch_head(side):
    rm = reward_model()
    hf = hf_model(rm.trunk)
    idx, lengths = ragged(np.random.default_rng(2), 5, 11)
    theirs, _, _ = torch_reward(hf, rm, idx, lengths, side)
    assert_close(rm.rewards(idx, lengths), theirs.detach().numpy(), RTOL_VALUES, f"rewards, {side} padding")


def test_bradley_terry_loss_and_gradients_equal_torch():
    rm = reward_model()
    hf = hf_model(rm.trunk)
    rng = np.random.default_rng(3)
    chosen, rejected = ragged(rng, 4, 10), ragged(rng, 4, 8)
    loss, grads, _, _ = bradley_terry_loss_and_grads(rm, chosen, rejected)
    idx = np.zeros((8, 10), dtype=np.int64)
    idx[:4], idx[4:, :8] = chosen.idx, rejected.idx
    r, vector, bias = torch_reward(hf, rm, idx, np.concatenate([chosen.lengths, rejected.lengths]), "right")
    torch_loss = -F.logsigmoid(r[:4] - r[4:]).mean()
    torch_loss.backward()
    assert_close(loss, torch_loss.item(), RTOL_VALUES, "Bradley–Terry loss")
    assert_grads_close(grads, dict(torch_grads(hf), reward_vector=vector.grad.numpy(), reward_bias=bias.grad.numpy()))


# ----------------------------------------------------------------------------- the policy losses
def torch_token_logprobs(hf, inputs, targets):
    """log π(targets | inputs) per position, 0 where the target is −1."""
    logp = F.log_softmax(hf(torch.from_numpy(inputs)).logits, -1)
    t = torch.from_numpy(targets)
    return torch.gather(logp, 2, t.clamp(min=0)[..., None])[..., 0] * (t >= 0)


def preferences(rng, n):
    lengths = lambda lo, hi: [int(x) for x in rng.integers(lo, hi, size=n)]   # noqa: E731
    prompts = [rng.integers(0, CONFIG.vocab_size, size=m) for m in lengths(2, 6)]
    chosen = [rng.integers(0, CONFIG.vocab_size, size=m) for m in lengths(1, 7)]
    rejected = [rng.integers(0, CONFIG.vocab_size, size=m) for m in lengths(1, 7)]
    return Preferences(prompts, chosen, rejected, [("instruction", i) for i in range(n)])


def test_dpo_loss_and_gradients_equal_torch():
    beta = 0.5
    policy, reference = tinylm_model(0), tinylm_model(1)
    hf, hf_ref = hf_model(policy), hf_model(reference)
    batch = preferences(np.random.default_rng(4), 5).packed()
    loss, grads = dpo_loss_and_grads(policy, batch, sequence_logprobs(reference, batch), beta)[:2]
    def logp(model, sequences):
        return torch_token_logprobs(model, *response_targets(*sequences, batch.starts)).sum(1)
    with torch.no_grad():
        ref_w, ref_l = logp(hf_ref, batch.chosen), logp(hf_ref, batch.rejected)
    torch_loss = -F.logsigmoid(beta * ((logp(hf, batch.chosen) - ref_w) - (logp(hf, batch.rejected) - ref_l))).mean()
    torch_loss.backward()
    assert_close(loss, torch_loss.item(), RTOL_VALUES, "DPO loss")
    assert_grads_close(grads, torch_grads(hf))


def test_leave_one_out_policy_loss_and_gradients_equal_torch():
    """loss = Σ_i,t w_i,t · (−log π(y_t)), w = ((r_i − b_i) − β·Σ_{s≥t} ℓ_s) / N with b the mean of the
    other k − 1 rewards of the same prompt and ℓ = log π − log π_ref (no gradient through w)."""
    beta, k = 0.2, 3
    policy, reference = tinylm_model(0), tinylm_model(1)
    hf, hf_ref = hf_model(policy), hf_model(reference)
    rng = np.random.default_rng(5)
    idx, lengths = ragged(rng, 2 * k, 12)
    starts = rng.integers(1, 4, size=2 * k)
    inputs, targets = response_targets(idx, lengths, starts)
    rewards = rng.normal(size=2 * k)
    loss, grads, _, advantages = policy_loss_and_grads(policy, reference, inputs, targets, rewards, k, beta, "loo")

    groups = torch.from_numpy(rewards).reshape(-1, k)
    baseline = ((groups.sum(1, keepdim=True) - groups) / (k - 1)).reshape(-1)
    mask = torch.from_numpy(targets >= 0).double()
    logp = torch_token_logprobs(hf, inputs, targets)
    with torch.no_grad():
        ell = (logp - torch_token_logprobs(hf_ref, inputs, targets)) * mask
        kl_to_go = ell.flip(1).cumsum(1).flip(1) * mask
        w = ((torch.from_numpy(rewards) - baseline)[:, None] - beta * kl_to_go) * mask / len(rewards)
    torch_loss = (w * -logp).sum()
    torch_loss.backward()
    assert_close(advantages, (torch.from_numpy(rewards) - baseline).numpy(), RTOL_VALUES, "advantages")
    assert_close(loss, torch_loss.item(), RTOL_VALUES, "policy loss")
    assert_grads_close(grads, torch_grads(hf))


# ----------------------------------------------------------------------------- checkpoints both ways
def greedy_hf(hf, prompt, n):
    eot = CONFIG.vocab_size - 1
    with torch.no_grad():
        return hf.generate(torch.from_numpy(prompt), max_new_tokens=n, do_sample=False, eos_token_id=eot,
                           pad_token_id=eot, attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()


def test_transformers_loads_what_tinylm_saves_and_decodes_the_same_greedy_tokens(tmp_path):
    model = tinylm_model()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    prompt = tokens(np.random.default_rng(6), 3, 5)
    with torch.no_grad():
        assert_close(model.forward(prompt), hf(torch.from_numpy(prompt)).logits.numpy(), RTOL_VALUES, "logits")
    ours = generate(model, prompt, 15, temperature=0, eot_id=CONFIG.vocab_size - 1)   # the KV-cache sampler
    theirs = greedy_hf(hf, prompt, 15)
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(ours[:, 5:])) > 3                                            # not one repeated id


def test_tinylm_loads_what_transformers_saves(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(gpt2_config(CONFIG, initializer_range=0.3))
    hf = hf.double().eval()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    prompt = tokens(np.random.default_rng(7), 2, 6)
    with torch.no_grad():
        assert_close(model.forward(prompt), hf(torch.from_numpy(prompt)).logits.numpy(), RTOL_VALUES, "logits")
    np.testing.assert_array_equal(generate(model, prompt, 12, temperature=0, eot_id=CONFIG.vocab_size - 1),
                                  greedy_hf(hf, prompt, 12))


# ----------------------------------------------------------------------------- perplexity of a file
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# 29 byte characters (Ġ is the space, Ċ the newline) and 31 merges: with <|endoftext|>, 61 ids.
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
               ("Ġ", "a"), ("Ġ", "s"), ("e", "n"), ("a", "t"), ("o", "r"), ("Ġ", "w"), ("e", "s"), ("i", "s"),
               ("Ġ", "o"), ("n", "d"), ("Ġa", "nd"), ("Ġ", "i"), ("e", "d"), ("o", "u"), ("i", "t"), ("a", "r"),
               ("Ġ", "h"), ("h", "a"), ("l", "l"), ("Ġ", "b"), ("Ġ", "m"), ("s", "t"), ("Ġ", "f")]


def write_tiny_bpe(path):
    """vocab.json + merges.txt of CONFIG.vocab_size ids for text of lower-case letters, spaces,
    full stops and newlines."""
    vocab = {c: i for i, c in enumerate(LETTERS + "ĠĊ.")}
    for a, b in TINY_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == CONFIG.vocab_size
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES), encoding="utf-8")


def hf_perplexity(hf, ids, stride):
    """Hugging Face's perplexity guide: windows of n_positions every `stride`, labels -100 on the
    tokens an earlier window scored, transformers' own `labels=` loss (a mean over the window). One
    change: each window's mean is weighted by the labels it really averaged, (labels[1:] != -100);
    the guide subtracts one per window for the shift, which is right for the first window only (in
    the others labels[0] is -100 already)."""
    encodings = torch.from_numpy(ids)[None]
    max_length, seq_len = hf.config.n_positions, encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()       # the labels shift by one
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [None, 5, CONFIG.n_ctx])
def test_eval_of_a_hugging_face_directory_equals_transformers_perplexity(tmp_path, stride):
    """`tinylm eval` on a directory transformers wrote (float32, as the guide runs it) against the
    guide's loop on the same tokens: loss and perplexity to 1e-4 relative, the same token count."""
    from tinylm.commands.eval import evaluate
    from tinylm.core.tokenizer import load_tokenizer
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(gpt2_config(CONFIG, initializer_range=0.3)).eval().save_pretrained(tmp_path / "gpt2")
    write_tiny_bpe(tmp_path / "gpt2")
    rng = np.random.default_rng(3)
    words = ["the", "and", "a", "sister", "ran", "far", "into", "hills", "with", "her", "old", "boat"]
    text = "".join(" ".join(rng.choice(words, size=9)) + ".\n" for _ in range(12))
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    ours = evaluate(str(tmp_path / "gpt2"), str(tmp_path / "text.txt"), stride)
    ids = load_tokenizer(str(tmp_path / "gpt2")).encode(text)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    loss, n_tokens = hf_perplexity(hf, ids, stride or CONFIG.n_ctx // 2)
    assert len(ids) > 4 * CONFIG.n_ctx and ours["tokens"] == n_tokens
    assert_close(ours["loss"], loss, 1e-4, "loss")
    assert_close(ours["perplexity"], np.exp(loss), 1e-4, "perplexity")


def test_a_fine_tuned_gpt2_exports_back_to_transformers_with_the_same_logits(tmp_path):
    """transformers save_pretrained -> `tinylm pretrain --init-from` (20 steps, float64) -> `tinylm
    export-hf` -> transformers from_pretrained: the fine-tuned weights, not the starting ones, and
    the same logits as tinylm's run."""
    from tinylm.train.checkpoint import load_model
    from tinylm.cli import main
    torch.manual_seed(2)
    start = transformers.GPT2LMHeadModel(gpt2_config(CONFIG, initializer_range=0.3)).double().eval()
    start.save_pretrained(tmp_path / "gpt2")
    write_tiny_bpe(tmp_path / "gpt2")
    (tmp_path / "text.txt").write_text("the sister ran far into the hills.\n" * 30, encoding="utf-8")
    assert main(["pretrain", "--init-from", str(tmp_path / "gpt2"), "--data", str(tmp_path / "text.txt"),
                 "--out", str(tmp_path / "run"), "--steps", "20", "--dtype", "float64", "--batch-size", "4",
                 "--warmup", "2", "--quiet"]) == 0
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported", dtype=torch.float64).eval()
    ours, _, _ = load_model(str(tmp_path / "run"))
    prompt = tokens(np.random.default_rng(8), 2, CONFIG.n_ctx)
    with torch.no_grad():
        theirs, before = (m(torch.from_numpy(prompt)).logits.numpy() for m in (hf, start))
    assert_close(ours.forward(prompt), theirs, RTOL_VALUES, "logits")
    assert np.abs(theirs - before).max() > 1e-2 * np.abs(before).max()          # it did move


# ----------------------------------------------------------------------------- installed, not the checkout
@pytest.mark.skipif(bool(os.environ.get("TINYLM_PARITY_INSTALLED")), reason="already the installed copy's run")
def test_parity_holds_from_an_installed_copy(tmp_path):
    """This file again, run from a folder outside the repository: there `import tinylm` is the
    installed package (site-packages' copy in CI, which installs non-editable), kernels included."""
    shutil.copy(__file__, tmp_path / "test_parity_installed.py")
    env = dict(os.environ, TINYLM_PARITY_INSTALLED="1")
    where = subprocess.run([sys.executable, "-c", "import tinylm, tinylm.kernels.launch as k; "
                            "print(tinylm.__file__); print(k.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package, kernels = where.stdout.split()
    assert os.path.dirname(kernels) == os.path.join(os.path.dirname(package), "kernels") or kernels.startswith(repo)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_parity_installed.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and re.match(r"\d+ passed, 1 skipped in ", summary), run.stdout + run.stderr   # this test
