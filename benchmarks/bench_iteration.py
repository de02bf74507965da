"""Iteration breakdown: the share of rollout, decode, reward and update in one GRPO iteration, for the tiny demo and
for a FLUX-width model, in one run.

* tiny-demo: the README demo's real training run, one ``FlowGRPOTrain`` call in-process on the demo models (tiny
  SD3, random CLIP-L through the stock ``CLIPLoader``, TAESD-16 through the stock ``VAELoader``) with the demo's
  settings ``TINY_DEMO_TRAIN`` (2 prompts x 4 images, 128 px, 8 flow_sde steps, CFG 4.5, redness reward) for
  ``--demo-iterations`` iterations. The phases are the node's metrics ``time_<phase>_s``: prompts (text encoding),
  rollout, decode, reward, update; the wall time of an iteration is the time between the node's per-iteration log
  lines (bench_window's clock). Switches that add work to some iterations only (evaluation, sample grids, saves,
  EMA, TensorBoard) are off, as in bench_window; the model runs at the demo's dtype (fp32), whatever ``--dtype``.
* flux-width: comfy_bench's FLUX-width model (hidden 3072, ``--depth`` double + ``--depth`` single blocks, about
  0.5 B parameters per depth unit) driven through the pack's own nodes in-process. One iteration is
  ``FlowGRPOSDERollout`` (``--batch`` = prompts x ``--group-size``, latent ``--size``, ``--steps`` flow_sde steps at
  noise 0.9, cfg 1 with FLUX guidance 3.5, all steps but the last trained) -> stock ``VAEDecode`` with the demo's
  TAESD-16 -> ``FlowGRPOSimpleReward`` (redness, the demo's reward) -> ``FlowGRPOUpdate``; the LoRA
  (``FlowGRPOLoRAInit``) and update settings are the ``flux_dev_flowgrpo`` preset's (rank 64 on attention and MLP,
  clip 1e-4, no KL) without EMA, with the whole batch per forward and one optimizer step. Each phase is timed with
  ``comfy_bench.timed`` (device synchronised). There is NO text encoding in this config: the conditioning is
  precomputed (random T5-width embeddings), so a real FLUX run adds a prompts phase that is not measured here.

Per config: the median seconds per iteration of each phase, of "other" (the iteration's wall time minus its phases:
logging, previews, Python between the nodes) and of the whole iteration, and each one's share of the summed wall
time of the timed iterations (the shares add up to 100 %). The baseline is the iteration's own wall time. The first
iteration is a warm-up and not counted (tiny-demo: it also carries the LoRA init). Ends with one summary line per
config: ``<config>: rollout X% decode Y% reward Z% update W% (other V%)``.

Run: ``.venv/bin/python benchmarks/bench_iteration.py [--config tiny-demo|flux-width|both] [--demo-iterations 6]
[--depth 1] [--size 16] [--batch 4] [--group-size 2] [--steps 4] [--repeats 2] [--tokens 8]
[--device cuda --dtype bf16]`` (``--repeats``: timed flux-width iterations after the warm-up; the sizes apply to
flux-width only).
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import signal
import statistics
import sys
import time

from bench_window import OFF_WHEN_PRESENT, IterationClock, one_run, schema_inputs
from comfy_bench import (bench_home, build_model, comfy_in_process, describe, load_demo_models, node_inputs, pack_module,
                         parse_sizes, synchronize, timed)

CONFIGS = ("tiny-demo", "flux-width")
#: the phases the summary line names, in iteration order; any other phase (the demo's prompts) goes in brackets
MAIN_PHASES = ("rollout", "decode", "reward", "update")
#: the train node's phases in the order an iteration runs them
ITERATION_ORDER = ("prompts", *MAIN_PHASES)
#: LoRA and update settings of the flux-width config
FLUX_PRESET = "flux_dev_flowgrpo"


class Parser(argparse.ArgumentParser):
    """``parse_sizes``' flags with this benchmark's defaults (set on the actions just before parsing, so --help
    shows them)."""

    DEFAULTS = dict(model="flux-width", size=16, steps=4, repeats=2)

    def parse_args(self, args=None, namespace=None):
        self.set_defaults(**self.DEFAULTS)
        return super().parse_args(args, namespace)


def parse_args() -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=(*CONFIGS, "both"), default="both", help="which breakdown(s) to run")
    p.add_argument("--demo-iterations", type=int, default=6,
                   help="tiny-demo: iterations of the train node, the first a warm-up")
    p.add_argument("--group-size", type=int, default=2,
                   help="flux-width: samples per prompt (--batch = prompts x group size)")
    args = parse_sizes(batch=4, parser=p, depth=1)
    args.configs = CONFIGS if args.config == "both" else (args.config,)
    if args.model != "flux-width":
        p.error("--model: the composed config is flux-width only (the tiny demo has its own model)")
    if args.demo_iterations < 2 or args.repeats < 1:
        p.error("--demo-iterations must be at least 2 and --repeats at least 1 (the first iteration is a warm-up)")
    if args.group_size < 2 or args.batch % args.group_size:
        p.error(f"--batch ({args.batch}) must be a multiple of --group-size ({args.group_size}), which must be >= 2")
    return args


def breakdown(config: str, rows: list[dict], note: str = "") -> str:
    """Print the phase table of ``rows`` (one dict per timed iteration: ``{phase: s, ..., "wall": s}``) and return
    the summary line."""
    phases = [p for p in rows[0] if p != "wall"]
    rows = [dict(r, other=r["wall"] - sum(r[p] for p in phases)) for r in rows]
    total = sum(r["wall"] for r in rows)

    def share(name: str) -> float:
        return 100.0 * sum(r[name] for r in rows) / total

    print(f"{config}: medians over {len(rows)} timed iterations; share = the phase's summed seconds / the summed "
          f"wall seconds")
    print("| phase | median s / iteration | share |")
    print("|---|---|---|")
    for name in (*phases, "other", "wall"):
        label = "iteration (wall)" if name == "wall" else name
        print(f"| {label} | {statistics.median(r[name] for r in rows):.3f} | {share(name):.1f} % |")
    extra = [f"{p} {share(p):.1f}%" for p in phases if p not in MAIN_PHASES] + [f"other {share('other'):.1f}%"]
    main = " ".join(f"{p} {share(p):.1f}%" if p in phases else f"{p} n/a" for p in MAIN_PHASES)
    return f"{config}: {main} ({', '.join(extra)}{'; ' + note if note else ''})"


def print_iteration(k: int, row: dict, warm_up: bool) -> None:
    phases = ", ".join(f"{p} {s:.3f}" for p, s in row.items() if p != "wall")
    print(f"  iteration {k}: {row['wall']:.3f} s ({phases}){'  [warm-up, not counted]' if warm_up else ''}",
          flush=True)


def tiny_demo(node, run, demo: dict, args: argparse.Namespace) -> str:
    """The README demo's FlowGRPOTrain run; returns its summary line."""
    import torch
    from flowgrpo.example_specs import TINY_DEMO_TRAIN

    n = args.demo_iterations
    base = node_inputs(schema_inputs(node["FlowGRPOTrain"]), TINY_DEMO_TRAIN, OFF_WHEN_PRESENT,
                       model=demo["diffusion_model"], clip=demo["text_encoder"], vae=demo["vae"], iterations=n)
    print(f"\ntiny-demo (TINY_DEMO_TRAIN through FlowGRPOTrain): {base['prompts_per_iteration']} prompts x "
          f"{base['group_size']}, {base['width']}x{base['height']}, {base['steps']} steps {base['sde_kind']} "
          f"{base['noise_level']}, cfg {base['cfg']}, reward {base['reward']}, LoRA rank {base['rank']} on "
          f"{base['targets']}; demo models on {demo['diffusion_model'].load_device}; {n} iterations, the first a "
          f"warm-up; torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    logger, clock = logging.getLogger("flowgrpo"), IterationClock()
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the node's per-iteration lines feed the clock only
    try:
        res = one_run(functools.partial(run, "FlowGRPOTrain"), base, {}, "bench_iteration_demo", clock, n)
    finally:
        logger.removeHandler(clock)
        logger.propagate = True
    order = sorted(res["phases"], key=lambda p: ITERATION_ORDER.index(p) if p in ITERATION_ORDER else 99)
    rows = [dict({p: res["phases"][p][k] for p in order}, wall=res["wall"][k]) for k in range(n)]
    for k, row in enumerate(rows):
        print_iteration(k, row, k == 0)
    return breakdown("tiny-demo", rows[1:])


def flux_width(node, run, vae, args: argparse.Namespace) -> str:
    """Rollout -> VAEDecode -> reward -> update on the FLUX-width model, node by node; returns its summary line."""
    import torch
    from flowgrpo.example_specs import TINY_DEMO_TRAIN
    from flowgrpo_core.presets import builtin_presets

    state = pack_module(node, "nodes.state")
    model = build_model(args)
    device = model.patcher.load_device
    preset = builtin_presets()[FLUX_PRESET].values
    trainer, train_model = run("FlowGRPOLoRAInit", **node_inputs(
        schema_inputs(node["FlowGRPOLoRAInit"]), preset, OFF_WHEN_PRESENT, model=model.patcher, seed=0,
        run_name="bench_iteration_flux"))
    rollout_kw = node_inputs(schema_inputs(node["FlowGRPOSDERollout"]), preset, model=train_model,
                             positive=model.positive, width=args.size * 8, height=args.size * 8, steps=args.steps,
                             micro_batch_size=0, seed=0)
    reward_schema, update_schema = schema_inputs(node["FlowGRPOSimpleReward"]), schema_inputs(node["FlowGRPOUpdate"])
    reward = TINY_DEMO_TRAIN["reward"]
    update = dict(preset, optimizer_steps=1)
    b, g = args.batch, args.group_size
    print(f"\nflux-width: {describe(args, model)}")
    print(f"  {b // g} prompts x {g}, {rollout_kw['sde_kind']} {rollout_kw['noise_level']}, cfg {rollout_kw['cfg']} "
          f"(guidance 3.5), train_fraction {rollout_kw['train_fraction']}; LoRA rank {preset['rank']} on "
          f"{preset['targets']} ({FLUX_PRESET}), clip {update['clip_range']}; reward {reward}; "
          f"TAESD-16 decode; no text encoding (conditioning precomputed); {args.repeats + 1} iterations, the first "
          f"a warm-up", flush=True)

    rows = []
    for it in range(args.repeats + 1):
        groups = state.PromptBatch(texts=tuple(f"prompt {i // g}" for i in range(b)), group_ids=torch.arange(b) // g,
                                   prompt_indices=tuple(i // g for i in range(b)), iteration=it, group_size=g)
        row = {}
        synchronize(device)
        start = time.perf_counter()
        row["rollout"], (latent, rollout) = timed(
            lambda: run("FlowGRPOSDERollout", **dict(rollout_kw, groups=groups, iteration=it)), device)
        row["decode"], (images,) = timed(lambda: run("VAEDecode", samples=latent, vae=vae), device)
        row["reward"], (rewards,) = timed(
            lambda: run("FlowGRPOSimpleReward", **node_inputs(reward_schema, images=images, reward=reward)), device)
        row["update"], (trainer, _, _) = timed(lambda: run("FlowGRPOUpdate", **node_inputs(
            update_schema, update, trainer=trainer, rollout=rollout, rewards=rewards)), device)
        synchronize(device)
        row["wall"] = time.perf_counter() - start
        print_iteration(it, row, it == 0)
        rows.append(row)
    return breakdown("flux-width", rows[1:], note="no text encoding: conditioning precomputed")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still deletes its throw-away home
    node, run = comfy_in_process(args.device)
    home = bench_home()
    summaries = []
    try:
        demo = load_demo_models(run, kinds=("diffusion_model", "text_encoder", "vae") if "tiny-demo" in args.configs
                                else ("vae",))
        if "tiny-demo" in args.configs:
            summaries.append(tiny_demo(node, run, demo, args))
        if "flux-width" in args.configs:
            summaries.append(flux_width(node, run, demo["vae"], args))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print("\nsummary (share of the wall time per iteration):")
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
