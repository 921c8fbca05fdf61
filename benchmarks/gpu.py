"""GPU checks at the default model's real shapes (SmolLM2-135M config, random weights: fine for time and memory).

Parts (one CUDA device; everything timed with the device synchronised, configurations interleaved round-robin):

* ``randlora``: training step time (forward + backward + AdamW) and peak allocated memory of LoRA r=32, PEFT's
  RandLoRA r=32 and ours (``FastRandLoraConfig``, same config), all 7 projections, 8 × 128 and 8 × 512 tokens,
  fp32 and bf16.
* ``lqlora``: step time and peak memory of LoRA r=64 on quantized bases, bf16 compute: QLoRA (bitsandbytes NF4
  ``Linear4bit``), LQ-LoRA NF4 and NF3 (our packed codes, dequantized on the fly in PyTorch, eager and with the
  dequantization ``torch.compile``'d), and a bf16 unquantized base for reference; plus the time to dequantize every
  target matrix once (ours vs bitsandbytes' kernel) and the decomposition time of ``prepare_lqlora_model``.
* ``loftq``: PEFT's own ``loftq_init`` (it hard-codes a CUDA device) against the CPU reimplementation that
  benchmarks/lqlora.py uses, on the same matrices: relative reconstruction errors and their difference.

Run: ``python benchmarks/gpu.py --out DIR [--parts randlora,lqlora,loftq]``; writes DIR/gpu.md and DIR/gpu.json.
With ``--smoke`` it runs every part tiny (2 blocks, 16 tokens), on CPU if no GPU is present: a check of the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_model(layers: int, dtype: torch.dtype, device: torch.device):
    """The default model's architecture with random weights (the config is read from the default model's folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_fisher.models import default_model_dir

    config = AutoConfig.from_pretrained(default_model_dir())
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.requires_grad_(False)
    return model


def batch(vocab: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (8, seq_len), generator=torch.Generator().manual_seed(seq_len)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model, opt, data) -> None:
    opt.zero_grad(set_to_none=True)
    model(**data).loss.backward()
    opt.step()


