"""The hf-fisher command: the fast demo end to end, and clear errors for bad arguments."""

import pytest

from hf_fisher import DiagonalFisher
from hf_fisher.cli import main, per_block_summary


@pytest.mark.slow
def test_fast_demo_runs_the_main_job_and_saves_every_artefact(tmp_path, capsys):
    import json

    from hf_fisher.demo import MARKER
    from hf_fisher.trainers.unlearning import load_unlearning_update

    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Written to {out}" in printed and "K-FADE" in printed
    report = json.loads((out / MARKER).read_text())
    rows = report["rows"]
    # the fine-tuned model knows the facts better than the base model; K-FADE lowers the forget probability
    assert rows["fine-tuned (FWSVD-LoRA)"]["forget p"] > rows["base model"]["forget p"]
    assert rows["K-FADE"]["forget p"] < rows["fine-tuned (FWSVD-LoRA)"]["forget p"]
    assert 0 < rows["K-FADE"]["retain KL"] < 1
    assert "forget p" in rows["K-FADE, reloaded in 4-bit NF4"]
    fisher = DiagonalFisher.from_pretrained(out / "fisher")
    assert len(fisher) == 30 * 7 and fisher.metadata.n_sequences == report["settings"]["fisher_rows"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    update = load_unlearning_update(out / "unlearning_update")
    assert len(update) == 30 * 2 and all(k.endswith(("down_proj.weight", "o_proj.weight")) for k in update)
    for folder in ("fisher", "adapter", "unlearning_update"):
        assert "hf-fisher" in (out / folder / "README.md").read_text()
    assert (out / "demo_report.png").stat().st_size > 0 and (out / "demo_report.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left behind


def test_demo_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert main(["demo", "--fast", "--output-dir", str(keep)]) == 2
    assert "not an earlier demo's output" in capsys.readouterr().err
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_fisher_subcommand_prints_where_the_mass_sits(tmp_path, capsys, tiny_chat_model):
    out = tmp_path / "fisher"
    assert main(["fisher", "--model", str(tiny_chat_model), "--max-sequences", "2", "--seq-len", "16",
                 "--output-dir", str(out)]) == 0
    assert "Where the Fisher mass sits" in capsys.readouterr().out
    rows = per_block_summary(DiagonalFisher.from_pretrained(out))
    assert len(rows) == 2
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


def test_demo_full_path_with_gu_on_a_tiny_model(tmp_path, tiny_chat_model):
    """Every stage of the full demo (including NPO + GU) on a tiny model with tiny settings."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fisher import apply_unlearning_update, build_fictitious_facts, evaluate_unlearning
    from hf_fisher.demo import MARKER, DemoSettings, run_demo

    settings = DemoSettings(n_people=6, forget_percent=20, fisher_rows=8, lora_rank=4, lora_alpha=8,
                            finetune_epochs=1.0, kfade_steps=1, gu_epochs=1.0, max_retain_rows=4, max_new_tokens=4,
                            world_facts=False)
    out = tmp_path / "demo"
    report = run_demo(out, model_name=str(tiny_chat_model), settings=settings)
    assert set(report["rows"]) == {"base model", "fine-tuned (FWSVD-LoRA)", "K-FADE", "K-FADE, reloaded in 4-bit NF4",
                                   "NPO + GU"}
    assert json.loads((out / MARKER).read_text())["settings"]["gu_epochs"] == 1.0
    # the saved adapter on the original base, merged, plus the saved update = the K-FADE model's weights
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    apply_unlearning_update(merged, out / "unlearning_update")
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    data = build_fictitious_facts(tokenizer, n_people=6, forget_fractions=(0.2,))
    again = evaluate_unlearning(merged.eval(), data, tokenizer, forget_split="forget20", retain_split="retain80",
                                world_split=None, attacks=(), max_retain_rows=4, max_new_tokens=4)
    expected = report["rows"]["K-FADE"]["forget p"]
    assert again["summary"]["forget_probability"] == pytest.approx(expected, rel=1e-3)
    assert expected != pytest.approx(report["rows"]["fine-tuned (FWSVD-LoRA)"]["forget p"], rel=1e-3)
    # a second run may replace the folder the first one wrote
    run_demo(out, model_name=str(tiny_chat_model), settings=settings)
    assert (out / MARKER).is_file()
# ------------------------------------------------------------------------- finetune, quantize, unlearn, evaluate




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


def test_finetune_unlearn_evaluate_chain(tmp_path, tiny_chat_model):
    """finetune (LoRA adapter) → unlearn (NPO + GU, on the merged adapter) → evaluate, all through the CLI."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_fisher.finetuning import load_finetuned

    adapter, unlearned, report = tmp_path / "ft", tmp_path / "npo", tmp_path / "report"
    assert main(["finetune", "--method", "lora", "--model", str(tiny_chat_model), "--n-people", "10", "--rank", "4",
                 "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-2",
                 "--output-dir", str(adapter)]) == 0
    # load_finetuned merges the adapter: same function as the unmerged PEFT model
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    merged, _ = load_finetuned(adapter)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model), adapter).eval()
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


def test_unlearn_kfade_saves_an_update_that_reproduces_the_model(tmp_path, tiny_chat_model):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fisher import apply_unlearning_update

    out = tmp_path / "kfade"
    assert main(["unlearn", "--model", str(tiny_chat_model), "--method", "kfade", *FACTS, "--max-steps", "1",
                 "--batch-size", "8", "--kfade-epsilon", "0.05", "--output-dir", str(out)]) == 0
    rebuilt = apply_unlearning_update(AutoModelForCausalLM.from_pretrained(tiny_chat_model), out / "unlearning_update")
    saved = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(rebuilt.state_dict().items(), saved.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_quantize_subcommand(tmp_path, tiny_chat_model):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fisher import load_lqlora_model
    from hf_fisher.tuners.lqlora.model import quantized_layers, storage_report

    out = tmp_path / "lq"
    assert main(["quantize", "--model", str(tiny_chat_model), "--budget", "3.0", "--rank", "4", "--grid",
                 "2:16,3:16,4:16", "--fisher", "none", "--output-dir", str(out)]) == 0
    model = load_lqlora_model(out)
    assert storage_report(model)["quantized_bits_per_parameter"] <= 3.0 + 1e-9
    assert {m.quant_config.bits for m in quantized_layers(model).values()} <= {2, 3, 4}
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()(input_ids=ids).logits
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            quantized_only = model(input_ids=ids).logits
    # the LoRA holds the low-rank remainder: Q + L1 L2 is closer to the original model than Q alone
    assert (logits - reference).norm() < 0.8 * (quantized_only - reference).norm()


def test_new_subcommands_refuse_bad_arguments_before_writing(tmp_path, tiny_chat_model, capsys):
    tiny = str(tiny_chat_model)
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


def test_finetune_local_text_file_with_a_named_column(tmp_path, tiny_chat_model):
    import json

    rows = [{"body": "The quick brown fox jumps over the lazy dog. " * 6} for _ in range(4)]
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "notes-lora"
    assert main(["finetune", "--model", str(tiny_chat_model), "--data", str(tmp_path / "notes.jsonl"),
                 "--text-column", "body", "--seq-len", "16", "--rank", "2", "--max-steps", "1", "--batch-size", "2",
                 "--output-dir", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert "notes.jsonl" in (out / "README.md").read_text()
