"""Latency benchmark: what each part of a sampling step costs, and the speedups, in one run.

    python benchmarks/latency.py                              # trained models in data/ (after dvc repro)
    python benchmarks/latency.py --random --profile default   # untrained, the same sizes
    python benchmarks/latency.py --random --profile paper-maskgit-512 --layers 2 --batch 2
    python benchmarks/latency.py --random --profile paper-dimoo --layers 1 --batch 1

Part 1, for any profile: one step of the base (features, both CFG branches), one step of the
shortcut (both branches, the gathered tokens of an average step) and the sampler's own work at
a step (head at the still-masked positions, CFG, draws, confidence, choice: `commit_step`), each
as a share of a base step; then the speedup share of N/B these costs imply at the profile's or
the paper's (N, B) points, beside the paper's own figures. `--layers k` builds k of the base's
layers and scales the base step to the full depth (the paper bases do not fit a CPU run whole).
The shortcut's and the sampler's work grow with the positions still masked M (the shortcut
predicts only those): both are timed at five steps and interpolated linearly in M over the others.

Part 2, for the tiny MaskGIT of a trained profile: vanilla N against the shortcut and reuse at
several budgets, end to end, sampled as the sample stage samples (on a CPU: a slice of the batch
per thread); on a CPU also vanilla with the whole batch on all threads, for the gain of slicing.
Warm-up dropped, median of repeats, threads fixed, CUDA timers synchronised; part 2 times its
configurations in rounds (`measure_latencies`), so the machine's drift does not tilt a speedup.
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migm_shortcut.bases import build_base, load_base, tiny_maskgit_config  # noqa: E402
from migm_shortcut.bases.dimoo import (CODEBOOK, IMAGE_OFFSET, LLaDAConfig, LLaDAModelLM,  # noqa: E402
                                       LuminaDiMOO)
from migm_shortcut.config import load_params  # noqa: E402
from migm_shortcut.hardware import keep_freed_memory  # noqa: E402
from migm_shortcut.latency import measure_latencies, measure_latency  # noqa: E402
from migm_shortcut.noise import sample_keys  # noqa: E402
from migm_shortcut.sampling import (FeatureSource, Learned, Reuse, StepState, commit_step,  # noqa: E402
                                    fixed_threads, generate, generate_on_cores, sampling_autocast)
from migm_shortcut.schedules import REVEAL, SamplingRule, refresh_steps  # noqa: E402
from migm_shortcut.shortcut import Shortcut, ShortcutSpec, compiled, load_shortcut  # noqa: E402
from migm_shortcut.tokenizer import tokenizer_config  # noqa: E402

# The paper's MaskGIT-512 latencies (SPEC section 7): speedup against vanilla at the same N.
PAPER = {(15, 7): 50.1 / 25.9, (15, 8): 50.1 / 28.8, (32, 8): 104.6 / 33.7, (32, 9): 104.6 / 36.8,
         (32, 12): 104.6 / 45.9}
PAPER_POINTS = {"maskgit-imagenet": list(PAPER), "dimoo": [(64, 11), (64, 16)]}


def random_base(p, layers: int | None):
    """A base of the profile's architecture with random weights (`layers` of its depth)."""
    b, depth = p.base, layers or p.base.depth
    if b.name == "tiny-maskgit":
        tokenizer = tokenizer_config(p.tokenizer, p.data.image_size, channels=1)
        return build_base(tiny_maskgit_config(b, tokenizer, num_classes=10, depth=depth))
    pub = b.published
    if b.name == "maskgit-imagenet":
        return build_base({"kind": b.name, "image_size": p.data.image_size, "hidden_dim": b.width,
                           "depth": depth, "heads": b.heads, "mlp_dim": int(b.width * b.mlp_ratio),
                           "codebook_size": pub.codebook_size, "num_classes": pub.num_classes})
    llada = LLaDAModelLM(LLaDAConfig(d_model=b.width, n_heads=b.heads, n_layers=depth,
                                     mlp_hidden_size=int(b.width * b.mlp_ratio), vocab_size=IMAGE_OFFSET + CODEBOOK,
                                     pad_token_id=None))
    return LuminaDiMOO(llada, image_size=p.data.image_size, prompt_len=pub.prompt_len, uncond_prompt=[1, 2, 3])


