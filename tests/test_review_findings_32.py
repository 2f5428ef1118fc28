"""Review 32: today's changes (client-level DP's fixed denominator, the shared-data pin, FederatedConfig.from_server,
the node caps and pins, check_conversation, check_outside, the generation adapter's recorded prompt) read as a careless
user and as an honest deployment. Every test here failed on the code it was written against."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from test_bad_input_table import TINY, cli
from test_federated import make_cfg, task_identity  # noqa: F401 (fixture)


# -- `flwr run .` on Flower's default local federation: the documented path, now refused on every node ----------------

def test_flwr_run_on_the_default_local_federation_trains(demo_paths, monkeypatch):
    """docs/how-to/federated.md: '`flwr run .` runs the app on Flower's default local federation (2 SuperNodes)'. That
    runs pyproject's ClientApp (slimtune.federated.client_app:app, not simulation_app) on nodes whose node config is
    what Flower's simulation runtime gives them (vce_api: partition-id and num-partitions, nothing else). The
    shared-data pin refuses every round there (no shared-data=...), so the run 'trained nothing'; the tests' own
    InProcessGrid wraps every node in pinned_to, which is why none saw it."""
    import tomllib
    from pathlib import Path

    from slimtune.federated.client_app import app
    from slimtune.federated.model import build_model, lora_state
    from slimtune.federated.wire import encode_state

    components = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"]["components"]
    assert components["clientapp"] == "slimtune.federated.client_app:app"  # what `flwr run .` loads
    cfg = make_cfg(demo_paths, bits=8, local_steps=1, num_clients=2)
    model, *_ = build_model(cfg)
    payload, _ = encode_state(lora_state(model), cfg.bits, cfg.block_size)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}),
                          "config": ConfigRecord({"server-round": 1, "slimtune-config": cfg.client_json()})})
    import slimtune.federated.client_app as client_app
    monkeypatch.setattr(client_app, "in_simulation_engine", lambda: True)  # a worker of Flower's Ray engine (fix)
    node_config = {"partition-id": 0, "num-partitions": 2}  # Flower's simulation runtime (vce_api), as given
    out = app(Message(content=content, dst_node_id=7, message_type="train"),
              Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}))
    assert out.content.array_records["arrays"]


# -- eval of a generation adapter: a recorded prompt the user cannot leave out ---------------------------------------

from test_generation_prompt_record import ROWS, gen_run as templated_gen_run  # noqa: E402,F401 (fixture)


@pytest.mark.parametrize("rows", [
    [{"prompt": f"Q: {q} A:", "completion": a} for q, a in ROWS],
    [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ROWS],
], ids=["prompt-completion", "conversation"])
def test_eval_of_a_templated_generation_adapter_on_rows_used_as_they_are(templated_gen_run, tmp_path, rows):
    """af82169: eval adopts the adapter's recorded template and input column where the flags are left out. On a JSONL
    file of prompt/completion pairs or conversations (which train and eval use as they are), the adopted values are
    then refused as if given: '--template: FILE holds prompt/completion pairs ...; --template applies to tables (leave it
    out)' / '--input-column: ... holds conversations ... (leave it out)', for a command that gave neither flag. No
    flag undoes the adoption (`--input-column input` renames the template, still refused), so such an adapter can no
    longer be scored on such a file at all (it could before the record). Either score it (the rows' own prompts, as
    before), or refuse naming the record (slimtune.json), never a flag the user did not give."""
    _, out = templated_gen_run
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--task", "generation",
              "--max-new-tokens", "2")
    if res.exit_code != 0:
        first = res.output.strip().splitlines()[0] if res.output.strip() else ""
        assert "--template" not in first and "--input-column" not in first, res.output
        assert "slimtune.json" in first, res.output


def test_a_node_outside_the_simulation_engine_is_not_taken_for_a_simulated_one():
    """The exception for the simulation engine holds only inside a Ray worker: this process (a deployment node's
    ClientApp runs in its own process, outside Ray) is not one, so the shared-data pin applies there."""
    from slimtune.federated.client_app import in_simulation_engine
    assert in_simulation_engine() is False
