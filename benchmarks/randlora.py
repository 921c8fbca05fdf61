"""Fast RandLoRA vs PEFT's RandLoRA (and LoRA, full fine-tuning) on the default model.

Parts (all on SmolLM2-135M-Instruct, fp32, packed lee_background text, AdamW):

* ``speed``: training step time (forward + backward + optimizer step) for batches of 8 × 128 and 8 × 512 tokens, all
  configurations built side by side in one process and timed interleaved (round-robin, order rotated every round),
  median over the rounds; plus the analytic multiply-add count of each contraction path.
* ``memory``: peak memory of a training step above the loaded, wrapped model: one fresh subprocess per configuration
  and batch size, resident set size polled every 2 ms during two steps (CPU has no allocator statistics).
* ``files``: adapter file sizes and trainable parameter counts.
* ``finetune``: a short fine-tune of PEFT's RandLoRA and ours from the same init on the same batches, steps
  interleaved, to show equal loss curves.

Configurations: ``lora32`` (LoRA r=32, alpha=64), ``peft_rl`` / ``fast_rl`` (RandLoRA r=32, PEFT's defaults otherwise,
alpha=640), all on the 7 projections of every block; ``peft_rl_qv`` / ``fast_rl_qv`` (PEFT's default target modules for
Llama, q_proj and v_proj). Full fine-tuning is left out (this shared 2-core machine has no memory or time to spare
for it); at 8 × 512 tokens and in the memory part only lora32, peft_rl and fast_rl run, for the same reason.

Run: ``python benchmarks/randlora.py [--part speed|memory|files|finetune|fisher|all] [--threads 1]``;
writes benchmarks/results/randlora.md (each part fills its own section of the file).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hf_fisher import FastRandLoraConfig, convert_to_peft_randlora, load_default_model  # noqa: E402
from hf_fisher.data import load_text_corpus, pack_for_causal_lm  # noqa: E402
from hf_fisher.tuners.randlora import FastRandLoraLayer, contraction_costs  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "randlora.md"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ["lora32", "peft_rl", "fast_rl", "peft_rl_qv", "fast_rl_qv"]
MEMORY_CONFIGS = ["lora32", "peft_rl", "fast_rl"]
LR = 1e-4


def make_config(name: str):
    from peft import LoraConfig, RandLoraConfig

    if name == "lora32":
        return LoraConfig(r=32, lora_alpha=64, target_modules=ALL_LINEAR)
    if name == "peft_rl":
        return RandLoraConfig(r=32, target_modules=ALL_LINEAR)
    if name == "fast_rl":
        return FastRandLoraConfig(r=32, target_modules=ALL_LINEAR)
    if name == "peft_rl_qv":
        return RandLoraConfig(r=32)
    if name == "fast_rl_qv":
        return FastRandLoraConfig(r=32)
    raise ValueError(name)


def build(name: str, base) -> torch.nn.Module:
    """A trainable model for configuration ``name`` from a private copy of ``base``."""
    from peft import get_peft_model

    model = copy.deepcopy(base)
    if name == "full":
        model.requires_grad_(True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, make_config(name))
    return model.train()


def batches(tokenizer, seq_len: int, n: int, split: str = "train") -> list[dict[str, torch.Tensor]]:
    data = pack_for_causal_lm(
        load_text_corpus("lee_background")[split], tokenizer, seq_len=seq_len, max_sequences=8 * n
    )
    return [
        {k: torch.stack([data[i][k] for i in range(s, s + 8)]) for k in ("input_ids", "attention_mask", "labels")}
        for s in range(0, 8 * n, 8)
    ]


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def step(model, opt, batch) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- analytic multiply-add counts ------------------------------------------------------------------------------
def linear_shapes(model) -> list[tuple[str, int, int]]:
    """(name, in, out) of every block linear of the model."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in ALL_LINEAR):
            out.append((name, module.in_features, module.out_features))
    return out