def models(args, p, dev):
    if args.random:
        base = random_base(p, args.layers)
        s = p.shortcut
        spec = ShortcutSpec.of(s, base.dim, base.shortcut_variant)
        return base.to(dev).eval().requires_grad_(False), Shortcut(spec).to(dev).eval()
    base = load_base("data/base/model.safetensors", dev)
    return base, load_shortcut("data/shortcut/model.safetensors", base.base_id).to(dev)


def conditions(base, batch: int, dev) -> torch.Tensor:
    if isinstance(base, LuminaDiMOO):  # random prompt ids, the whole prompt length
        return torch.randint(0, IMAGE_OFFSET - 1000, (batch, base.prompt_len), device=dev)
    return torch.arange(batch, device=dev) % base.num_classes


def step_costs(base, shortcut, rule, cond, timing, scale: float) -> tuple[float, np.ndarray, np.ndarray]:
    """ms per image of (a base step, a shortcut step at each of the N steps, the sampler's work at
    each of the N steps). Both of the latter grow with the positions still masked: timed at five
    steps, interpolated linearly in their count over the others."""
    B, L, N, dev = len(cond), base.num_tokens, rule.steps, cond.device
    reveal = REVEAL[rule.schedule](N, L)
    amp = torch.autocast(dev.type, dtype=sampling_autocast(dev)) if sampling_autocast(dev) else nullcontext()
    both = torch.cat([cond, base.uncond(cond)])
    tokens = torch.randint(0, base.codebook_size, (2 * B, L), device=dev)
    with amp:
        full = measure_latency(lambda: base.features(tokens, both), **timing)["median_ms_per_image"] * scale
        f = base.features(tokens, both)
    R = max(1, round(float(np.mean(reveal[:-1]))))
    new_positions = torch.stack([torch.randperm(L, device=dev)[:R] for _ in range(B)]).repeat(2, 1)
    learned = Learned(shortcut, base)
    keys = sample_keys(0, torch.arange(B, device=dev))
    masked_at = L - np.cumsum([0] + reveal[:-1])
    timed = sorted({0, N // 4, N // 2, 3 * N // 4, N - 1})
    short, work = [], []
    for i in timed:
        masked = torch.stack([torch.randperm(L, device=dev)[: masked_at[i]] for _ in range(B)])
        state = StepState(i, N, f, tokens[:B], tokens[:, :R], new_positions,
                          torch.full((2 * B,), masked_at[i] / L, device=dev), masked.repeat(2, 1), both)
        with amp:
            short.append(measure_latency(lambda: learned.predict(state), **timing)["median_ms_per_image"])
        work.append(measure_latency(lambda: commit_step(base, rule, f, masked, keys, i, reveal[i]),
                                    **timing)["median_ms_per_image"])
    order = np.argsort(masked_at[timed])
    x = masked_at[timed][order]
    return full, np.interp(masked_at, x, np.array(short)[order]), np.interp(masked_at, x, np.array(work)[order])


def implied_speedup(full: float, short: np.ndarray, work: np.ndarray, budget: int) -> float:
    """Vanilla N's time over the time of B full and N - B shortcut steps (on the uniform grid), the
    sampler's work in both."""
    N = len(work)
    shortcut_steps = [i for i in range(N) if i not in refresh_steps(N, budget)]
    return (N * full + work.sum()) / (budget * full + short[shortcut_steps].sum() + work.sum())


def part1(args, p, base, shortcut, dev, timing) -> None:
    scale = p.base.depth / args.layers if args.layers else 1.0
    cond = conditions(base, timing["batch_size"], dev)
    # Once per (N, B): the implied speedup does not depend on where the refreshes are placed.
    grid = dict.fromkeys((s.steps, b) for s in p.sample.shortcut for b in s.budgets)
    points = PAPER_POINTS.get(p.base.name) or list(grid)
    depth = f"{args.layers} of {p.base.depth} layers, scaled" if args.layers else f"{p.base.depth} layers"
    print(f"part 1: step costs at batch {len(cond)} on {args.threads} intra-op threads, L = {base.num_tokens}, "
          f"K = {base.codebook_size}, D = {base.dim}, base {depth}")
    for N in sorted({n for n, _ in points}):
        full, short, work = step_costs(base, shortcut, SamplingRule.of(p.sampling, N), cond, timing, scale)
        print(f"  N = {N}: base step {full:.3f} ms/img; shortcut step {short[1:].mean():.3f} ms/img on average "
              f"over steps 1 to N - 1 ({short[1:].mean() / full:.1%} of a base step; {short.max() / full:.1%} "
              f"at its largest); sampler's own work {work.mean():.3f} ms/img per step on average "
              f"({work.mean() / full:.1%}; {work.max() / full:.1%} at its largest step)")
        for n, b in points:
            if n == N:
                s = implied_speedup(full, short, work, b)
                paper = f"; paper {PAPER[n, b]:.2f}x, {PAPER[n, b] / (n / b):.0%}" if (n, b) in PAPER else ""
                print(f"    N{n} B{b}: implied speedup {s:.2f}x of N/B {n / b:.2f}x = {s / (n / b):.0%}{paper}")


def part2(args, p, base, shortcut, dev, timing) -> None:
    B = timing["batch_size"]
    cond, ids, rule = conditions(base, B, dev), list(range(B)), SamplingRule.of(p.sampling, args.steps)

    def run(budget, source):
        return lambda: generate_on_cores(args.threads, base, rule, cond, ids, 0, budget=budget, source=source,
                                         slice_batch=not args.compile,  # as the sample stage runs it
                                         autocast_dtype=sampling_autocast(dev))

    runs = {"vanilla": run(None, FeatureSource)}
    whole_batch = dev.type == "cpu" and args.threads > 1 and not args.compile
    if whole_batch:
        def whole():
            with fixed_threads(args.threads):
                generate(base, rule, cond, ids, 0)
        runs["whole"] = whole
    for name, source in (("shortcut", lambda: Learned(shortcut, base)), ("reuse", Reuse)):
        runs |= {(name, b): run(b, source) for b in args.budgets}
    ms = {key: t["median_ms_per_image"] for key, t in measure_latencies(runs, **timing).items()}
    print(f"part 2: end to end, batch {B}, {args.threads} threads, every configuration's timed batches "
          f"in rounds")
    vanilla = ms.pop("vanilla")
    print(f"  vanilla N={args.steps}: {vanilla:.2f} ms/img")
    if whole_batch:
        whole_ms = ms.pop("whole")
        print(f"    the whole batch on {args.threads} intra-op threads instead of a slice per thread: "
              f"{whole_ms:.2f} ms/img ({whole_ms / vanilla:.2f}x the time)")
    for (name, b), t in ms.items():
        print(f"  {name} N={args.steps} B={b}: {t:.2f} ms/img, speedup {vanilla / t:.2f}x "
              f"(limit N/B {args.steps / b:.2f}x, {vanilla / t / (args.steps / b):.0%} of it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="read sizes from profiles/NAME.yaml instead of params.yaml")
    parser.add_argument("--random", action="store_true", help="untrained models of the profile's sizes")
    parser.add_argument("--layers", type=int, help="build this many base layers, scale the base step to the depth")
    parser.add_argument("--batch", type=int, help="default: the profile's sample.batch_size")
    parser.add_argument("--steps", type=int, default=16, help="part 2's N")
    parser.add_argument("--budgets", type=int, nargs="+", default=[3, 4, 8], help="part 2's budgets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the base's features and the shortcut (default: sample.compile)")
    args = parser.parse_args()
    p = load_params(f"profiles/{args.profile}.yaml" if args.profile else "params.yaml")
    args.compile = p.sample.compile if args.compile is None else args.compile
    if p.is_published and not args.random:
        parser.error("a published profile is timed with --random (its architecture, random weights); the trained "
                     "base's own latencies are in data/samples/*/info.json")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory()  # as every stage does (stages/common.py)
    with fixed_threads(args.threads), torch.inference_mode():  # as `generate` samples
        base, shortcut = models(args, p, dev)
        if args.compile:  # compiled at the first (warm-up) call of each shape
            base, shortcut = base.compile_features(), compiled(shortcut)
        timing = dict(warmup=1, repeats=args.repeats, batch_size=args.batch or p.sample.batch_size, device=dev)
        print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
              f"threads {args.threads}, {'compiled' if args.compile else 'eager'}, base {base.transformer_parameters() / 1e6:.2f}M params, "
              f"shortcut {sum(t.numel() for t in shortcut.parameters()) / 1e6:.3f}M params")
        part1(args, p, base, shortcut, dev, timing)
        if p.base.name == "tiny-maskgit":
            part2(args, p, base, shortcut, dev, timing)


if __name__ == "__main__":
    main()