def time_configs(models: dict, data, device: torch.device, rounds: int, steps: int) -> tuple[dict, dict]:
    """Median seconds per step (interleaved rounds of ``steps`` steps) and peak memory of one step above the model."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    peak = {}
    for name, model in models.items():  # warm-up: allocations, optimizer state, kernels (and compilation)
        for _ in range(2):
            train_step(model, opts[name], data)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            train_step(model, opts[name], data)
            sync(device)
            peak[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(models[name], opts[name], data)
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}, peak


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- RandLoRA --------------------------------------------------------------------------------------------------
def randlora_part(args, device) -> dict:
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    from hf_fisher import FastRandLoraConfig
    from hf_fisher.tuners.randlora import FastRandLoraLayer

    configs = {
        "lora32": lambda: LoraConfig(r=32, lora_alpha=64, target_modules=ALL_LINEAR),
        "peft_rl": lambda: RandLoraConfig(r=32, target_modules=ALL_LINEAR),
        "fast_rl": lambda: FastRandLoraConfig(r=32, target_modules=ALL_LINEAR),
    }
    rows = []
    for dtype in args.dtypes:
        base = base_model(args.layers, dtype, device)
        for seq_len in args.seq_lens:
            models = {}
            for name, make in configs.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    models[name] = get_peft_model(copy.deepcopy(base), make()).train()
            data = batch(base.config.vocab_size, seq_len, device)
            med, peak = time_configs(models, data, device, args.rounds, args.steps)
            # Same init, data and number of steps: PEFT's and our trained λ, γ must agree (equal math).
            flat = {k: torch.cat([p.detach().float().flatten() for n, p in models[k].named_parameters()
                                  if p.requires_grad]) for k in ("peft_rl", "fast_rl")}
            drift = float((flat["fast_rl"] - flat["peft_rl"]).norm() / flat["peft_rl"].norm())
            paths = sorted(
                {m.last_contraction for m in models["fast_rl"].modules() if isinstance(m, FastRandLoraLayer)}
            )
            for name in configs:
                rows.append({
                    "dtype": str(dtype).removeprefix("torch."), "tokens": f"8 × {seq_len}", "config": name,
                    "trainable": trainable(models[name]), "ms_per_step": 1e3 * med[name],
                    "vs_peft_rl": med[name] / med["peft_rl"], "vs_lora32": med[name] / med["lora32"],
                    "peak_mb": peak.get(name), "paths": paths if name == "fast_rl" else None,
                    "trained_rel_diff_vs_peft": drift if name == "fast_rl" else None,
                })
                print("randlora", rows[-1], flush=True)
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del base
    return {"rows": rows}


# ---- LQ-LoRA ---------------------------------------------------------------------------------------------------
def _qlora(base, rank: int):
    """QLoRA: every target Linear replaced by a bitsandbytes NF4 Linear4bit (bf16 compute), LoRA on top."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base).cpu()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ALL_LINEAR:
            new = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            new.weight = bnb.nn.Params4bit(module.weight.data.float(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    model = model.to(base.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=ALL_LINEAR)).train()


def _lqlora(base, rank: int, bits: int, max_iter: int):
    from hf_fisher import LQLoraConfig, prepare_lqlora_model
    from hf_fisher.tuners.lqlora import NFConfig

    grid = [NFConfig(bits, 64, 8, 256, "fp32").to_dict()]
    config = LQLoraConfig(r=rank, lora_alpha=rank, target_modules=ALL_LINEAR, quant_grid=grid, max_iter=max_iter)
    start = time.perf_counter()
    model = prepare_lqlora_model(copy.deepcopy(base), config, progress=False).train()
    sync(base.device)
    return model, time.perf_counter() - start


def lqlora_part(args, device) -> dict:
    from peft import LoraConfig, get_peft_model

    import hf_fisher.tuners.lqlora.model as lq_model
    from hf_fisher.tuners.lqlora.model import quantized_layers

    rank = 64
    base = base_model(args.layers, args.dtypes[-1], device)
    models, prepare_s = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["lora_bf16_base"] = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=ALL_LINEAR)
        ).train()
    if device.type == "cuda":
        models["qlora_bnb_nf4"] = _qlora(base, rank)
    models["lqlora_nf4"], prepare_s["lqlora_nf4"] = _lqlora(base, rank, 4, args.lq_iter)
    models["lqlora_nf3"], prepare_s["lqlora_nf3"] = _lqlora(base, rank, 3, args.lq_iter)

    # Dequantizing every target matrix once: ours vs bitsandbytes' kernel.
    layers = quantized_layers(models["lqlora_nf4"])
    deq = {}

    def per_forward(fn, n: int = 5) -> float:
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - start) / n

    deq["ours_nf4"] = per_forward(lambda: [m.dequantized_weight(torch.bfloat16) for m in layers.values()])
    deq["ours_nf3"] = per_forward(
        lambda: [m.dequantized_weight(torch.bfloat16) for m in quantized_layers(models["lqlora_nf3"]).values()]
    )
    if device.type == "cuda":
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        bnb_layers = [m for m in models["qlora_bnb_nf4"].modules() if isinstance(m, bnb.nn.Linear4bit)]
        deq["bnb_nf4"] = per_forward(
            lambda: [bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in bnb_layers]
        )

    print("dequantize all", deq, "prepare", prepare_s, flush=True)
    results = {}
    data = {s: batch(base.config.vocab_size, s, device) for s in args.seq_lens}
    for seq_len in args.seq_lens:
        med, peak = time_configs(models, data[seq_len], device, args.rounds, args.steps)
        results[seq_len] = (med, peak)
        print("lqlora", seq_len, med, peak, flush=True)

    compiled = {}
    if args.compile and device.type == "cuda":
        # The same NF4 / NF3 models with the dequantization compiled (one graph per bit width and shape).
        eager = lq_model.nf_dequantize
        try:
            lq_model.nf_dequantize = torch.compile(eager, dynamic=False)
            for seq_len in args.seq_lens:
                start = time.perf_counter()
                sub = {k: models[k] for k in ("lqlora_nf4", "lqlora_nf3")}
                med, peak = time_configs(sub, data[seq_len], device, args.rounds, args.steps)
                compiled[seq_len] = (med, peak, time.perf_counter() - start)
                print("lqlora compiled", seq_len, med, peak, flush=True)
        except Exception as err:  # report, do not lose the other parts
            compiled["error"] = repr(err)[:500]
        finally:
            lq_model.nf_dequantize = eager
    return {
        "steps": {s: {"ms": {k: 1e3 * v for k, v in med.items()}, "peak_mb": peak} for s, (med, peak) in
                  results.items()},
        "compiled": {s: ({"ms": {k: 1e3 * v for k, v in c[0].items()}, "peak_mb": c[1], "wall_s": c[2]}
                         if isinstance(c, tuple) else c) for s, c in compiled.items()},
        "dequantize_all_ms": {k: 1e3 * v for k, v in deq.items()},
        "n_matrices": len(layers),
        "prepare_s": prepare_s,
        "trainable": {k: trainable(m) for k, m in models.items()},
    }


