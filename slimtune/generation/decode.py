"""Text generation with `transformers.generate`: batched, left-padded prompts, greedy by default (beam search on
request), stopping at EOS or after `max_new_tokens`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.models.loading import bos_prefix


@dataclass
class DecodeSettings:
    max_new_tokens: int = 64
    num_beams: int = 1  # 1: greedy
    batch_size: int = 16
    max_length: int = 256  # prompt tokens kept (from the left)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, prompts: list[str], settings: DecodeSettings, device: str):
    """Left-padded, left-truncated prompts (BOS first where the model expects it)."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    return tokenizer([bos_prefix(tokenizer) + p for p in prompts], return_tensors="pt", padding=True, truncation=True,
                     max_length=settings.max_length, add_special_tokens=False).to(device)


def _generate(model, tokenizer, enc, settings: DecodeSettings, **extra) -> torch.Tensor:
    """Greedy or beam search (no sampling), stopping at EOS: the generated token ids only."""
    out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer),
                         temperature=None, top_p=None, top_k=None, **extra)
    return out[:, enc["input_ids"].shape[1]:]


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[str], settings: DecodeSettings = DecodeSettings(),
                   device: str = "cpu") -> list[str]:
    """The completion of each prompt (new tokens only, special tokens removed, whitespace stripped)."""
    was_training = model.training
    model.eval()
    outputs = []
    for i in range(0, len(prompts), settings.batch_size):
        new = _generate(model, tokenizer, _encode(tokenizer, prompts[i:i + settings.batch_size], settings, device),
                        settings)
        outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return outputs


def stream_generate(model, tokenizer, prompt: str, settings: DecodeSettings, device: str = "cpu") -> str:
    """Generate one completion, printing tokens to stdout as they come (transformers' TextStreamer)."""
    from transformers import TextStreamer

    model.eval()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        new = _generate(model, tokenizer, _encode(tokenizer, [prompt], settings, device), settings, streamer=streamer)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()
