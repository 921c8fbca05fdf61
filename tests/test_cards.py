"""Hub model cards and publishing: every card parses with ModelCard.load and carries the right front matter and
metrics; every save path writes our card; the cards' loading snippets run; publish validates before any network
call and hands huggingface_hub the right arguments (monkeypatched: the Hub is unreachable here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_fisher import (
    FastRandLoraConfig,
    LQLoraConfig,
    apply_unlearning_update,
    convert_from_peft_randlora,
    convert_to_peft_randlora,
    estimate_diagonal_fisher,
    initialize_lora_fwsvd,
    prepare_lqlora_model,
    publish,
    save_fwsvd_adapter,
    save_lqlora_model,
)
from hf_fisher.cards import adapter_card, fisher_card, unlearning_card, write_card
from hf_fisher.trainers.unlearning import KFADEArguments, KFADETrainer, save_unlearning_update
from hf_fisher.tuners.lqlora.quantizer import NFConfig
from tests.helpers import ROOT, make_batches, qa_rows, tiny_llama

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
METRICS = {"base model": {"perplexity": 33.123456, "accuracy": 0.5}, "fwsvd r=8": {"perplexity": 20.25}}


def _load(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def _table(text: str, first_header: str) -> dict[str, dict[str, str]]:
    """Parse the Markdown table whose header starts with ``| first_header |`` back into {row: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells[1:], strict=True))
    return rows


def _code(card: ModelCard) -> str:
    return re.search(r"```python\n(.*?)```", card.text, re.S).group(1)


def _check_metrics(card: ModelCard, metrics) -> None:
    table = _table(card.text, "model")
    assert set(table) == set(metrics)
    for label, row in metrics.items():
        for column, value in row.items():
            assert float(table[label][column]) == pytest.approx(value, rel=1e-3)
        assert all(cell == "–" for column, cell in table[label].items() if column not in row)


# ------------------------------------------------------------------------------------ card contents


@pytest.mark.parametrize("method", ["fwsvd", "randlora", "lqlora", "lora"])
@pytest.mark.parametrize("base", [HUB_BASE, "/models/local-llama"])
def test_adapter_card_front_matter_and_metrics(tmp_path, method, base):
    card = adapter_card(method=method, base_model=base, datasets=["wikitext", "my local text"], metrics=METRICS,
                        training={"learning_rate": 2e-4, "target_modules": ["q_proj", "v_proj"]})
    path = write_card(card, tmp_path / "out")
    assert path == tmp_path / "out" / "README.md"
    loaded = _load(tmp_path / "out")
    data = loaded.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert {"hf-fisher", method, "peft"} <= set(data["tags"])
    assert data["datasets"] == ["wikitext"]  # Hub ids only in the front matter; both in the body
    assert "`my local text`" in loaded.text
    if base == HUB_BASE:
        assert data["base_model"] == HUB_BASE and f"base_model:adapter:{HUB_BASE}" in data["tags"]
    else:
        assert "base_model" not in data and "/models/local-llama" in loaded.text
    _check_metrics(loaded, METRICS)
    settings = _table(loaded.text, "setting")
    assert settings["learning_rate"]["value"] == "0.0002"
    assert json.loads(settings["target_modules"]["value"].replace("\\|", "|")) == ["q_proj", "v_proj"]
    code = _code(loaded)
    if method == "lqlora":
        assert "load_lqlora_model" in code and "needs hf_fisher" in loaded.text
    else:
        assert "hf_fisher" not in code and "PeftModel.from_pretrained" in code


def test_adapter_card_variants_and_bad_input():
    fast = _code(adapter_card(method="randlora", base_model=HUB_BASE, vanilla_peft_loadable=False))
    assert "import hf_fisher" in fast
    unconverted = _code(adapter_card(method="fwsvd", base_model=HUB_BASE, vanilla_peft_loadable=False))
    assert "load_fwsvd_for_training" in unconverted
    with pytest.raises(ValueError, match="Unknown adapter method 'dora'"):
        adapter_card(method="dora", base_model=HUB_BASE)
    with pytest.raises(TypeError, match="metrics must be numbers"):
        adapter_card(method="lora", base_model=HUB_BASE, metrics={"run": {"ppl": "low"}})
    with pytest.raises(TypeError, match="row label"):
        adapter_card(method="lora", base_model=HUB_BASE, metrics={"run": 3.0})


