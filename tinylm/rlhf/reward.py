"""The reward model: a copy of the LM whose output head is replaced by a scalar head, trained on
preference pairs with the Bradley–Terry loss.

    r(x, y) = z_last · reward_vector + reward_bias

z_last is the final-layer vector of the sequence's last real token (instruction + response): under
the causal mask only that position has seen the whole response. Sequences in a batch are
right-padded; the head reads z at position length − 1, so padding never changes a reward.

reward_bias never changes the Bradley–Terry loss (only differences r_w − r_l enter it), so training
leaves it at 0; its one use is centring (RewardModel.centre): after training, shift it so the
reference model's own responses score mean 0, as InstructGPT does. Then a positive reward means
"better than the reference usually does", which is what the raw rule reward × (−log p) needs.

Bradley–Terry: P(y_w preferred to y_l) = σ(r_w − r_l), so the loss over N pairs is

    L = (1/N) Σ −log σ(r_w − r_l) = (1/N) Σ softplus(−(r_w − r_l))
    ∂L/∂r_w = −σ(−(r_w − r_l)) / N,     ∂L/∂r_l = +σ(−(r_w − r_l)) / N
"""
import os
from typing import NamedTuple

import numpy as np

from ..core.backend import to_numpy
from ..core.layers import reward_head_backward, reward_head_forward
from ..core.model import GPT

HEAD_FILE = "reward_head.safetensors"


class Sequences(NamedTuple):
    """Right-padded token sequences: idx (N, T), lengths (N,) real tokens per row."""
    idx: np.ndarray
    lengths: np.ndarray


class SampleBatch(NamedTuple):
    """Prompt + response sequences, right-padded: idx (N, T), lengths (N,) real tokens per row,
    starts (N,) the index of each response's first token."""
    idx: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray

    @property
    def sequences(self):
        return Sequences(self.idx, self.lengths)


