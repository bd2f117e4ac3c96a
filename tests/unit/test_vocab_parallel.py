"""Token logprobs and entropy from (TP-sharded) logits, against plain torch, in a world of one."""

import pytest
import torch

from megatron_r3.grpo.losses import entropy_from_logits


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/unit/conftest.py


def test_logprobs_and_entropy_match_torch_and_leave_logits_untouched():
    from megatron_r3.grpo.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs

    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    for temperature in (1.0, 0.7):
        logp = vocab_parallel_logprobs(logits, labels, temperature)
        want = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logp, want, rtol=0, atol=1e-5)
        assert torch.equal(logits, before), "megatron's cross entropy must not modify the caller's logits"
        entropy = vocab_parallel_entropy(logits, temperature)
        torch.testing.assert_close(entropy, entropy_from_logits(logits / temperature), rtol=0, atol=1e-5)


def test_padded_vocabulary_columns_get_no_probability():
    from megatron_r3.grpo.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs

    logits = torch.randn(1, 3, 12, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[0, 5, 9]])
    logp = vocab_parallel_logprobs(logits, labels, vocab_size=10)
    want = torch.log_softmax(logits[..., :10], dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(vocab_parallel_entropy(logits, vocab_size=10), entropy_from_logits(logits[..., :10]),
                               rtol=0, atol=1e-5)
