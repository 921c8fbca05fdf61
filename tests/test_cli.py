"""The hf-fisher command: the fast demo end to end, and clear errors for bad arguments."""

import pytest

from hf_fisher import DiagonalFisher
from hf_fisher.cli import main, per_block_summary


@pytest.mark.slow
def test_fast_demo_runs_the_main_job_and_saves_every_artefact(tmp_path, capsys):
    import json

    from hf_fisher import load_unlearning_update
    from hf_fisher.demo import MARKER

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
    assert len(update) == 30 * 7
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
