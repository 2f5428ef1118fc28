"""A SuperNode without its own data file (no `data-path`) trains a share of the file the server's config names.
A hostile server could name any readable table on the node (its own private data, another project's file) and learn
it from the node's updates. Such a node trains only on the file it pinned itself (`--node-config shared-data=PATH`);
Flower's simulation pins the file its user named (the nodes are the server's own processes)."""

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from slimtune import SlimtuneError
from test_federated import make_cfg, task_identity  # noqa: F401 (fixture)


def _round(cfg, node: dict) -> Message:
    from slimtune.federated.client_app import train
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state

    model, *_ = build_model(cfg)
    payload, _ = encode_state(lora_state(model), cfg.bits, cfg.block_size)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
                          "config": ConfigRecord({"server-round": 1, "slimtune-config": cfg.client_json()})})
    return train(Message(content=content, dst_node_id=7, message_type="train"),
                 Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))


def test_a_node_without_data_path_or_pin_refuses_the_file_the_server_names(demo_paths):
    cfg = make_cfg(demo_paths, bits=8, local_steps=1)
    with pytest.raises(SlimtuneError, match="shared-data"):
        _round(cfg, {"partition-id": 0, "num-partitions": 3})


def test_a_node_refuses_a_file_other_than_its_pin(demo_paths, tmp_path):
    other = tmp_path / "node_private.tsv"
    other.write_text(open(demo_paths[0]).read())
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, data=str(other))  # the server names the node's private table
    with pytest.raises(SlimtuneError, match="shared-data") as refused:
        _round(cfg, {"partition-id": 0, "num-partitions": 3, "shared-data": demo_paths[0]})
    assert str(other) not in str(refused.value) and "node_private" not in str(refused.value)


def test_a_node_trains_on_its_pinned_file_however_the_server_spells_it(demo_paths, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(demo_paths[0]))
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, data=os.path.basename(demo_paths[0]))  # relative
    reply = _round(cfg, {"partition-id": 0, "num-partitions": 3, "shared-data": os.path.abspath(demo_paths[0])})
    assert reply.content.array_records["arrays"]


def test_an_empty_pin_is_refused_as_a_node_setting(demo_paths):
    cfg = make_cfg(demo_paths, bits=8, local_steps=1)
    with pytest.raises(SlimtuneError, match="shared-data"):
        _round(cfg, {"partition-id": 0, "num-partitions": 3, "shared-data": ""})
