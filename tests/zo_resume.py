"""Shared by the optimizer tests: stop a run, save weights and optimizer state through torch.save, resume."""

import io

import torch


def resumed(make, loss, steps_before: int, steps_after: int):
    """`make()` -> (w, b, optimizer), fresh and identical each call. Runs steps_before steps, saves, rebuilds, loads,
    runs steps_after more; returns the resumed (w, b, optimizer)."""
    w2, b2, o2 = make()
    for _ in range(steps_before):
        o2.step(lambda: loss(w2, b2))
    buffer = io.BytesIO()
    torch.save({"opt": o2.state_dict(), "w": w2.detach(), "b": b2.detach()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    w3, b3, o3 = make()
    with torch.no_grad():
        w3.copy_(saved["w"])
        b3.copy_(saved["b"])
    o3.load_state_dict(saved["opt"])
    for _ in range(steps_after):
        o3.step(lambda: loss(w3, b3))
    return w3, b3, o3
