"""Review 46: every random value that protects privacy or the server's model, audited for its source (the run's
secret key), its reuse and the soundness of its sampler.

Sources and reuse held up (DP noise, Poisson and shuffle batches, adaptive clipping's count, the federated secret A,
the dither, client-DP noise, local-DP clients' noise and batches all come from HMAC -> Philox keys drawn from the OS,
numbered so that no two computations share a draw). What failed is the last step of one sampler: client-level DP
adds its Gaussian noise in float32, the floating-point attack the DP-SGD path was fixed for (threat-model.md: "adding
bf16-rounded noise in bf16 made which outputs were possible depend on the data").
"""

import math

import numpy as np
import torch
from flwr.app import Error, Message

from slimtune.federated.strategy import FedLPP
from slimtune.federated.wire import FP32
from test_federated import instructions, make_cfg, reply, task_identity  # noqa: F401 (autouse fixture)


def test_client_level_dp_noise_does_not_rule_out_outputs_when_the_client_is_present(demo_paths):
    """bounds.aggregate releases mean + std * noise with the mean (the clipped updates / --clients), the noise and the
    sum all float32: `mean + std * torch.from_numpy(noise.normal(shape)).to(mean)`. Neighbours under client-level DP:
    D0 = the client's reply is lost (it counts as zero) and D1 = it sends d = 0.02 on every coordinate (norm 2 <= S =
    3), the other two clients failing in both. Under D1 each coordinate's mean is m ~ 0.0067, in [2^-8, 2^-7); an
    output |o| < m / 4 is then m + w with w a float32 near -m, an exact multiple of 2^-32. Under D0 the output is w
    itself, any float32. So an output below m / 4 that is not a multiple of 2^-32 proves the client absent (infinite
    privacy loss); with 10^4 coordinates a round shows about 13 outputs below m / 4 under D0. With a FedAvg server
    step at lr 1 from LoRA's B = 0 (and --bits 32) that output is what every client receives, and the final adapter of
    a one-round run. Adding the noise in float64 and rounding once to float32 (as DP-SGD does) makes such outputs
    possible under D1 as well."""
    d = 0.02
    m = float(torch.tensor(d, dtype=torch.float32) / 3)
    grid, below = 2.0 ** (math.floor(math.log2(m)) - 24), m / 4

    def events(present: bool, rounds: int = 4) -> int:
        cfg = make_cfg(demo_paths, bits=FP32, client_dp_clip=3.0, client_dp_noise=1.0, server_lr=1.0)
        count = 0
        for _ in range(rounds):
            strategy = FedLPP(cfg, {"w.lora_B.weight": torch.zeros(100, 100)})
            msgs = instructions(strategy)
            replies = [Message(Error(code=1, reason="crashed"), reply_to=msg) for msg in msgs]
            if present:
                replies[0] = reply(msgs[0], {"w.lora_B.weight": np.full((100, 100), d, dtype=np.float32)}, 10, 11)
            strategy.aggregate_train(1, replies)
            o = strategy.theta["w.lora_B.weight"].double()
            off_grid = (o.abs() < below) & (o != 0) & (torch.remainder(o, grid) != 0)
            count += int(off_grid.sum())
        return count

    absent, present = events(False), events(True)
    assert absent > 0  # the attacker's test fires on D0...
    assert present > 0, (f"{absent} released coordinates below m/4 off the 2^-32 grid without the client; none is "
                         "possible with it")
