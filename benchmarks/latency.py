"""Latency benchmark: vanilla vs shortcut sampling, measured in one run on one machine.

    python benchmarks/latency.py                       # the trained models in data/ (after `dvc repro`)
    python benchmarks/latency.py --random --profile default   # untrained models of a profile's sizes

Prints (1) the cost of one step: base forward + head vs shortcut + head, both CFG branches, and
their ratio (the paper's shortcut costs about 3% of its base); (2) per-image latency of vanilla N
and of the shortcut at several budgets, with the speedup and its N/B limit, sampled as the sample
stage samples (on a CPU: a slice of the batch per thread), and on a CPU vanilla N once more with the
whole batch on all threads, for the gain of slicing. Warm-up dropped, median of repeats, threads
fixed; CUDA timers synchronised.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migm_shortcut.bases import build_base, load_base  # noqa: E402
from migm_shortcut.config import load_params  # noqa: E402
from migm_shortcut.metrics import measure_latency  # noqa: E402
from migm_shortcut.sampling import Learned, fixed_threads, generate, generate_on_cores  # noqa: E402
from migm_shortcut.shortcut import Shortcut, ShortcutSpec  # noqa: E402
from stages.extract import sampling_rule  # noqa: E402


def models(args, p, dev):
    if args.random:
        b = p.base
        t = p.tokenizer
        base = build_base({"kind": b.name, "num_classes": 10, "tokenizer": dict(
            codebook_size=t.codebook_size, code_dim=t.code_dim, hidden=t.hidden, channels=1, ema_decay=t.ema_decay,
            image_size=p.data.image_size), "model": dict(depth=b.depth, width=b.width, heads=b.heads,
                                                           mlp_ratio=b.mlp_ratio, label_dropout=b.label_dropout)})
        s = p.shortcut
        shortcut = Shortcut(ShortcutSpec(dim=b.width, bottleneck_ratio=s.bottleneck_ratio, blocks=s.blocks, heads=s.heads))
        return base.to(dev).eval(), shortcut.to(dev).eval()
    from stages.train_shortcut import load_shortcut

    base = load_base("data/base/model.safetensors", dev)
    return base, load_shortcut(base.base_id).to(dev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="read sizes from profiles/NAME.yaml instead of params.yaml")
    parser.add_argument("--random", action="store_true", help="untrained models of the profile's sizes")
    parser.add_argument("--batch", type=int, help="default: the profile's sample.batch_size")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    p = load_params(f"profiles/{args.profile}.yaml" if args.profile else "params.yaml")
    if p.is_text_to_image:
        parser.error("this benchmark conditions on classes; a text-to-image base is timed by the sample stage "
                     "(latency_ms in data/samples/*/info.json)")
    if args.random and p.is_published:
        parser.error("--random builds the tiny MaskGIT of a trained profile; time a published base after `dvc repro base`")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, shortcut = models(args, p, dev)
    B, L = args.batch or p.sample.batch_size, base.num_tokens
    cond = torch.arange(B, device=dev) % 10
    tokens = torch.randint(0, base.codebook_size, (2 * B, L), device=dev)
    both = torch.cat([cond, base.uncond(cond)])
    timing = dict(warmup=1, repeats=args.repeats, batch_size=B, device=dev)
    print(f"device {dev}, threads {args.threads}, batch {B}, base {base.transformer_parameters() / 1e6:.2f}M params, "
          f"shortcut {sum(t.numel() for t in shortcut.parameters()) / 1e6:.3f}M params")
    with fixed_threads(args.threads), torch.no_grad():
        f = base.features(tokens, both)
        new = torch.rand(2 * B, L, device=dev) < 0.1
        ratio = torch.rand(2 * B, device=dev)
        full = measure_latency(lambda: base.head(base.features(tokens, both)), **timing)["median_ms_per_image"]
        short = measure_latency(lambda: base.head(shortcut(f, base.embed_tokens(tokens), new, ratio)), **timing)["median_ms_per_image"]
        print(f"one step, both CFG branches, head included: base {full:.3f} ms/img, shortcut {short:.3f} ms/img, "
              f"ratio {short / full:.3f}")

        rule = sampling_rule(p, args.steps)  # the profile's whole rule, as the stages build it
        ids = list(range(B))

        def run(budget):
            return lambda: generate_on_cores(args.threads, base, rule, cond, ids, 0, budget=budget,
                                             source=lambda: Learned(shortcut, base))  # as the sample stage runs it

        vanilla = measure_latency(run(None), **timing)["median_ms_per_image"]
        print(f"vanilla N={args.steps}: {vanilla:.2f} ms/img")
        if dev.type == "cpu" and args.threads > 1:
            whole = measure_latency(lambda: generate(base, rule, cond, ids, 0), **timing)["median_ms_per_image"]
            print(f"  the same, the whole batch on {args.threads} intra-op threads instead of a slice per thread: "
                  f"{whole:.2f} ms/img ({whole / vanilla:.2f}x the time)")
        for b in args.budgets:
            t = measure_latency(run(b), **timing)["median_ms_per_image"]
            print(f"shortcut N={args.steps} B={b}: {t:.2f} ms/img, speedup {vanilla / t:.2f}x "
                  f"(limit N/B {args.steps / b:.2f}x, {vanilla / t / (args.steps / b):.0%} of it)")


if __name__ == "__main__":
    main()