def adapter_macs(shapes, tokens: int, r: int, targets: list[str]) -> dict[str, int]:
    """Multiply-adds a training step adds to the base layers: PEFT's per-token order, and ours (the cheaper path)."""
    peft = fast = 0
    for name, fan_in, fan_out in shapes:
        if not any(name.endswith(t) for t in targets):
            continue
        rank = r * -(-min(fan_in, fan_out) // r)
        costs = contraction_costs(tokens, fan_in, fan_out, rank, grad=True, fold=True)
        peft += costs["per_token"]
        fast += min(costs.values())
    return {"peft": peft, "fast": fast}


def base_macs(model, shapes, tokens: int, seq_len: int) -> int:
    """Approximate multiply-adds of a frozen-base training step: forward + input gradient of every matmul."""
    cfg = model.config
    linear = sum(i * o for _, i, o in shapes) * tokens
    head = cfg.hidden_size * cfg.vocab_size * tokens
    attention = 2 * seq_len * cfg.hidden_size * tokens * cfg.num_hidden_layers  # QKᵀ and AV (full, as SDPA on CPU)
    return 2 * (linear + head) + 3 * attention


# ---- speed -----------------------------------------------------------------------------------------------------
def speed_part(
    base, tokenizer, rounds: dict[int, int], conditions: str, speed_configs: dict[int, list[str]], title: str
) -> None:
    """Writes its section after each batch size, so a run cut short still leaves what it measured."""
    shapes = linear_shapes(base)
    lines = [
        "| batch | config | trainable params | CPU s/step (median) | wall s/step (median) | CPU vs PEFT RandLoRA "
        "(same targets) | wall vs PEFT RandLoRA | CPU vs LoRA r=32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    flop_lines = [
        "| batch | targets | base step (GMAC, approx.) | PEFT adapter (GMAC) | ours (GMAC) | ours/PEFT adapter | "
        "predicted step ratio | measured step ratio (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    path_lines = []
    for seq_len, n_rounds in rounds.items():
        configs = speed_configs[seq_len]
        data = batches(tokenizer, seq_len, 1)[0]
        models = {name: build(name, base) for name in configs}
        opts = {name: optimizer(m) for name, m in models.items()}
        for name in configs:  # warm-up (allocations, optimizer state)
            step(models[name], opts[name], data)
        times: dict[str, list[float]] = {name: [] for name in configs}
        cpu: dict[str, list[float]] = {name: [] for name in configs}
        for i in range(n_rounds):
            order = configs[i % len(configs) :] + configs[: i % len(configs)]
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                step(models[name], opts[name], data)
                cpu[name].append(time.process_time() - start_cpu)
                times[name].append(time.perf_counter() - start)
            print(seq_len, i, {k: (round(v[-1], 2), round(cpu[k][-1], 2)) for k, v in times.items()}, flush=True)
        wall = {k: statistics.median(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in cpu.items()}
        for name in configs:
            ref = {"fast_rl": "peft_rl", "fast_rl_qv": "peft_rl_qv"}.get(name)
            vs_peft = f"{med[name] / med[ref]:.2f}× | {wall[name] / wall[ref]:.2f}×" if ref else " | "
            vs_lora = f"{med[name] / med['lora32']:.2f}×" if "lora32" in med else ""
            lines.append(
                f"| 8 × {seq_len} | {name} | {trainable(models[name]):,} | {med[name]:.2f} | {wall[name]:.2f} | "
                f"{vs_peft} | {vs_lora} |"
            )
        paths = sorted({m.last_contraction for m in models["fast_rl"].modules() if isinstance(m, FastRandLoraLayer)})
        path_lines.append(f"- 8 × {seq_len}: `auto` chose {paths} for the 7-projection adapter.")
        tokens = 8 * seq_len
        base_cost = base_macs(base, shapes, tokens, seq_len)
        for targets, peft_name, fast_name in (
            (ALL_LINEAR, "peft_rl", "fast_rl"),
            (["q_proj", "v_proj"], "peft_rl_qv", "fast_rl_qv"),
        ):
            if fast_name not in med:
                continue
            a = adapter_macs(shapes, tokens, 32, targets)
            predicted = (base_cost + a["fast"]) / (base_cost + a["peft"])
            flop_lines.append(
                f"| 8 × {seq_len} | {len(targets)} projections | {base_cost / 1e9:.0f} | {a['peft'] / 1e9:.0f} | "
                f"{a['fast'] / 1e9:.0f} | {a['fast'] / a['peft']:.2f} | {predicted:.2f} | "
                f"{med[fast_name] / med[peft_name]:.2f} |"
            )
        del models, opts
        write_section(title, _speed_text(lines, path_lines, flop_lines, rounds), conditions)


def _speed_text(lines: list[str], path_lines: list[str], flop_lines: list[str], rounds: dict[int, int]) -> str:
    note = (
        "Medians over " + ", ".join(f"{n} interleaved round(s) at 8 × {s}" for s, n in rounds.items())
        + ", after one warm-up step each. CPU s/step is the process's CPU time (all its compute threads), less "
        "sensitive than wall time to other jobs on the machine; the ratios use it.\n\n"
    )
    return (
        note
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(path_lines)
        + "\n\nMultiply-add counts (one training step):\n\n"
        + "\n".join(flop_lines)
        + "\n"
    )


# ---- memory ----------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_one(name: str, seq_len: int) -> dict:
    """Peak RSS above the wrapped model during two training steps (run in a fresh process)."""
    base, tokenizer = load_default_model()
    data = batches(tokenizer, seq_len, 1)[0]
    model = build(name, base)
    del base
    opt = optimizer(model)
    baseline = _rss()
    peak = [baseline]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    for _ in range(2):
        step(model, opt, data)
    stop.set()
    thread.join()
    return {"peak_mb": (peak[0] - baseline) / 2**20}


def memory_part(threads: int, conditions: str, sizes: list[int]) -> None:
    """One fresh process per configuration; the section is rewritten after each measurement."""
    lines = [
        "| batch | config | peak step memory above the loaded model (MB) | vs PEFT RandLoRA |",
        "|---|---|---|---|",
    ]
    plan = {128: MEMORY_CONFIGS, 512: ["peft_rl", "fast_rl"]}  # 8 × 512: the comparison that matters, for time
    plan = {size: names for size, names in plan.items() if size in sizes}
    for seq_len, names in plan.items():
        peaks = {}
        for name in names:
            env = {
                **os.environ,
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                "OMP_NUM_THREADS": str(threads),
            }
            out = subprocess.run(
                [sys.executable, __file__, "--memory-one", name, str(seq_len), "--threads", str(threads)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout
            peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
            print("memory", seq_len, name, round(peaks[name]), flush=True)
            ref = {"fast_rl": "peft_rl"}.get(name)
            ratio = f"{peaks[name] / peaks[ref]:.2f}×" if ref in peaks else ""
            lines.append(f"| 8 × {seq_len} | {name} | {peaks[name]:.0f} | {ratio} |")
            title = "Peak memory" + ("" if sizes == [128, 512] else ", " + " and ".join(f"8 × {s}" for s in sizes))
            write_section(title, "\n".join(lines) + "\n", conditions)


# ---- files -----------------------------------------------------------------------------------------------------
def files_part(base) -> str:
    from peft import RandLoraConfig, get_peft_model

    lines = ["| adapter | trainable params | file (MB) | file / trainable fp32 bytes |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants = {
            "LoRA r=32": make_config("lora32"),
            "PEFT RandLoRA r=32 (save_projection=True, its default)": RandLoraConfig(r=32, target_modules=ALL_LINEAR),
            "PEFT RandLoRA r=32 (save_projection=False)": RandLoraConfig(
                r=32, target_modules=ALL_LINEAR, save_projection=False
            ),
            "ours r=32 (default: bases regenerated from the seed)": make_config("fast_rl"),
            "ours r=32, save_projection=True (bases once)": FastRandLoraConfig(
                r=32, target_modules=ALL_LINEAR, save_projection=True
            ),
        }
        for i, (label, config) in enumerate(variants.items()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(copy.deepcopy(base), config)
            folder = tmp / str(i)
            model.save_pretrained(folder)
            size = (folder / "adapter_model.safetensors").stat().st_size
            n = trainable(model)
            lines.append(f"| {label} | {n:,} | {size / 1e6:.1f} | {size / (4 * n):.3f} |")
            if isinstance(config, FastRandLoraConfig) and not config.save_projection:
                convert_to_peft_randlora(folder, tmp / "vanilla")
                size = (tmp / "vanilla" / "adapter_model.safetensors").stat().st_size
                lines.append(
                    f"| ours converted to vanilla PEFT RandLoRA (`convert_to_peft_randlora`) | {n:,} | "
                    f"{size / 1e6:.1f} | {size / (4 * n):.3f} |"
                )
            del model
    return "\n".join(lines) + "\n"


# ---- fine-tune -------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, data) -> float:
    model.eval()
    loss = statistics.mean(float(model(**b).loss) for b in data)
    model.train()
    return loss


def finetune_part(base, tokenizer, steps: int) -> str:
    train = batches(tokenizer, 128, steps)
    heldout = batches(tokenizer, 128, 2, split="heldout")
    models = {name: build(name, base) for name in ("peft_rl", "fast_rl")}
    opts = {name: optimizer(m) for name, m in models.items()}
    start = {name: heldout_loss(m, heldout) for name, m in models.items()}
    curves: dict[str, list[float]] = {name: [] for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i, batch in enumerate(train):
        for name in ("peft_rl", "fast_rl") if i % 2 == 0 else ("fast_rl", "peft_rl"):
            t0 = time.process_time()
            curves[name].append(step(models[name], opts[name], batch))
            times[name].append(time.process_time() - t0)
        print("finetune", i, {k: round(v[-1], 4) for k, v in curves.items()}, flush=True)
    end = {name: heldout_loss(m, heldout) for name, m in models.items()}
    lam = {
        name: torch.cat([p.detach().flatten() for n, p in m.named_parameters() if p.requires_grad])
        for name, m in models.items()
    }
    drift = float((lam["fast_rl"] - lam["peft_rl"]).norm() / lam["peft_rl"].norm())
    lines = ["| step | PEFT RandLoRA loss | ours loss | |difference| |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(curves["peft_rl"], curves["fast_rl"], strict=True)):
        lines.append(f"| {i + 1} | {a:.5f} | {b:.5f} | {abs(a - b):.1e} |")
    return (
        "\n".join(lines)
        + f"\n\nHeld-out loss (2 × 8 × 128 lee_background tokens): before {start['peft_rl']:.4f} / "
        f"{start['fast_rl']:.4f}, after {end['peft_rl']:.4f} (PEFT) / {end['fast_rl']:.4f} (ours). "
        "Relative difference of the trained λ, γ after "
        f"{steps} steps: {drift:.1e}. Median CPU time per step in this run (interleaved, same batches): "
        f"PEFT {statistics.median(times['peft_rl']):.2f} s, ours {statistics.median(times['fast_rl']):.2f} s "
        f"({statistics.median(times['fast_rl']) / statistics.median(times['peft_rl']):.2f}×).\n"
    )


# ---- Fisher-shaped bases vs random bases ----------------------------------------------------------------------
def fisher_part(base, tokenizer, steps: int) -> str:
    """Same task, steps, data and learning rate: RandLoRA with random bases vs basis="fisher" (Fisher on the task)."""
    from peft import get_peft_model

    from hf_fisher import estimate_diagonal_fisher, initialize_fisher_basis

    def shakespeare(split: str, n: int) -> list[dict[str, torch.Tensor]]:
        data = pack_for_causal_lm(load_text_corpus("shakespeare")[split], tokenizer, seq_len=128, max_sequences=8 * n)
        keys = ("input_ids", "attention_mask", "labels")
        return [{k: torch.stack([data[i][k] for i in range(s, s + 8)]) for k in keys} for s in range(0, 8 * n, 8)]

    train, heldout = shakespeare("train", steps + 4), shakespeare("heldout", 2)
    fisher_data, train = train[:4], train[4:]
    start = time.perf_counter()
    fisher = estimate_diagonal_fisher(base, fisher_data, target_modules=ALL_LINEAR)
    fisher_s = time.perf_counter() - start
    models = {}
    for basis in ("random", "fisher"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[basis] = get_peft_model(
                copy.deepcopy(base), FastRandLoraConfig(r=32, target_modules=ALL_LINEAR, basis=basis)
            ).train()
    initialize_fisher_basis(models["fisher"], fisher)
    opts = {k: optimizer(m) for k, m in models.items()}
    before = heldout_loss(models["random"], heldout)
    curves: dict[str, list[float]] = {k: [] for k in models}
    for i, batch in enumerate(train):
        for basis in (("random", "fisher") if i % 2 == 0 else ("fisher", "random")):
            curves[basis].append(step(models[basis], opts[basis], batch))
        print("fisher", i, {k: round(v[-1], 4) for k, v in curves.items()}, flush=True)
    after = {k: heldout_loss(m, heldout) for k, m in models.items()}
    lines = ["| bases | train loss, first step | train loss, last step | held-out loss after |", "|---|---|---|---|"]
    for basis in models:
        lines.append(f"| {basis} | {curves[basis][0]:.4f} | {curves[basis][-1]:.4f} | {after[basis]:.4f} |")
    return (
        "Task: Shakespeare (domain adaptation), 8 × 128-token batches; diagonal Fisher (empirical, per sequence) of "
        f"the 7 projections on 4 training batches not used for training ({fisher_s:.0f} s). Held-out loss before "
        f"training: {before:.4f}. One seed, {len(train)} steps: a smoke test of the idea, not evidence either way.\n\n"
        + "\n".join(lines) + "\n"
    )


# ---- results file ----------------------------------------------------------------------------------------------
def write_section(title: str, body: str, conditions: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Fast RandLoRA benchmark\n\nGenerated by benchmarks/randlora.py.\n"
    )
    block = f"## {title}\n\n{conditions}\n\n{body}\n"
    pattern = re.compile(rf"## {re.escape(title)}\n.*?(?=\n## |\Z)", re.S)
    text = (
        pattern.sub(lambda _: block.rstrip("\n") + "\n", text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + block
    )
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["speed", "memory", "files", "finetune", "fisher", "all"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds-128", type=int, default=2)
    parser.add_argument("--rounds-512", type=int, default=1)
    parser.add_argument("--finetune-steps", type=int, default=6)
    parser.add_argument("--fisher-steps", type=int, default=8)
    parser.add_argument("--sizes", default="128,512", help="sequence lengths of the speed part (batch 8)")
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (memory-limited runs)")
    parser.add_argument("--configs", default="", help="comma-separated configurations of the speed part")
    parser.add_argument("--memory-sizes", default="128,512", help="sequence lengths of the memory part")
    parser.add_argument("--memory-one", nargs=2, metavar=("CONFIG", "SEQ_LEN"))
    parser.add_argument("--shared", action="store_true", help="say in the results that other jobs shared the machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_one:
        print(json.dumps(memory_one(args.memory_one[0], int(args.memory_one[1]))))
        return
    load = os.getloadavg()[0]
    conditions = (
        f"Conditions: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{args.threads} thread(s), fp32 CPU, a 2-core machine{' shared with other jobs' if args.shared else ''} "
        f"(1-min load average {load:.1f} at the start of this part), SmolLM2-135M-Instruct, AdamW lr {LR}."
    )
    base, tokenizer = load_default_model()
    base.requires_grad_(False)
    if args.layers:
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
        conditions += f" Model truncated to its first {args.layers} of 30 blocks (same layer shapes; memory limits)."
    if args.part in ("files", "all"):
        write_section("Adapter files", files_part(base), conditions)
    if args.part in ("speed", "all"):
        sizes = [int(x) for x in args.sizes.split(",")]
        rounds = {size: {128: args.rounds_128, 512: args.rounds_512}[size] for size in sizes}
        default = {128: CONFIGS, 512: MEMORY_CONFIGS}
        chosen = {size: (args.configs.split(",") if args.configs else default[size]) for size in sizes}
        title = "Step time" if sizes == [128, 512] else "Step time, " + " and ".join(f"8 × {s}" for s in sizes)
        title += f", first {args.layers} blocks" if args.layers else ""
        speed_part(base, tokenizer, rounds, conditions, chosen, title)
    if args.part in ("memory", "all"):
        memory_part(args.threads, conditions, [int(x) for x in args.memory_sizes.split(",")])
    if args.part in ("finetune", "all"):
        write_section(
            "Short fine-tune: PEFT RandLoRA vs ours", finetune_part(base, tokenizer, args.finetune_steps), conditions
        )
    if args.part == "fisher":  # not part of "all": second priority, run on its own
        write_section("basis='fisher' vs random bases", fisher_part(base, tokenizer, args.fisher_steps), conditions)


if __name__ == "__main__":
    main()
