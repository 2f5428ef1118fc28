"""Label-word classification: cross-entropy over the label words' log-likelihood at the end of each prompt
(encoding, losses, evaluation)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimtune import SlimtuneError
from slimtune.data.tasks import Example, Task


def label_token_ids(tokenizer, task: Task) -> list[int]:
    """First token of each label word; the words must start with distinct tokens."""
    ids = []
    for word in task.label_words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens or tokens[0] == tokenizer.unk_token_id:
            raise SlimtuneError(f"task {task.name}: label word {word!r} is not in the model's vocabulary")
        if len(tokens) > 1:
            warnings.warn(f"label word {word!r} is {len(tokens)} tokens; it is scored by its first token "
                          f"{tokenizer.convert_ids_to_tokens(tokens[0])!r} only (choose single-token label words "
                          "to score the whole word)", stacklevel=2)
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise SlimtuneError(f"task {task.name}: label words {task.label_words} share their first token")
    return ids


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "EncodedBatch":
        return EncodedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.labels)))

    def __len__(self) -> int:
        return self.labels.shape[0]


def encode(tokenizer, examples: list[Example], max_length: int = 256) -> EncodedBatch:
    """Left-pad so every prompt ends at the last position (positions restart at each prompt's first real token).

    No examples (an empty Poisson batch) give an empty batch; the private optimizers then release noise alone.
    """
    if not examples:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return EncodedBatch(empty, empty.clone(), empty.clone(), torch.zeros(0, dtype=torch.long))
    from slimtune.models.loading import left_padded, pad_id, prompt_ids
    input_ids, mask = left_padded([prompt_ids(tokenizer, e.prompt, max_length) for e in examples], pad_id(tokenizer))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return EncodedBatch(input_ids, mask, positions, labels)


def label_logits(model, batch: EncodedBatch, label_ids: list[int]) -> torch.Tensor:
    """Logits of the label words at the last position: [batch, num_labels]."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, label_ids].float()


def per_example_losses(model, batch: EncodedBatch, label_ids: list[int]) -> torch.Tensor:
    """Cross-entropy of the true label word among the label words, one value per example.

    An empty batch (possible under Poisson sampling) gives an empty tensor without running the model.
    """
    if len(batch) == 0:
        return torch.zeros(0, device=batch.input_ids.device)
    return F.cross_entropy(label_logits(model, batch, label_ids), batch.labels, reduction="none")


@torch.inference_mode()
def evaluate(model, tokenizer, examples: list[Example], label_ids: list[int], batch_size: int = 32,
             device: str = "cpu", max_length: int = 256) -> dict:
    """Accuracy and mean loss over `examples` (dropout off), prompts truncated to `max_length` tokens as in training."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(examples), batch_size):
        batch = encode(tokenizer, examples[i:i + batch_size], max_length).to(device)
        logits = label_logits(model, batch, label_ids)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        correct += (logits.argmax(-1) == batch.labels).sum().item()
    model.train(was_training)
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def per_example_eval_losses(model, tokenizer, examples, label_ids, batch_size=32, device="cpu") -> torch.Tensor:
    """Per-example losses (for membership-inference checks)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            out.append(per_example_losses(model, encode(tokenizer, examples[i:i + batch_size]).to(device), label_ids))
    return torch.cat(out)
