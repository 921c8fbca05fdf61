"""Load a RandLoRA adapter with vanilla PEFT (hf_fisher never imported) and write the logits: a fresh-process check."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from tests.helpers import tiny_llama  # noqa: E402

adapter_dir, out_path = sys.argv[1], sys.argv[2]
model = PeftModel.from_pretrained(tiny_llama(seed=0), adapter_dir)
assert type(model.base_model).__name__ == "RandLoraModel", type(model.base_model)
ids = torch.arange(2 * 12).reshape(2, 12) % 96
with torch.no_grad():
    logits = model(input_ids=ids).logits
merged = model.merge_and_unload()
with torch.no_grad():
    merged_logits = merged(input_ids=ids).logits
assert not any(name.startswith("hf_fisher") for name in sys.modules), "hf_fisher was imported"
torch.save({"logits": logits, "merged": merged_logits}, out_path)
print("OK")
