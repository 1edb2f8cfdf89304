"""The model's configuration, a leaf module: everything else in tinylm imports it, it imports nothing
from tinylm. GPTConfig is every setting that fixes a model's parameters and computation; check_int is
the one integer validator that every config (TrainConfig, DemoConfig, ...) shares."""
from dataclasses import asdict, dataclass, fields, is_dataclass

import numpy as np

DTYPES = ("float32", "float64")
MIXERS = ("attention", "ssm")
ATTENTIONS = ("naive", "flash", "auto")
# "auto" switches to flash attention from this many positions on. On the CPU both take about the
# same time (bench/attention_cpu.py: flash's forward 1.2–2× faster, forward+backward 0.6–1.3×), but
# the naive T×T matrices grow from 17 MiB per head at T = 1024 to 4.3 GiB at 16384; flash keeps O(T).
FLASH_MIN_T = 1024


def check_int(name, value, minimum=1):
    """ValueError naming `name` unless value is an integer (a bool is not) and >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive integer (>= 1)" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_ctx: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    dtype: str = "float32"
    mixer: str = "attention"     # what mixes tokens in each block: "attention", or "ssm" (see ssm.py)
    d_state: int = 16            # ssm only: state size N per channel
    d_conv: int = 4              # ssm only: causal conv width K
    expand: int = 2              # ssm only: E = expand·d_model inner channels
    attention: str = "auto"          # "naive" (T×T matrix), "flash" (blocked, O(T) memory) or "auto"

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "d_model", "d_state", "d_conv", "expand"):
            check_int(name, getattr(self, name))
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    def uses_flash(self, T, auto_from=FLASH_MIN_T):
        """Whether T positions (without a KV cache) go through flash attention; "auto" switches at
        auto_from (the model's layer set says where: layers.Layers.auto_flash_from)."""
        return self.attention == "flash" or (self.attention == "auto" and T >= auto_from)

    @property
    def head_dim(self):
        return self.d_model // self.n_head

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, obj, where="config"):
        """The config a to_dict() wrote, validated: see config_from_dict."""
        return config_from_dict(cls, obj, where)


def config_from_dict(cls, obj, where):
    """A config dataclass (GPTConfig, TrainConfig, ...) from a dict read from a file, e.g. JSON.
    Every field must be present with a value of its annotated type (a nested config dataclass is
    a dict, read the same way); anything else is one ValueError naming `where` and the key."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(obj).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(obj) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    values = {}
    for f in fields(cls):
        if f.name not in obj:
            raise ValueError(f"{where}: missing key {f.name!r}")
        value = obj[f.name]
        if is_dataclass(f.type):
            value = config_from_dict(f.type, value, f"{where}: {f.name}")
        elif not _has_type(value, f.type, f.default):
            raise ValueError(f"{where}: key {f.name!r} must be {f.type.__name__}"
                             f"{' or null' if f.default is None else ''}, got {value!r}")
        values[f.name] = value
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _has_type(value, kind, default):
    """JSON's view of a field's type: an int is a float too; a bool is neither; None only where
    None is the default."""
    if value is None:
        return default is None
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)
