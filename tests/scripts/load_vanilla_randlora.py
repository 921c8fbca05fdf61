"""Load a saved RandLoRA adapter in a fresh process and write its logits.

``load_vanilla_randlora.py ADAPTER_DIR OUT.pt``: vanilla PEFT only (fails if hf_fisher gets imported), expects PEFT's
own RandLoraModel. With ``--hf-fisher`` as a third argument: imports hf_fisher first and expects the fast tuner.
"""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

adapter_dir, out_path = sys.argv[1], sys.argv[2]
with_hf_fisher = sys.argv[3:] == ["--hf-fisher"]
if with_hf_fisher:
    import hf_fisher  # noqa: F401  (registers FAST_RANDLORA)

from peft import PeftModel  # noqa: E402

from tests.helpers import tiny_llama  # noqa: E402

model = PeftModel.from_pretrained(tiny_llama(seed=0), adapter_dir)
expected_tuner = "FastRandLoraModel" if with_hf_fisher else "RandLoraModel"
assert type(model.base_model).__name__ == expected_tuner, type(model.base_model)
ids = torch.arange(2 * 12).reshape(2, 12) % 96
with torch.no_grad():
    logits = model(input_ids=ids).logits
merged = model.merge_and_unload()
with torch.no_grad():
    merged_logits = merged(input_ids=ids).logits
if not with_hf_fisher:
    assert not any(name.startswith("hf_fisher") for name in sys.modules), "hf_fisher was imported"
torch.save({"logits": logits, "merged": merged_logits}, out_path)
print("OK")
