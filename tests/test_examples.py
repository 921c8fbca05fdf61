"""The example scripts run as users run them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fisher import DiagonalFisher, KFACFactors
from tests.helpers import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_estimate_fisher_example(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "examples/estimate_fisher.py"), "--output_dir", str(tmp_path / "fisher"),
        "--seq_len", "32", "--max_sequences", "4", "--per_device_batch_size", "2", "--use_cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher = DiagonalFisher.from_pretrained(tmp_path / "fisher")
    assert fisher.metadata.n_sequences == 4 and len(fisher) == 210
    assert "lee_background" in fisher.metadata.data_description


@pytest.mark.slow
@pytest.mark.multiprocess
def test_estimate_fisher_example_on_two_processes(tmp_path):
    stdout = launch_two_processes(
        str(ROOT / "examples/estimate_fisher.py"), "--output_dir", str(tmp_path / "kfac"), "--curvature", "kfac",
        "--kind", "sampled", "--seq_len", "32", "--max_sequences", "5", "--per_device_batch_size", "2", "--use_cpu",
    )
    assert "on 2 process(es)" in stdout
    factors = KFACFactors.from_pretrained(tmp_path / "kfac")
    # even_batches=False: 5 sequences over 2 processes are counted once each, none repeated.
    assert factors.metadata.n_sequences == 5 and factors.metadata.n_tokens == 5 * 31


UNLEARN_ARGS = ["--n_people", "10", "--per_device_train_batch_size", "2", "--max_steps", "2", "--use_cpu",
                "--report_to", "none", "--save_strategy", "no", "--forget_percent", "25"]


def test_unlearn_example_npo_with_gu_and_report(tmp_path, tiny_chat_model):
    cmd = [sys.executable, str(ROOT / "examples/unlearn.py"), "--model_name_or_path", str(tiny_chat_model),
           "--output_dir", str(tmp_path / "out"), "--unlearning_loss", "npo", "--projection", "gu", "--evaluate",
           "--eval_attacks", "quantization", "--eval_max_retain_rows", "4",
           *UNLEARN_ARGS]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UnlearningTrainer on 1 process(es)" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "report" / "unlearned.md").is_file()


@pytest.mark.multiprocess
def test_unlearn_example_kfade_on_two_processes(tmp_path, tiny_chat_model):
    stdout = launch_two_processes(
        str(ROOT / "examples/unlearn.py"), "--kfade", "--model_name_or_path", str(tiny_chat_model),
        "--output_dir", str(tmp_path / "out"), "--kfade_epsilon", "0.01", *UNLEARN_ARGS,
    )
    assert "KFADETrainer on 2 process(es)" in stdout
    assert (tmp_path / "out" / "unlearning_update" / "unlearning_update.safetensors").is_file()


# ------------------------------------------------------------------------------------------- finetune example




def _finetune_args(model, out, *extra):
    return ["--model_name_or_path", str(model), "--output_dir", str(out), "--n_people", "10", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--use_cpu", "--rank", "4", "--fisher_sequences", "4",
            "--logging_steps", "1", "--learning_rate", "1e-2", *extra]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_finetune_example_fwsvd_runs_as_a_script_and_loads_in_vanilla_peft(tmp_path, tiny_chat_model):
    """`python examples/finetune.py --method fwsvd`: the saved plain LoRA, loaded by vanilla PEFT in a process that
    never imports hf_fisher, gives the trained model's outputs (rebuilt by load_fwsvd_for_training)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fisher import load_fwsvd_for_training

    out = tmp_path / "fwsvd"
    cmd = [sys.executable, str(ROOT / "examples/finetune.py"), "--method", "fwsvd",
           *_finetune_args(tiny_chat_model, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuned with fwsvd on 1 process(es)" in result.stdout and str(out) in result.stdout
    assert "FWSVD" in (out / "README.md").read_text()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    vanilla = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_chat_model)!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(out)!r}).eval()\n"
        f"torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits.detach(), {str(tmp_path / 'v.pt')!r})\n"
        "assert not any(m.startswith('hf_fisher') for m in sys.modules)\n"
    )
    check = subprocess.run([sys.executable, "-c", vanilla], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert check.returncode == 0, check.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    untrained = _logits(base, ids)
    trained = _logits(load_fwsvd_for_training(AutoModelForCausalLM.from_pretrained(tiny_chat_model), out), ids)
    assert (trained - untrained).abs().max() > 1e-4  # training moved the model
    torch.testing.assert_close(torch.load(tmp_path / "v.pt"), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "randlora", "lqlora"])
