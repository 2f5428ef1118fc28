"""Compatibility: the names this module used to hold, now in the modules by concern (config, model, wire).
New code imports from those modules."""

from slimtune.federated.config import SERVER_ONLY, FederatedConfig  # noqa: F401
from slimtune.federated.model import (build_model, federated_objective, is_trained, load_lora_state,  # noqa: F401
                                      lora_names, lora_state, secret_seed, uploaded)
from slimtune.federated.wire import FP32, decode_state, encode_state  # noqa: F401