def pack(prompts, responses, pad_id=0):
    """Concatenate each prompt (1-D ids) with its response (1-D ids) and right-pad to one length
    -> SampleBatch."""
    seqs = [np.concatenate([p, r]).astype(np.int64) for p, r in zip(prompts, responses)]
    lengths = np.array([len(s) for s in seqs])
    idx = np.full((len(seqs), lengths.max()), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = s
    return SampleBatch(idx, lengths, np.array([len(p) for p in prompts]))


def stack_padded(idx_a, idx_b, pad_id=0):
    """Stack two right-padded batches (N_a, T_a) and (N_b, T_b) into one (N_a + N_b, max T)."""
    idx = np.full((len(idx_a) + len(idx_b), max(idx_a.shape[1], idx_b.shape[1])), pad_id, dtype=np.int64)
    idx[:len(idx_a), :idx_a.shape[1]], idx[len(idx_a):, :idx_b.shape[1]] = idx_a, idx_b
    return idx


class RewardCache(NamedTuple):
    trunk: object                   # GPT.hidden's cache
    head: object                    # reward_head_forward's cache


class RewardModel:
    """A GPT trunk (idx -> z) plus a scalar head. `params` holds the trunk's arrays (shared with
    `trunk.params`, so an optimizer step on one updates the other) and the two head parameters."""

    def __init__(self, trunk, reward_vector, reward_bias):
        self.trunk = trunk
        self.config = trunk.config
        self.layers = trunk.layers              # the trunk's layer set: its AdamW steps the head too
        xp, dtype = trunk.xp, trunk.config.dtype
        self.params = dict(trunk.params)
        self.params["reward_vector"] = xp.asarray(reward_vector, dtype=dtype)
        self.params["reward_bias"] = xp.asarray(reward_bias, dtype=dtype).reshape(())

    @classmethod
    def from_lm(cls, model):
        """Copy the LM's weights; the head starts at zero, so every reward starts at 0 and the
        Bradley–Terry loss at ln 2: the trunk's features, not a random head, decide what it learns."""
        return cls(model.copy(), np.zeros(model.config.d_model), 0.0)

    def check_vocab(self, policy_config):
        """The reward model reads the policy's token ids: both must share one vocabulary."""
        if policy_config.vocab_size != self.config.vocab_size:
            raise ValueError(f"reward model vocab_size={self.config.vocab_size} differs from the policy's "
                             f"vocab_size={policy_config.vocab_size}: they must share one tokenizer")

    def forward(self, idx, lengths):
        """idx (B, T) right-padded, lengths (B,) real tokens per row -> rewards (B,), cache."""
        lengths = np.asarray(lengths)
        if lengths.shape != (idx.shape[0],) or lengths.min() < 1 or lengths.max() > idx.shape[1]:
            raise ValueError(f"lengths must be (B,)={idx.shape[0]} values in 1..T={idx.shape[1]}, "
                             f"got {lengths.tolist()}")
        z, c_trunk = self.trunk.hidden(idx)
        r, c_head = reward_head_forward(z, self.trunk.xp.asarray(lengths - 1), self.params["reward_vector"],
                                        self.params["reward_bias"])
        return r, RewardCache(c_trunk, c_head)

    def backward(self, dr, cache):
        """Gradients of Σ dr · r for every parameter: the head's, then the trunk's (core backward)."""
        dz, dvector, dbias = reward_head_backward(dr, cache.head)
        grads = self.trunk.hidden_backward(dz, cache.trunk)
        grads["reward_vector"], grads["reward_bias"] = dvector, dbias
        return grads

    def rewards(self, idx, lengths):
        return to_numpy(self.forward(idx, lengths)[0])

    def centre(self, idx, lengths):
        """Shift reward_bias so these sequences (the reference model's responses) score mean 0.
        Differences between rewards, and so every pairwise preference, are unchanged.
        -> the shift applied (minus the old mean score)."""
        shift = -float(self.rewards(idx, lengths).astype(np.float64).mean())
        self.params["reward_bias"] += self.trunk.xp.asarray(shift, dtype=self.config.dtype)
        return shift

    # ------------------------------------------------------------------ checkpoints
    def save(self, path):
        """The trunk as a Hugging Face GPT-2 directory, the head beside it in its own file."""
        from safetensors.numpy import save_file
        self.trunk.save_pretrained(path)
        save_file({k: np.ascontiguousarray(to_numpy(self.params[k])).reshape(-1)
                   for k in ("reward_vector", "reward_bias")}, os.path.join(path, HEAD_FILE))

    @classmethod
    def load(cls, path, dtype="float32"):
        from safetensors.numpy import load_file
        head_path = os.path.join(path, HEAD_FILE)
        if not os.path.isfile(head_path):
            raise ValueError(f"reward model {path!r}: missing {HEAD_FILE} (is it an LM checkpoint?)")
        trunk = GPT.from_pretrained(path, dtype=dtype)
        head = load_file(head_path)
        if head["reward_vector"].shape != (trunk.config.d_model,):
            raise ValueError(f"reward model {path!r}: reward_vector has shape {head['reward_vector'].shape}, "
                             f"expected ({trunk.config.d_model},)")
        return cls(trunk, head["reward_vector"], head["reward_bias"][0])


# ----------------------------------------------------------------------------- Bradley–Terry
def sigmoid(x):
    """σ(x) = exp(−softplus(−x)), finite for any x."""
    return np.exp(-np.logaddexp(0.0, -x))


def bradley_terry_forward(r_w, r_l):
    """Mean −log σ(r_w − r_l) over pairs.   r_w, r_l (N,) -> loss, cache"""
    margin = np.asarray(r_w, dtype=np.float64) - np.asarray(r_l, dtype=np.float64)
    return float(np.logaddexp(0.0, -margin).mean()), margin


def bradley_terry_backward(margin):
    """-> dr_w (N,), dr_l (N,): pushes r_w up and r_l down, each by σ(−margin)/N."""
    push = sigmoid(-margin) / margin.size
    return -push, push


def pairwise_accuracy(r_w, r_l):
    """Fraction of pairs the reward model orders as the label does (ties count as wrong)."""
    return float(np.mean(np.asarray(r_w) > np.asarray(r_l)))


class PairLoss(NamedTuple):
    """bradley_terry_loss_and_grads' result: the loss, its gradients, and each pair's two rewards."""
    loss: float
    grads: dict
    r_chosen: np.ndarray
    r_rejected: np.ndarray


def bradley_terry_loss_and_grads(rm, chosen, rejected):
    """Loss and gradients for a batch of pairs; chosen / rejected are the packed sequences (idx and
    lengths, e.g. rlhf.PairBatch's halves). Both halves run through the trunk as one batch of 2N rows."""
    n = len(chosen.idx)
    r, cache = rm.forward(stack_padded(chosen.idx, rejected.idx), np.concatenate([chosen.lengths, rejected.lengths]))
    r = to_numpy(r)
    loss, margin = bradley_terry_forward(r[:n], r[n:])
    dr_w, dr_l = bradley_terry_backward(margin)
    dr = rm.trunk.xp.asarray(np.concatenate([dr_w, dr_l]), dtype=rm.config.dtype)
    return PairLoss(loss, rm.backward(dr, cache), r[:n], r[n:])