def test_finetune_example_other_methods(method, tmp_path, tiny_chat_model, capsys):
    """The example's main, in process: each method trains and saves a folder its own loader reads back."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune as example
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = tmp_path / method
    extra = ["--lqlora_budget", "3.0"] if method == "lqlora" else []
    if method == "lora":
        extra = ["--fisher_penalty", "diagonal", "--fisher_lambda", "10", "--online_fisher", "mean"]
    result = example.main(["--method", method, *_finetune_args(tiny_chat_model, out, *extra)])
    printed = capsys.readouterr().out
    assert result["world_size"] == 1 and result["output_dir"] == str(out)
    assert f"saved to {out}" in printed
    assert not list(tmp_path.glob(".*partial"))  # the staging folder was renamed, nothing left behind
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    untrained = _logits(base, ids)
    if method == "lqlora":
        from hf_fisher import load_lqlora_model
        from hf_fisher.tuners.lqlora.model import storage_report

        model = load_lqlora_model(out)
        assert storage_report(model)["quantized_bits_per_parameter"] <= 3.0 + 1e-9
        assert "Fisher-weighted" in (out / "README.md").read_text()
    else:
        model = PeftModel.from_pretrained(base, out)  # vanilla PEFT types: LORA / RANDLORA
        expected = "RANDLORA" if method == "randlora" else "LORA"
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == expected
    trained = _logits(model, ids)
    assert torch.isfinite(trained).all()
    assert (trained - untrained).abs().max() > 1e-4
    if method == "lora":  # FisherTrainer ran: the penalty is logged, the online Fisher saved for `hf-fisher merge`
        from hf_fisher import DiagonalFisher

        assert "fisher_penalty" in printed
        fisher = DiagonalFisher.from_pretrained(out / "fisher")
        lora_layers = {n for n, _ in model.named_modules() if n.endswith("q_proj")}
        assert {f"{n}.base_layer.weight" for n in lora_layers} <= set(fisher)
        assert all(bool((t >= 0).all()) and bool(t.any()) for t in fisher.values())


@pytest.mark.multiprocess
def test_finetune_example_on_two_processes_with_the_ddp_config(tmp_path, tiny_chat_model):
    """`accelerate launch --config_file examples/accelerate_configs/ddp.yaml` starts two ranks (gloo on CPU)."""
    from tests.helpers import free_port

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    out = tmp_path / "ddp"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "examples/accelerate_configs/ddp.yaml"),
           "--mixed_precision", "no", "--main_process_port", str(free_port()), str(ROOT / "examples/finetune.py"),
           "--method", "lora", *_finetune_args(tiny_chat_model, out, "--fisher_penalty", "diagonal")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "fine-tuned with lora on 2 process(es)" in result.stdout
    assert result.stdout.count("saved to") == 1  # only the main process saves and prints
    assert (out / "adapter_model.safetensors").is_file()


def test_finetune_example_rejects_unknown_method(tmp_path):
    from transformers import HfArgumentParser

    from hf_fisher.finetuning import FinetuneArguments, FinetuneTrainingArguments

    with pytest.raises(SystemExit):
        HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments)).parse_args_into_dataclasses(
            args=["--method", "dora", "--output_dir", str(tmp_path / "x")])


# --------------------------------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_parse_with_accelerates_own_loader(name):
    """Each YAML loads with accelerate's ClusterConfig, and every FSDP/DeepSpeed key is an `accelerate launch`
    option with an accepted value."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import constants

    config = ClusterConfig.from_yaml_file(str(ROOT / f"examples/accelerate_configs/{name}.yaml"))
    assert config.num_machines == 1 and config.num_processes == 2 and not config.use_cpu
    options = {a.dest for a in launch_command_parser()._actions}
    for key in [*config.fsdp_config, *config.deepspeed_config]:
        assert key in options, f"{key} is not an accelerate launch option"
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" in constants.FSDP_SHARDING_STRATEGY
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" in constants.FSDP_AUTO_WRAP_POLICY
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" in constants.FSDP_STATE_DICT_TYPE
        assert fsdp["fsdp_backward_prefetch"] in constants.FSDP_BACKWARD_PREFETCH
        assert fsdp["fsdp_use_orig_params"] is True
        from transformers.models.llama import modeling_llama

        assert hasattr(modeling_llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2


# --------------------------------------------------------------------------------------------- compress example

COMPRESS_ARGS = ["--ratio", "0.5", "--seq_len", "16", "--max_sequences", "4", "--per_device_batch_size", "2",
                 "--use_cpu"]


def _check_compressed(folder, base) -> None:
    import torch

    from hf_fisher import load_compressed_model
    from hf_fisher.compression import LowRankLinear

    model = load_compressed_model(folder)
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(low_rank) == 2 * 7  # every block linear of the tiny Llama
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_compress_example_runs_as_a_script(tmp_path, tiny_chat_model):
    cmd = [sys.executable, str(ROOT / "examples/compress.py"), "--model_name_or_path", str(tiny_chat_model),
           "--output_dir", str(tmp_path / "out"), *COMPRESS_ARGS]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FWSVD: 14 layers" in result.stdout and "on 1 process(es)" in result.stdout
    _check_compressed(tmp_path / "out", tiny_chat_model)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # the folder exists now: refused
    assert again.returncode != 0 and "exists already" in again.stderr


@pytest.mark.multiprocess
def test_compress_example_on_two_processes(tmp_path, tiny_chat_model):
    stdout = launch_two_processes(str(ROOT / "examples/compress.py"), "--model_name_or_path", str(tiny_chat_model),
                                  "--output_dir", str(tmp_path / "out"), *COMPRESS_ARGS)
    assert "on 2 process(es)" in stdout and stdout.count("saved to") == 1
    _check_compressed(tmp_path / "out", tiny_chat_model)
