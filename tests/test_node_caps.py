"""A node's own caps on what a server may ask of it (issue 35's hostile federation, from the node's side): a hostile
server could send a non-private node 2**62 local steps, a huge batch or prompt length, and the node trained as
told. `--node-config 'max-local-steps=50 max-batch-size=16 max-length=256'` makes it refuse such a round."""

import pytest

from slimtune import SlimtuneError
from slimtune.federated.client_app import check_node_floor
from test_federated import make_cfg


@pytest.mark.parametrize("key, setting, value", [("max-local-steps", "local_steps", 10),
                                                 ("max-batch-size", "batch_size", 8),
                                                 ("max-length", "max_length", 64)])
def test_a_round_asking_more_than_a_nodes_cap_is_refused(demo_paths, key, setting, value):
    from dataclasses import replace
    cfg = make_cfg(demo_paths)
    check_node_floor(replace(cfg, **{setting: value}), {key: value}, None)  # at the cap: trains
    with pytest.raises(SlimtuneError, match=f"{key}={value}.*round refused"):
        check_node_floor(replace(cfg, **{setting: value + 1}), {key: value}, None)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10"])
def test_a_cap_that_is_not_a_whole_number_above_0_is_refused(demo_paths, value):
    with pytest.raises(SlimtuneError, match="max-local-steps"):
        check_node_floor(make_cfg(demo_paths), {"max-local-steps": value}, None)
