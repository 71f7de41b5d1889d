import math

import pytest
import torch

from wq_ops.errors import ConfigError
from wq_ops.evaluate.perplexity import Join, join_text, perplexity


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1/vocab: perplexity = vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        class Out:
            logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        return Out()


def test_uniform_model_has_perplexity_vocab():
    r = perplexity(Uniform(50), torch.randint(0, 50, (1000,)), seq_len=100)
    assert r.n_windows == 10 and r.n_tokens == 1000 and abs(r.ppl - 50) < 1e-3
    assert perplexity(Uniform(50), torch.randint(0, 50, (1000,)), seq_len=100, max_windows=3).n_windows == 3


def test_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 11)

    class Fixed(torch.nn.Module):
        calls = 0

        def forward(self, ids):
            class Out:
                pass
            out = Out()
            out.logits = logits[Fixed.calls].unsqueeze(0)
            Fixed.calls += 1
            return out

    ids = torch.randint(0, 11, (16,))
    r = perplexity(Fixed(), ids, seq_len=8)
    nll = [torch.nn.functional.cross_entropy(logits[w, :-1], ids[w * 8 + 1:(w + 1) * 8]) for w in range(2)]
    assert abs(r.ppl - math.exp(float(sum(nll)) / 2)) < 1e-4


def test_join_and_short_text():
    assert join_text("a\nb\n", Join.WIKITEXT) == "a\n\n\nb\n"
    assert join_text("a\nb\n", Join.RAW) == "a\nb\n"
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(Uniform(5), torch.zeros(10, dtype=torch.long), seq_len=64)
