"""The generation objective: per-example mean token cross-entropy over the completion tokens only.

For example i with prompt tokens p and completion tokens c (EOS appended),

    L_i = -(1/|c|) sum_t log p_theta(c_t | p, c_<t),

prompt and padding positions are masked out (label -100). One scalar per example, so DPZero's per-example clipping,
DP-SGD's per-example gradients and every ZO optimizer use it unchanged.

Logits are computed only from the shortest prompt's last position on (`logits_to_keep`): the vocabulary projection
over prompt tokens is neither computed nor stored.

Length budget (`max_length`): the completion keeps up to max_length - min(|p|, max_length // 2) tokens (truncated from
the right, with a warning: the model would never learn to end those targets), the prompt keeps its last tokens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class GenerationBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # input_ids with prompt and padding set to -100
    keep: int = 0  # logits needed: the last `keep` positions (from the shortest prompt's last token on); 0: all

    def to(self, device) -> "GenerationBatch":
        return GenerationBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                         self.labels)), self.keep)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def token_ids(tokenizer, example, max_length: int) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids + EOS, whether the completion was truncated)."""
    from slimtune.models.loading import keep_last, prompt_ids
    prompt = prompt_ids(tokenizer, example.prompt)
    completion = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    budget = max_length - min(len(prompt), max_length // 2)
    truncated = len(completion) > budget
    completion = completion[:budget]
    keep = max_length - len(completion)
    return (keep_last(tokenizer, prompt, keep) if keep > 0 else []), completion, truncated


def encode_generation(tokenizer, examples: list, max_length: int = 256, warn: bool = True) -> GenerationBatch:
    """Right-padded prompt + completion ids with completion-only labels. An empty list gives an empty batch."""
    if not examples:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return GenerationBatch(empty, empty.clone(), empty.clone(), empty.clone())
    seqs, truncated = [], 0
    for e in examples:
        p, c, cut = token_ids(tokenizer, e, max_length)
        seqs.append((p, c))
        truncated += cut
    if truncated and warn:
        warnings.warn(f"{truncated} of {len(examples)} targets in a batch were truncated to fit --max-length "
                      f"{max_length}; raise --max-length to train on whole targets", stacklevel=2)
    width = max(len(p) + len(c) for p, c in seqs)
    from slimtune.models.loading import pad_id
    pad = pad_id(tokenizer)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = width - max(min(len(p) for p, _ in seqs), 1) + 1  # no logits over the prompts (memory and time)
    return GenerationBatch(ids, mask, positions, labels, keep)


def token_nll(model, batch: GenerationBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL of the completion tokens, number of completion tokens), one of each per example."""
    width = batch.input_ids.shape[1]
    keep = batch.keep or width
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False, logits_to_keep=keep).logits  # positions width - keep .. width - 1
    shift_logits, shift_labels = logits[:, :-1].float(), batch.labels[:, width - keep + 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")
    counts = (shift_labels != IGNORE).sum(-1)
    return nll.sum(-1), counts


def per_example_generation_losses(model, batch: GenerationBatch) -> torch.Tensor:
    """L_i: mean token cross-entropy of each example's completion (empty batch: empty tensor, no forward)."""
    if len(batch) == 0:
        return torch.zeros(0, device=batch.input_ids.device)
    total, counts = token_nll(model, batch)
    return total / counts.clamp(min=1)


@torch.inference_mode()
def generation_loss(model, tokenizer, examples: list, max_length: int = 256, batch_size: int = 16,
                    device: str = "cpu") -> dict:
    """Token-level mean NLL over every example's completion and its perplexity exp(loss)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = encode_generation(tokenizer, examples[i:i + batch_size], max_length, warn=False).to(device)
        nll, counts = token_nll(model, batch)
        total, tokens = total + nll.sum().item(), tokens + counts.sum().item()
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