def test_unlearning_cards():
    card = ModelCard(str(unlearning_card(method="NPO+GU", base_model=HUB_BASE, forget_description="forget10",
                                         metrics={"npo+gu": {"forget_quality": 0.01}}, settings={"beta": 0.1})))
    data = card.data.to_dict()
    assert data["library_name"] == "hf_fisher" and data["base_model"] == HUB_BASE
    assert {"hf-fisher", "unlearning", "npo+gu", "npo", "gu"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-generation"
    assert "Negative Preference Optimization" in card.text and "Geometric-Disentanglement" in card.text
    assert "apply_unlearning_update(model, snapshot_download(" in _code(card)
    _check_metrics(card, {"npo+gu": {"forget_quality": 0.01}})
    full = unlearning_card(method="kfade", base_model="./local", forget_description="x", update_file=None)
    assert full.data.library_name == "transformers" and full.data.base_model is None
    assert "k-fade" in full.data.tags and "apply_unlearning_update" not in full.text
    with pytest.raises(ValueError, match="Unknown unlearning method"):
        unlearning_card(method="npo+magic", base_model=HUB_BASE, forget_description="x")


def test_fisher_card_from_saved_estimates(tmp_path, batches):
    model = tiny_llama()
    model.config._name_or_path = "/tmp/some/local/model"
    fisher = estimate_diagonal_fisher(model, batches, data_description="random tokens")
    fisher.save_pretrained(tmp_path / "local")
    data = _load(tmp_path / "local").data.to_dict()
    assert data["library_name"] == "hf_fisher" and "base_model" not in data
    assert {"hf-fisher", "fisher-information", "diagonal_fisher"} <= set(data["tags"])
    fisher.metadata.model_name_or_path = HUB_BASE
    card = fisher_card(fisher.metadata, "diagonal_fisher.safetensors")
    assert card.data.base_model == HUB_BASE and "DiagonalFisher.from_pretrained" in card.text
    assert "6 sequences" in card.text and "random tokens" in card.text


def test_model_cards_examples_are_rendered_by_the_script(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "model_cards" / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("fwsvd_adapter_example.md", "unlearning_update_example.md", "curvature_example.md"):
        rendered = (tmp_path / name).read_text()
        assert rendered == (ROOT / "model_cards" / name).read_text(), f"{name}: run model_cards/make_examples.py"
        assert "hf-fisher" in ModelCard(rendered).data.tags


# ------------------------------------------------------------------------------------ save paths


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_fwsvd_folder_has_our_card_and_its_snippet_loads_in_vanilla_peft(tmp_path, batches):
    tiny_llama().save_pretrained(tmp_path / "base")  # a local base, so the card's snippet can run as written
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    initialize_lora_fwsvd(model, estimate_diagonal_fisher(tiny_llama(), batches))
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # a "training" step: move every LoRA factor
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    with pytest.raises(TypeError, match="metrics must be numbers"):  # bad card input: nothing written
        save_fwsvd_adapter(model, tmp_path / "refused", tmp_path / "initial", metrics={"x": {"y": None}})
    assert not (tmp_path / "refused").exists()
    out = save_fwsvd_adapter(model, tmp_path / "adapter", tmp_path / "initial", metrics=METRICS,
                             training={"learning_rate": 1e-4}, datasets=["wikitext"])
    card = _load(out)
    assert card.data.library_name == "peft" and "fwsvd" in card.data.tags and "hf-fisher" in card.data.tags
    assert card.data.base_model is None  # a local path: not in the front matter
    settings = _table(card.text, "setting")
    assert settings["r (trained)"]["value"] == "4" and settings["r (saved, plain LoRA)"]["value"] == "8"
    assert settings["learning_rate"]["value"] == "0.0001"
    _check_metrics(card, METRICS)
    assert "Framework versions" not in card.text  # PEFT's generic card was replaced

    batch = make_batches(3, 3, 10, 96, seed=5)[0]
    trained = _logits(model, batch)
    assert (trained - _logits(tiny_llama(), batch)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.save({"batch": batch, "logits": trained}, tmp_path / "expected.pt")
    snippet = _code(card).replace("your-name/your-repo", str(out))
    assert str(tmp_path / "base") in snippet
    script = textwrap.dedent("""
        import sys, torch
        from huggingface_hub import ModelCard
        card = ModelCard.load(sys.argv[1] + "/README.md")
        assert "hf-fisher" in card.data.tags
        exec(sys.argv[2])  # the card's own loading snippet
        expected = torch.load(sys.argv[3])
        b = expected["batch"]
        with torch.no_grad():
            got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        torch.testing.assert_close(got, expected["logits"], atol=1e-5, rtol=1e-5)
        assert not any(name.startswith("hf_fisher") for name in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(out), snippet, str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_unlearning_update_folder_card_and_snippet(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    reference = tiny_llama()
    update = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in reference.named_parameters() if "mlp" in n}
    config = {"method": "k-fade", "base_model": str(tmp_path / "base"), "epsilon_per_token": 0.02}
    folder = save_unlearning_update(update, tmp_path / "update", config, metrics={"k-fade": {"forget_nll": 4.5}},
                                    forget_description="4 fictitious people")
    card = _load(folder)
    assert card.data.library_name == "hf_fisher" and {"unlearning", "k-fade", "hf-fisher"} <= set(card.data.tags)
    assert "4 fictitious people" in card.text and _table(card.text, "setting")["epsilon_per_token"]["value"] == "0.02"
    _check_metrics(card, {"k-fade": {"forget_nll": 4.5}})
    # the card's snippet, with snapshot_download standing in for the Hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(folder))
    namespace: dict = {}
    exec(_code(card), namespace)
    expected = {n: p + update.get(n, 0) for n, p in reference.named_parameters()}
    for name, p in namespace["model"].named_parameters():
        torch.testing.assert_close(p.detach(), expected[name].detach(), rtol=0, atol=1e-7, msg=name)
    # and apply_unlearning_update from the folder directly
    fresh = apply_unlearning_update(tiny_llama(), folder)
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name].detach(), rtol=0, atol=1e-7, msg=name)


def test_kfade_trainer_passes_its_config_to_the_card(tmp_path):
    args = KFADEArguments(output_dir=str(tmp_path), kfade_epsilon=0.01, per_device_train_batch_size=4, max_steps=1,
                          use_cpu=True, report_to="none", save_strategy="no", kfade_backtracking=False, seed=5)
    model = tiny_llama()
    model.config._name_or_path = HUB_BASE
    trainer = KFADETrainer(model, args, forget_dataset=qa_rows(4, seed=1), retain_dataset=qa_rows(12, seed=2))
    trainer.train()
    card = _load(trainer.save_unlearning_update(tmp_path / "update", metrics={"k-fade": {"forget_nll": 3.0}}))
    assert card.data.base_model == HUB_BASE and "k-fade" in card.data.tags
    settings = _table(card.text, "setting")
    assert settings["epsilon_per_token"]["value"] == "0.01" and settings["steps"]["value"] == "1"
    assert "4 forget examples" in card.text


def test_lqlora_and_randlora_folders_have_our_cards(tmp_path):
    lq = prepare_lqlora_model(tiny_llama(), LQLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                         quant_grid=[NFConfig(3, 32, 8, 16).to_dict()], max_iter=2),
                              progress=False)
    card = _load(save_lqlora_model(lq, tmp_path / "lq", metrics={"lq": {"ppl": 9.0}}))
    assert card.data.library_name == "peft" and "lqlora" in card.data.tags and "load_lqlora_model" in card.text
    assert "2 × 3-bit, blocks of 32" in _table(card.text, "setting")["quantized layers"]["value"]

    fast = get_peft_model(tiny_llama(), FastRandLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fast.save_pretrained(tmp_path / "fast")
    vanilla = _load(convert_to_peft_randlora(tmp_path / "fast", tmp_path / "vanilla", metrics={"r": {"ppl": 1.5}}))
    assert "randlora" in vanilla.data.tags and "hf_fisher" not in _code(vanilla)
    assert _table(vanilla.text, "setting")["r"]["value"] == "4"
    _check_metrics(vanilla, {"r": {"ppl": 1.5}})
    back = _load(convert_from_peft_randlora(tmp_path / "vanilla", tmp_path / "back"))
    assert "import hf_fisher" in _code(back)


# ------------------------------------------------------------------------------------ publish


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace the HfApi methods publish calls; record their arguments (and the token the client holds)."""
    calls: list[tuple[str, dict]] = []

    def record(name, result=None):
        def method(self, *args, **kwargs):
            calls.append((name, {"token": self.token, "args": args, **kwargs}))
            if name == "upload_folder":  # what was uploaded, while the folder still exists
                calls[-1][1]["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            return result
        return method

    commit = CommitInfo(commit_url="https://huggingface.co/me/repo/commit/abc123", commit_message="m",
                        commit_description="", oid="abc123")
    monkeypatch.setattr(HfApi, "create_repo", record("create_repo"))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder", commit))
    return calls


def _adapter_folder(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    write_card(adapter_card(method="lora", base_model=HUB_BASE), path)
    return path


def test_publish_validation_errors_before_any_network_call(tmp_path, hub_calls):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        publish(tmp_path / "missing", "me/repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no README.md"):
        publish(tmp_path / "empty", "me/repo")
    (tmp_path / "empty" / "README.md").write_text("---\ntags: [unclosed\n---\n# x\n")
    with pytest.raises(ValueError, match="does not parse as a model card"):
        publish(tmp_path / "empty", "me/repo")
    folder = _adapter_folder(tmp_path / "adapter")
    (folder / "README.md").write_text("---\nlibrary_name: peft\ntags:\n- lora\n---\n# PEFT's generic card\n")
    with pytest.raises(ValueError, match="not an hf_fisher card"):
        publish(folder, "me/repo")
    write_card(adapter_card(method="lora", base_model=HUB_BASE), folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no artefact file"):
        publish(folder, "me/repo")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing adapter_config.json \(for adapter_model.safetensors\)"):
        publish(folder, "me/repo")
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        publish(folder, "me/two/slashes")
    assert hub_calls == []


def test_publish_calls_create_repo_then_upload_folder(tmp_path, hub_calls):
    folder = _adapter_folder(tmp_path / "adapter")
    url = publish(folder, "me/repo", token="hf_secret", private=True, revision="v1", commit_message="first")
    assert url == "https://huggingface.co/me/repo/commit/abc123"
    assert [name for name, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in hub_calls)
    assert create == {"token": "hf_secret", "args": ("me/repo",), "private": True, "exist_ok": True}
    assert branch == {"token": "hf_secret", "args": ("me/repo",), "branch": "v1", "exist_ok": True}
    assert upload["repo_id"] == "me/repo" and upload["folder_path"] == str(folder) and upload["revision"] == "v1"
    assert upload["commit_message"] == "first" and upload["token"] == "hf_secret" and upload["args"] == ()
    hub_calls.clear()
    publish(folder, "me/repo")
    assert [name for name, _ in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][1]["private"] is False and hub_calls[1][1]["revision"] is None
    assert hub_calls[1][1]["commit_message"] == "Upload adapter with hf_fisher"


def test_curvature_push_to_hub_uploads_the_card(tmp_path, batches, hub_calls):
    estimate_diagonal_fisher(tiny_llama(), batches).push_to_hub("me/fisher", token="t")
    upload = hub_calls[-1][1]
    assert {"README.md", "diagonal_fisher.safetensors", "curvature_config.json"} <= set(upload["files"])
    assert upload["commit_message"] == "Upload DiagonalFisher"
