"""Numbers read off a loss. A leaf module: it imports nothing from tinylm, so anything may use it."""
import math


def perplexity(loss):
    """exp(loss): the mean cross-entropy in nats turned back into "how many equally likely choices".

    A model that spreads its probability evenly over k tokens has loss ln k and perplexity k, so a
    byte-level model starts near 256 and a perfect one reaches 1. loss: a float (nats per token);
    an overflowing loss (> ~709 nats) gives inf.
    """
    return math.exp(loss) if loss < 709.0 else math.inf


def loss_text(loss):
    """A loss as the CLI prints it, with its perplexity beside it: "3.1967 (perplexity 24.45)"."""
    return f"{loss:.4f} (perplexity {perplexity(loss):.2f})"
