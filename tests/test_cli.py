"""The hf-fisher command: the fast demo end to end, and clear errors for bad arguments."""

import pytest

from hf_fisher import DiagonalFisher
from hf_fisher.cli import main, per_block_summary


@pytest.mark.slow
def test_fast_demo_runs_and_saves(tmp_path, capsys):
    assert main(["demo", "--fast", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Where the Fisher mass sits" in out and str(tmp_path / "fisher") in out
    fisher = DiagonalFisher.from_pretrained(tmp_path / "fisher")
    assert len(fisher) == 30 * 7 and fisher.metadata.n_sequences == 8
    rows = per_block_summary(fisher)
    assert len(rows) == 30
    assert abs(sum(attn + mlp for _, attn, mlp, _ in rows) - 1.0) < 1e-6


def test_fisher_subcommand_errors_cleanly(tmp_path, capsys):
    code = main(["fisher", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert code != 0
    assert not (tmp_path / "out").exists()


def test_unknown_choice_is_rejected():
    with pytest.raises(SystemExit) as exc:
        main(["fisher", "--curvature", "full", "--output-dir", "x"])
    assert exc.value.code == 2


def test_compress_subcommand_with_plain_svd(tmp_path):
    import torch

    from hf_fisher import load_compressed_model
    from hf_fisher.compression import LowRankLinear
    from tests.helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "compressed"
    args = ["compress", "--model", str(tmp_path / "tiny"), "--ratio", "0.5", "--fisher", "none"]
    assert main([*args, "--output-dir", str(out)]) == 0
    model = load_compressed_model(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    # An existing output folder is refused, and nothing is written.
    assert main([*args, "--output-dir", str(out)]) == 2
    assert main(["compress", "--model", str(tmp_path / "tiny"), "--output-dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- finetune, quantize, unlearn, evaluate


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory):
    """A tiny Llama with the default model's tokenizer (chat template), saved as a normal HF folder."""
    from transformers import AutoTokenizer

    from hf_fisher.models import default_model_dir, load_default_model
    from tests.helpers import tiny_llama

    if not (default_model_dir() / "tokenizer.json").is_file():
        load_default_model()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    folder = tmp_path_factory.mktemp("tiny-chat-llama-cli")
    tiny_llama(seed=0, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FACTS = ["--n-people", "10", "--forget-percent", "25"]


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["finetune", "quantize", "unlearn", "evaluate"])
def test_new_subcommands_have_teaching_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "example: hf-fisher " + command in text and "--output-dir" in text


def test_finetune_unlearn_evaluate_chain(tmp_path, tiny_chat_llama):
    """finetune (LoRA adapter) → unlearn (NPO + GU, on the merged adapter) → evaluate, all through the CLI."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_fisher.finetuning import load_finetuned

    adapter, unlearned, report = tmp_path / "ft", tmp_path / "npo", tmp_path / "report"
    assert main(["finetune", "--method", "lora", "--model", str(tiny_chat_llama), "--n-people", "10", "--rank", "4",
                 "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-2",
                 "--output-dir", str(adapter)]) == 0
    # load_finetuned merges the adapter: same function as the unmerged PEFT model
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    merged, _ = load_finetuned(adapter)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())

    assert main(["unlearn", "--model", str(adapter), "--method", "npo", "--projection", "gu", *FACTS,
                 "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3",
                 "--output-dir", str(unlearned)]) == 0
    after = AutoModelForCausalLM.from_pretrained(unlearned)
    moved = max((a - b).abs().max().item() for a, b in zip(after.parameters(), merged.parameters(), strict=True))
    assert moved > 1e-5
    assert "npo" in (unlearned / "README.md").read_text().lower()

    assert main(["evaluate", "--model", str(unlearned), "--original-model", str(adapter), *FACTS, "--attacks", "",
                 "--max-retain-rows", "4", "--no-world-facts", "--output-dir", str(report)]) == 0
    result = json.loads((report / "model.json").read_text())
    assert result["summary"]["retain_kl"] > 0  # the original (fine-tuned) model was compared with the unlearned one
    assert (report / "model.md").is_file() and (report / "model.png").is_file()
    assert _leftovers(tmp_path) == []


def test_unlearn_kfade_saves_an_update_that_reproduces_the_model(tmp_path, tiny_chat_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fisher import apply_unlearning_update

    out = tmp_path / "kfade"
    assert main(["unlearn", "--model", str(tiny_chat_llama), "--method", "kfade", *FACTS, "--max-steps", "1",
                 "--batch-size", "8", "--kfade-epsilon", "0.05", "--output-dir", str(out)]) == 0
    rebuilt = apply_unlearning_update(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), out / "unlearning_update")
    saved = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(rebuilt.state_dict().items(), saved.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_quantize_subcommand(tmp_path, tiny_chat_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fisher import load_lqlora_model
    from hf_fisher.tuners.lqlora.model import quantized_layers, storage_report

    out = tmp_path / "lq"
    assert main(["quantize", "--model", str(tiny_chat_llama), "--budget", "3.0", "--rank", "4", "--grid",
                 "2:16,3:16,4:16", "--fisher", "none", "--output-dir", str(out)]) == 0
    model = load_lqlora_model(out)
    assert storage_report(model)["quantized_bits_per_parameter"] <= 3.0 + 1e-9
    assert {m.quant_config.bits for m in quantized_layers(model).values()} <= {2, 3, 4}
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()(input_ids=ids).logits
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            quantized_only = model(input_ids=ids).logits
    # the LoRA holds the low-rank remainder: Q + L1 L2 is closer to the original model than Q alone
    assert (logits - reference).norm() < 0.8 * (quantized_only - reference).norm()


def test_new_subcommands_refuse_bad_arguments_before_writing(tmp_path, tiny_chat_llama, capsys):
    tiny = str(tiny_chat_llama)
    out = tmp_path / "out"
    base = ["--model", tiny, "--n-people", "10", "--max-steps", "1", "--output-dir", str(out)]
    # argparse: unknown method / projection → usage error, exit code 2
    for argv in (["finetune", "--method", "dora", *base], ["unlearn", "--method", "rmu", *base],
                 ["unlearn", "--projection", "pcgrad", *base]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    # library checks → message naming the problem, exit code 2
    (tmp_path / "data.jsonl").write_text('{"body": "some words"}\n')
    cases = [
        (["finetune", *base, "--rank", "64"], "exceeds min(out, in)"),
        (["finetune", *base, "--data", str(tmp_path / "data.jsonl")], "needs a 'text' column"),
        (["finetune", *base, "--method", "randlora", "--fisher-penalty", "diagonal"], "RandLoRA has no such"),
        (["finetune", *base, "--method", "lqlora", "--budget", "1.0"], "infeasible"),
        (["finetune", *base, "--target-modules", "c_attn"], "match no"),
        (["quantize", "--model", tiny, "--budget", "1.5", "--grid", "2:16,4:16", "--output-dir", str(out)],
         "infeasible"),
        (["quantize", "--model", tiny, "--grid", "2:16,4:16", "--output-dir", str(out)], "give --budget"),
        (["quantize", "--model", tiny, "--grid", "5:16", "--budget", "5", "--output-dir", str(out)], "bits must be"),
        (["unlearn", *base, "--method", "kfade", "--projection", "gu"], "--projection gu"),
        (["evaluate", "--model", tiny, "--attacks", "pruning", "--output-dir", str(out)], "unknown attack"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert not out.exists() and _leftovers(tmp_path) == [], argv
    # an existing output folder is refused and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for command in (["finetune", *base], ["unlearn", *base], ["quantize", "--model", tiny, "--output-dir", str(out)],
                    ["evaluate", "--model", tiny, "--output-dir", str(out)]):
        assert main(command) == 2
        assert "exists already" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_finetune_local_text_file_with_a_named_column(tmp_path, tiny_chat_llama):
    import json

    rows = [{"body": "The quick brown fox jumps over the lazy dog. " * 6} for _ in range(4)]
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "notes-lora"
    assert main(["finetune", "--model", str(tiny_chat_llama), "--data", str(tmp_path / "notes.jsonl"),
                 "--text-column", "body", "--seq-len", "16", "--rank", "2", "--max-steps", "1", "--batch-size", "2",
                 "--output-dir", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert "notes.jsonl" in (out / "README.md").read_text()
