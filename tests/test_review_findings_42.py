"""Review 42: a hostile participant (a client against the server and the other clients, a server against a node),
and the day's changes (federated/partition.py places rows one by one; deployment.shard writes shards with
QUOTE_MINIMAL). Every test here failed on the code it was written against."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from slimtune import SlimtuneError
from test_federated import make_cfg, task_identity  # noqa: F401

BIG = 10**8  # floats: no LoRA entry of a tiny model, nor a round's padding, comes near it


def _round(cfg, node: dict, payload: dict | None = None, **sent) -> Message:
    """One round on a node whose server sends the JSON it likes (`sent` over an honest client_json()) and, where
    given, its own broadcast arrays."""
    from slimtune.federated.client_app import train
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state

    if payload is None:
        model, *_ = build_model(replace(cfg, eval_data=""))
        payload, _ = encode_state(lora_state(model), cfg.bits, cfg.block_size)
    doc = {**json.loads(cfg.client_json()), **sent}
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
                          "config": ConfigRecord({"server-round": 1, "slimtune-config": json.dumps(doc)})})
    return train(Message(content=content, dst_node_id=7, message_type="train"),
                 Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))


@pytest.fixture
def allocations(monkeypatch):
    """Every torch.zeros / Tensor.new_zeros of more than BIG elements is recorded and refused (MemoryError) instead
    of being allocated: what a node or server would try to allocate, without filling this machine's memory."""
    asked = []
    real_zeros, real_new_zeros = torch.zeros, torch.Tensor.new_zeros

    def numel(args):
        size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
        return int(np.prod([int(s) for s in size], dtype=object))

    def zeros(*args, **kwargs):
        if args and numel(args) > BIG:
            asked.append(numel(args))
            raise MemoryError(f"asked for {numel(args)} elements")
        return real_zeros(*args, **kwargs)

    def new_zeros(self, *args, **kwargs):
        if args and numel(args) > BIG:
            asked.append(numel(args))
            raise MemoryError(f"asked for {numel(args)} elements")
        return real_new_zeros(self, *args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)
    return asked


# -- (2) hostile server: block_size is the one size setting no node cap bounds ----------------------------------------

def test_a_capped_node_never_allocates_the_block_size_a_server_names(demo_paths, allocations, task_identity):  # noqa: F811
    """A node that set every cap (max-local-steps, max-batch-size, max-length, max-lora-r: 'a hostile server cannot
    keep it training forever or fill its memory') decodes the broadcast with the server's block_size, checked only as
    >= 16. quantization.dequantize pads every LoRA entry to a whole block (torch.zeros(block_size - n)), so a server
    that sends block_size = 2**40 (and a one-scale payload that fits it: the shapes decode_state checks follow the
    block size) makes the node allocate 2**40 floats, 4 TiB, for a tensor of a few hundred values (quantize pads the
    same way on a node that uploads quantized deltas). Fixed: the node refuses the round in one line, or decodes
    without a block's padding."""
    from slimtune.federated.model import build_model, lora_state
    cfg = make_cfg(demo_paths, bits=4, local_steps=1, eval_data="")
    model, *_ = build_model(cfg)
    huge = 2**40
    payload = {}
    for name, value in lora_state(model).items():  # what decode_state accepts for block_size 2**40
        payload[f"{name}::codes"] = np.zeros(-(-value.numel() * cfg.bits // 8), np.uint8)
        payload[f"{name}::scales"] = np.ones(1, np.float16)
    node = {"data-path": demo_paths[0], "max-local-steps": 5, "max-batch-size": 8, "max-length": 256, "max-lora-r": 8}
    try:
        _round(cfg, node, payload, block_size=huge)
    except SlimtuneError:
        pass  # refused in one line: a fix
    except MemoryError:
        pass  # the allocation the fixture refused: recorded below
    assert not allocations, f"the node tried to allocate {allocations[0]:.3g} floats for block_size {huge}"


def test_a_block_size_the_server_cannot_encode_is_refused_before_any_work(demo_paths, allocations):
    """The same setting on the server: `slimtune federate --block-size 1099511627776` passes every check (low=16, no
    high), then the first broadcast pads each LoRA entry to 2**40 values (quantize: flat.new_zeros(pad)), a
    MemoryError traceback (or the OOM killer) after the model and the data were loaded, not one line naming
    --block-size. Fixed: validate() bounds it, or quantize pads to no more than the tensor needs."""
    from slimtune.federated.strategy import FedLPP
    cfg = make_cfg(demo_paths, bits=4, block_size=2**40)
    try:
        cfg.validate()
    except SlimtuneError as exc:
        assert "block-size" in str(exc) or "block_size" in str(exc), str(exc)
        return
    theta = {"l.lora_A.weight": torch.randn(4, 16), "l.lora_B.weight": torch.zeros(16, 4)}
    try:
        FedLPP(cfg, theta).broadcast()
    except MemoryError:
        pass
    assert not allocations, f"the server tried to allocate {allocations[0]:.3g} values for one broadcast"


# -- (2) hostile server: one round it sends locks a node's ledger for good --------------------------------------------

def test_a_round_at_an_unaccountable_noise_does_not_lock_the_node_out_of_every_later_private_round(
        demo_paths, tmp_path, task_identity):  # noqa: F811
    """A private node with its own data keeps a ledger beside it, 'never reset'. validate() takes any finite
    local_dp_noise > 0, and a node floor local-dp-noise=1.0 is met by 1e200; the round is recorded before its first
    step, its steps run, then node_epsilon composes the ledger and the accountant cannot price noise 1e200 ('too
    small to account (epsilon overflows)'): the round fails. From then on every private round on this data, at any
    settings, from any server, composes that entry and fails the same way (with a local-dp-epsilon budget, the budget
    check fails instead): one round of a hostile (or mistyped) server takes the node out of private training until
    its operator edits the ledger by hand. Fixed: a noise the accountant cannot price is refused before the round
    is recorded (validate, or the node's check under the ledger's lock)."""
    data = tmp_path / "node.tsv"
    shutil.copy(demo_paths[0], data)
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, eval_data="", local_optimizer="dp-sgd", batch_size=4)
    node = {"data-path": str(data), "local-dp-noise": 1.0}
    try:
        _round(cfg, node, local_dp_noise=1e200)
    except SlimtuneError:
        pass  # the hostile round itself may fail or be refused
    try:
        reply = _round(cfg, node)  # an honest round at noise 1.0, the node's own floor
    except SlimtuneError as exc:
        pytest.fail(f"an honest private round after the hostile one failed: {exc}")
    assert not reply.has_error()


# -- (3) the deployment's shards: every node must read back exactly the rows it was given ------------------------------

def _shards_read_back(source: Path, nodes: int, tmp_path: Path) -> list:
    from slimtune.data.readers import read_rows
    from slimtune.federated.deployment import shard, shard_rows
    rows, _ = shard_rows(source, nodes)
    work = tmp_path / "work"
    work.mkdir()
    back = []
    for path in shard(source, nodes, work):
        try:
            back += [row for _, row in read_rows(str(path))[0]]
        except SlimtuneError as exc:
            pytest.fail(f"a node cannot read the shard it was given: {exc}")
    key = lambda row: json.dumps(row, sort_keys=True)  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, rows))


