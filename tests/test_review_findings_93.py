"""Review 93: adversarial review of 9df7cc2 and 8530c73."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")


# -- 1. 9df7cc2's adapter-dropout refusal misses OFT / BOFT's module_dropout ---------------------------------------------

@pytest.mark.parametrize("method", ["oft", "boft"])
def test_zotrainer_refuses_oft_and_boft_module_dropout_its_steps_do_not_apply(tmp_path, hf_offline, method):
    """9df7cc2 refuses every peft adapter dropout a ZO step would silently not apply (its steps run the model in
    eval(), where dropout is off): nn.Dropout modules of a tuner layer, and LoHa/LoKr's module_dropout/rank_dropout
    rates. OFT and BOFT keep their module_dropout as peft's MultiplicativeDropoutLayer (applied only `if
    self.training`, not an nn.Dropout, and not a `module_dropout` rate dict on the layer: the attributes are
    oft_dropout / boft_dropout), so OFTConfig(module_dropout=0.1) is accepted and never applied. Expected: refused in
    one line, as LoRA's, VeRA's and LoHa's are."""
    from peft import BOFTConfig, OFTConfig, get_peft_model

    from test_hf import model_for, tokenizer
    tok = tokenizer()
    config = (OFTConfig(r=0, oft_block_size=4, module_dropout=0.1, target_modules=["q_proj", "v_proj"])
              if method == "oft" else
              BOFTConfig(boft_block_size=4, boft_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model_for(tok), config)
    dropouts = [m for m in model.modules() if type(m).__name__ == "MultiplicativeDropoutLayer" and m.p > 0]
    assert dropouts, "the adapter was built without its dropout"
    from test_review_findings_91 import assert_mezo_refuses_the_dropout
    assert_mezo_refuses_the_dropout(tmp_path, model, tok)
