"""TrainConfig: every setting that decides a pretraining run's numbers, how flat settings (the CLI's
flags) apply to it, and which of them --resume may change."""
import math
from dataclasses import asdict, dataclass, field, fields, replace

from ..core.config import GPTConfig, check_int, config_from_dict
from ..core.optim import Schedule
from ..core.tokenizer import ByteTokenizer


def default_model():
    """The built-in run's model: 4 layers, 128 wide, byte-level, 128 positions."""
    return GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_ctx=128, n_layer=4, n_head=4, d_model=128)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers. Saved in each checkpoint; --resume reuses it.

    The defaults are the built-in run: a 4-layer, 128-wide byte-level model on the standard
    library's source, sized to give recognisable Python within 10 minutes on 2 CPU cores."""
    data: str = None                 # UTF-8 text file; None = the built-in corpus (data.py)
    init_from: str = None            # start from this model (Hugging Face GPT-2 dir, run, checkpoint); None = GPT-2's init
    model: GPTConfig = field(default_factory=default_model)
    batch_size: int = 8
    max_steps: int = 1500
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0             # GPT-2's embedding, attention and residual dropout while training
    val_fraction: float = 0.1
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, GPTConfig):
            raise ValueError(f"model must be a GPTConfig, got {self.model!r}")
        for name in ("batch_size", "max_steps", "eval_every", "eval_batches", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        for name, low in (("lr", None), ("min_lr", 0), ("weight_decay", 0), ("grad_clip", None)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if low is None else value >= low)):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'}, got {value!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (1 would drop everything), got {self.dropout!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (both excluded), got {self.val_fraction!r}")

    @classmethod
    def from_dict(cls, obj, where="train_config"):
        """The settings a checkpoint saved; those added after it was written take their defaults,
        which are what such a run used (no init_from, no dropout)."""
        if isinstance(obj, dict):
            obj = {**{k: v for k, v in ADDED_LATER.items() if k not in obj}, **obj}
        return config_from_dict(cls, obj, where)

    def warnings(self):
        """Settings that are legal but almost surely not meant (they train silently otherwise)."""
        notes = []
        if self.warmup_steps > self.max_steps:
            notes.append(f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}: the learning "
                         "rate never reaches its peak")
        if self.min_lr > self.lr:
            notes.append(f"min_lr={self.min_lr} exceeds lr={self.lr}: the cosine schedule rises instead of decaying")
        return notes

    def schedule(self):
        """Warm-up over warmup_steps, then cosine from lr to min_lr at max_steps."""
        return Schedule(self.lr, self.max_steps, self.warmup_steps, self.min_lr)


# Settings that runs saved before they existed (issue 23) lack, with the value those runs had.
ADDED_LATER = {"init_from": None, "dropout": 0.0}
MODEL_SETTINGS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")
# What a model started --init-from keeps from it (dtype and the attention algorithm may change).
SHAPE_SETTINGS = tuple(name for name in MODEL_SETTINGS if name not in ("dtype", "attention"))


def with_settings(cfg, settings):
    """cfg with flat settings applied: GPTConfig's names (n_layer, mixer, ...) go to cfg.model,
    the others to cfg itself; an unknown name is a ValueError."""
    model = {k: v for k, v in settings.items() if k in MODEL_SETTINGS}
    own = {k: v for k, v in settings.items() if k not in model}
    unknown = sorted(set(own) - ({f.name for f in fields(TrainConfig)} - {"model"}))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}")
    return replace(cfg, model=replace(cfg.model, **model), **own)


# Settings --resume may change: they don't alter the numbers of the steps already planned
# (max_steps does change the cosine schedule from the resume point on; that is the point of it).
# lr and min_lr may change too: lowering them is how a run that diverged goes on from its last
# good checkpoint.
RESUMABLE_CHANGES = ("max_steps", "eval_every", "checkpoint_every", "lr", "min_lr")


def resumed_config(saved, given, out_dir):
    """The saved TrainConfig, with the few settings --resume may change taken from `given` (only
    the fields the user set explicitly are passed in; others would change the run's numbers)."""
    changed = with_settings(saved, given)
    before, after = flat_settings(saved), flat_settings(changed)
    refused = sorted(k for k in before if before[k] != after[k] and k not in RESUMABLE_CHANGES)
    if refused:
        k = refused[0]
        raise ValueError(f"--resume continues the run saved in {out_dir!r}, which has {k}={before[k]!r}; "
                         f"{k}={after[k]!r} would change it (only {', '.join(RESUMABLE_CHANGES)} may change)")
    return changed


def flat_settings(cfg):
    """A TrainConfig as one flat dict, its model's fields beside its own (as the flags see it)."""
    return {**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "model"}, **asdict(cfg.model)}