def test_a_shard_holding_a_quoted_multi_line_row_is_read_by_its_node(tmp_path):
    """A quoted TSV whose first row's sentence runs over two lines is read as quoted (deployment_config accepts it):
    read raw, another row (a quoted tab) has too many fields, so the file is unambiguous. shard() puts the two rows on
    different nodes, and the node holding the multi-line row alone reads a file both readings take: readers refuses
    it ('a quoted field runs over several lines, and read as raw TSV the file holds other rows: quote the file
    fully'), so that node fails every round of a run the script had checked and started."""
    source = tmp_path / "train.tsv"
    source.write_text('sentence\tlabel\n"line one\nline two"\t1\n"has\ttab"\t0\n', encoding="utf-8")
    _shards_read_back(source, 2, tmp_path)


def test_a_shard_keeps_a_field_that_holds_a_carriage_return(tmp_path):
    """QUOTE_MINIMAL quotes a field holding the delimiter, the quote or a character of the lineterminator ("\\n"),
    not a lone "\\r" (Python 3.11's csv): a quoted CSV field 'first\\rsecond' is written bare, and the node (which reads
    with newline="", as csv requires) reads it as two rows, 'first' without a label and 'second' with this row's
    label: a row the file does not hold."""
    source = tmp_path / "train.csv"
    source.write_bytes(b'sentence,label\n"first\rsecond",1\n"other",0\n')
    _shards_read_back(source, 1, tmp_path)


# -- (3) the row-by-row partition: one row must not move the others -----------------------------------------------------

def test_one_row_of_a_label_no_other_row_has_moves_no_other_row(tmp_path):
    """partition.py: 'one row added to or removed from the file moves no other row between clients: a client's share
    of a neighbouring file is a neighbouring share'. The proportions are drawn for the labels present in the file,
    and the draw kept is the first whose mean share over those labels is large enough: a row whose label no other row
    has changes that set, so the kept attempt, so every label's proportions. Split as client_app._setup splits (a
    custom task with three labels, 60 + 40 rows of two of them, then one row of the third): ~70 of the 100 other rows
    change clients."""
    from slimtune.federated.config import partition_rows
    from slimtune.federated.model import federated_objective
    from slimtune.federated.partition import dirichlet_partition

    rows = [(f"row number {i}", i % 2) for i in range(100)]
    cfg = make_cfg(("", ""), task="custom", template="{text} It was", label_words="0=bad,1=good,2=odd",
                   num_clients=4, dirichlet_alpha=0.5, seed=0)

    def placement(extra: list) -> dict:
        path = tmp_path / f"train{len(extra)}.tsv"
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows + extra), encoding="utf-8")
        objective = federated_objective(replace(cfg, data=str(path)))
        labels, keys, num_labels = partition_rows(objective, objective.load(str(path), "train")[0])
        parts = dirichlet_partition(labels, keys, cfg.num_clients, cfg.dirichlet_alpha, cfg.seed,
                                    num_labels=num_labels)
        return {i: client for client, part in enumerate(parts) for i in part if i < len(rows)}

    without, with_one = placement([]), placement([("the only odd row", 2)])
    moved = sum(without[i] != with_one[i] for i in range(len(rows)))
    assert moved == 0, f"adding one row moved {moved} of the other {len(rows)} rows to another client"