# ---- LoftQ -----------------------------------------------------------------------------------------------------
def loftq_part(args, device) -> dict:
    """PEFT's loftq_init on CUDA vs the CPU reimplementation of benchmarks/lqlora.py, same matrices."""
    from peft.utils.loftq_utils import loftq_init

    sys.path.insert(0, str(Path(__file__).parent))
    from lqlora import loftq  # the reimplementation benchmarks/lqlora.py reports

    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)] if not args.smoke else [(64, 48)]
    for out_f, in_f in shapes:
        # A weight-like matrix: decaying spectrum plus heavy-ish entries, not pure noise.
        u = torch.linalg.qr(torch.randn(out_f, out_f, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(in_f, in_f, generator=gen))[0]
        k = min(out_f, in_f)
        s = 0.5 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.6
        w = (u[:, :k] * s) @ v[:, :k].T + 0.01 * torch.randn(out_f, in_f, generator=gen)
        for iters in (1, 5):
            start = time.perf_counter()
            deq, lora_a, lora_b = loftq_init(w, num_bits=4, reduced_rank=args.rank, num_iter=iters)
            peft_s = time.perf_counter() - start
            peft_w = deq.float().cpu() + (lora_b.float() @ lora_a.float()).cpu()
            snaps, ours_s = loftq(w, args.rank, iters)
            ours_w = snaps[-1].float()
            norm = float(w.norm())
            rows.append({
                "shape": f"{out_f}×{in_f}", "iters": iters, "peft_rel_err": float((w - peft_w).norm()) / norm,
                "reimpl_rel_err": float((w - ours_w).norm()) / norm,
                "rel_diff": float((peft_w - ours_w).norm()) / norm, "peft_s": peft_s, "reimpl_cpu_s": ours_s,
            })
            print("loftq", rows[-1], flush=True)
    return {"rows": rows, "rank": args.rank}


# ---- report ----------------------------------------------------------------------------------------------------
def report(res: dict, conditions: str) -> str:
    out = ["# GPU checks", "", "Generated by benchmarks/gpu.py.", "", conditions, ""]
    if "randlora" in res:
        out += ["## RandLoRA: step time and peak memory", "",
                "| dtype | batch | config | trainable | ms/step (median) | vs PEFT RandLoRA | vs LoRA r=32 | "
                "peak step memory above model (MB) |", "|---|---|---|---|---|---|---|---|"]
        for r in res["randlora"]["rows"]:
            peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else ""
            out.append(f"| {r['dtype']} | {r['tokens']} | {r['config']} | {r['trainable']:,} | "
                       f"{r['ms_per_step']:.1f} | {r['vs_peft_rl']:.2f}× | {r['vs_lora32']:.2f}× | {peak} |")
        paths = {f"{r['dtype']} {r['tokens']}": r["paths"] for r in res["randlora"]["rows"] if r["paths"]}
        out += ["", "Contraction paths chosen by `auto`: " + "; ".join(f"{k}: {v}" for k, v in paths.items()), ""]
        drift = {f"{r['dtype']} {r['tokens']}": r["trained_rel_diff_vs_peft"] for r in res["randlora"]["rows"]
                 if r["trained_rel_diff_vs_peft"] is not None}
        out += ["Relative difference of the trained λ, γ, ours vs PEFT's, after the same steps on the same batch "
                "from the same init: " + "; ".join(f"{k}: {v:.1e}" for k, v in drift.items()), ""]
    if "lqlora" in res:
        lq = res["lqlora"]
        out += ["## LQ-LoRA vs QLoRA: step time and peak memory (bf16 compute, LoRA r=64, 7 projections)", "",
                "| batch | config | trainable | ms/step (median) | peak step memory above model (MB) |",
                "|---|---|---|---|---|"]
        for seq_len, entry in lq["steps"].items():
            for name, ms in entry["ms"].items():
                peak = entry["peak_mb"].get(name)
                out.append(f"| 8 × {seq_len} | {name} | {lq['trainable'][name]:,} | {ms:.1f} | "
                           f"{'' if peak is None else f'{peak:.0f}'} |")
            comp = lq["compiled"].get(seq_len)
            if isinstance(comp, dict):
                for name, ms in comp["ms"].items():
                    out.append(f"| 8 × {seq_len} | {name}, dequantization torch.compile'd | "
                               f"{lq['trainable'][name]:,} | {ms:.1f} | {comp['peak_mb'].get(name, 0):.0f} |")
        if "error" in lq["compiled"]:
            out.append(f"\ntorch.compile of the dequantization failed: `{lq['compiled']['error']}`")
        out += ["", f"Dequantizing all {lq['n_matrices']} target matrices once (bf16 out), ms: "
                + ", ".join(f"{k} {v:.2f}" for k, v in lq["dequantize_all_ms"].items()),
                "", "prepare_lqlora_model (decomposition of every matrix), s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in lq["prepare_s"].items()), ""]
    if "loftq" in res:
        out += [f"## LoftQ: PEFT's loftq_init (CUDA) vs the CPU reimplementation (NF4, rank {res['loftq']['rank']})",
                "", "| matrix | iterations | PEFT rel. error | reimpl. rel. error | ‖W_PEFT − W_reimpl‖/‖W‖ | "
                "PEFT s | reimpl. CPU s |", "|---|---|---|---|---|---|---|"]
        for r in res["loftq"]["rows"]:
            out.append(f"| {r['shape']} | {r['iters']} | {r['peft_rel_err']:.5f} | {r['reimpl_rel_err']:.5f} | "
                       f"{r['rel_diff']:.1e} | {r['peft_s']:.3f} | {r['reimpl_cpu_s']:.3f} |")
        out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="randlora,lqlora,loftq")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    parser.add_argument("--lq-iter", type=int, default=5, help="decomposition iterations of the LQ-LoRA models")
    parser.add_argument("--rank", type=int, default=32, help="LoftQ rank")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.layers, args.seq_lens = (2, [16]) if args.smoke else (0, [128, 512])
    args.dtypes = [torch.float32] if args.smoke else [torch.float32, torch.bfloat16]  # bf16 on CPU is very slow
    if args.smoke:
        args.rounds, args.steps, args.lq_iter, args.rank = 1, 1, 1, 4
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import bitsandbytes
    import peft
    import transformers

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    conditions = (f"Conditions: {now}, {gpu}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes "
                  f"{bitsandbytes.__version__}; SmolLM2-135M architecture "
                  f"({'2 blocks, smoke run' if args.smoke else '30 blocks'}) with random weights; medians over "
                  f"{args.rounds} interleaved rounds of {args.steps} steps after 2 warm-up steps; AdamW lr 1e-4.")
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    parts = {"randlora": randlora_part, "lqlora": lqlora_part, "loftq": loftq_part}
    for part in args.parts.split(","):
        if part == "loftq" and device.type != "cuda":
            continue
        start = time.perf_counter()
        try:
            res[part] = parts[part](args, device)
        except Exception as err:  # keep what the other parts measured
            import traceback

            traceback.print_exc()
            res[f"{part}_error"] = repr(err)[:1000]
        print(f"part {part}: {time.perf_counter() - start:.0f} s", flush=True)
        (args.out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "gpu.md").write_text(report(res, conditions))
    print(report(res, conditions))


if __name__ == "__main__":
    main()
