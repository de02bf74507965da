"""Full trajectory vs a 2-step window (Flow-GRPO-Fast) on the tiny demo model, side by side in one run.

Each configuration is one ``FlowGRPOTrain`` call on the demo's models and settings (``TINY_DEMO_TRAIN``: same
prompts, group size, resolution, 8 steps, learning rate); only the step mode differs:

* full:   ``step_mode=fraction``, ``train_fraction=0.99`` (7 of the 8 steps SDE and trained);
* window: ``step_mode=random_window``, ``window_size=2`` (a random 2-step window per iteration, ODE elsewhere);
* fixed:  ``step_mode=fixed_window``, ``window_size=2``, ``window_start=0`` (the two noisiest steps).

The configurations run interleaved (full, window, fixed, full, window, ...) for ``--repeats`` repeats, repeat
``r`` with seed ``--seed + r`` for all of them. Per iteration: wall seconds (between consecutive iteration log lines
of the node; the first includes the LoRA init), the seconds of each phase (the metrics' ``time_<phase>_s``:
prompts, rollout, decode, reward, update; before the node reported phases, the update's ``seconds``) and
``reward_mean``. Per run: the median seconds per iteration and the reward gain per wall-second,
``(mean reward of the last k iterations - mean of the first k) / total wall seconds``. Prints every run, the
medians over the repeats, their spread, and the ratios window/full. As a less noisy second reading of the same
quantity, the least-squares slope of reward_mean against wall time is printed too.

The node is called with every input filled from its own schema defaults, then the demo settings, then the
overrides here, so inputs added to the node later keep their defaults (switches that add work per iteration, such
as evaluation, sample grids, TensorBoard or EMA, are turned off when the node has them).

Run: ``.venv/bin/python benchmarks/bench_window.py [--iterations 20] [--repeats 3] [--k 5]
[--configs full,window,fixed]`` (the defaults take about 6 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import signal
import statistics
import sys
import time

from comfy_bench import bench_home, comfy_in_process, load_demo_models, node_inputs

#: inputs that, when the node has them, would add work to some iterations; off for a timing of the loop itself
OFF_WHEN_PRESENT = dict(eval_steps=0, eval_every=0, sample_every=0, tensorboard=False, ema_decay=0.0,
                        prompt_file="", save_every=0, resume="none")

CONFIGS = {
    "full": dict(step_mode="fraction", train_fraction=0.99),
    # window_end 0: the window may lie anywhere up to the last stochastic step (passed only if the node has it)
    "window": dict(step_mode="random_window", window_size=2, window_start=0, window_end=0),
    "fixed": dict(step_mode="fixed_window", window_size=2, window_start=0),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=20, help="GRPO iterations per run (the demo's 20)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (seed --seed + r in repeat r)")
    p.add_argument("--k", type=int, default=5, help="iterations averaged at the start and at the end of a run "
                                                   "for the reward gain")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repeat")
    p.add_argument("--configs", default="full,window,fixed",
                   help=f"comma-separated, from {', '.join(CONFIGS)}; full and window are required")
    args = p.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not {"full", "window"} <= set(args.configs) <= set(CONFIGS):
        p.error(f"--configs must include full and window and only name {', '.join(CONFIGS)}")
    if args.iterations < 2 * args.k or args.k < 1:
        p.error(f"--iterations ({args.iterations}) must be at least 2 * --k ({args.k}) and --k at least 1")
    return args


def schema_inputs(node_cls) -> tuple[dict, set]:
    """``(defaults, required ids)`` of a V3 node: each widget's default (a combo without one: its first option)."""
    defaults, required = {}, set()
    for item in node_cls.define_schema().inputs:
        default = getattr(item, "default", None)
        if default is None and getattr(item, "options", None):
            default = item.options[0]
        if default is not None:
            defaults[item.id] = default
        if not item.optional:
            required.add(item.id)
    return defaults, required


class IterationClock(logging.Handler):
    """Times the ``flowgrpo`` logger's INFO lines that name ``run``: the train node logs one per iteration."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.run, self.times = None, []

    def emit(self, record: logging.LogRecord) -> None:
        if self.run and record.levelno == logging.INFO and self.run in record.getMessage():
            self.times.append(time.perf_counter())


def one_run(train, base: dict, overrides: dict, run_name: str, clock: IterationClock, iterations: int) -> dict:
    """One train-node call: ``{"wall": [s per iteration], "phases": {phase: [s per iteration]}, "reward":
    [reward_mean per iteration], "total": s}``; the phases are the metrics' ``time_<phase>_s`` (prompts, rollout,
    decode, reward, update) where the node reports them, else only the update's ``seconds``."""
    clock.run, clock.times = run_name, []
    start = time.perf_counter()
    state = train(**dict(base, **overrides, run_name=run_name))[1]
    history = list(state.history)
    if len(history) != iterations:
        raise RuntimeError(f"{run_name}: {len(history)} iterations recorded, expected {iterations}")
    if len(clock.times) == iterations:
        wall = [b - a for a, b in zip([start, *clock.times[:-1]], clock.times)]
        total = clock.times[-1] - start
    else:  # the node's log lines changed: the metrics' time_iteration_s (phases only), else the run's mean
        total = time.perf_counter() - start
        known = all(isinstance(m.get("time_iteration_s"), (int, float)) for m in history)
        wall = [float(m["time_iteration_s"]) for m in history] if known else [total / iterations] * iterations
        print(f"  note: {len(clock.times)} log lines naming the run for {iterations} iterations; wall seconds per "
              f"iteration are {'the metrics time_iteration_s' if known else 'the run mean'}, the total includes "
              f"the final save")
    phases = {key[len("time_"):-len("_s")]: [float(m[key]) for m in history]
              for key in history[0] if key.startswith("time_") and key.endswith("_s") and key != "time_iteration_s"
              and all(isinstance(m.get(key), (int, float)) for m in history)}
    if "update" not in phases:  # before per-phase timings: the update metrics' "seconds"
        phases["update"] = [float(m["seconds"]) for m in history]
    return dict(wall=wall, phases=phases, reward=[float(m["reward_mean"]) for m in history], total=total)


def summarize(run: dict, k: int) -> dict:
    reward = run["reward"]
    gain = statistics.fmean(reward[-k:]) - statistics.fmean(reward[:k])
    clock = list(itertools.accumulate(run["wall"]))  # wall seconds at the end of each iteration
    return dict(s_per_it=statistics.median(run["wall"]),
                phase_s={name: statistics.median(v) for name, v in run["phases"].items()},
                update_share=sum(run["phases"]["update"]) / sum(run["wall"]),
                gain=gain, gain_per_s=gain / run["total"], total=run["total"],
                slope=statistics.linear_regression(clock, reward).slope, curve=reward)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def ratio_of_medians(a: list[dict], b: list[dict], key: str) -> float:
    """median of ``a``'s ``key`` / median of ``b``'s (nan when ``b``'s is 0); per-repeat ratios of small, noisy
    gains can blow up or flip sign, the ratio of the medians is steadier."""
    den = statistics.median(x[key] for x in b)
    return statistics.median(x[key] for x in a) / den if den else float("nan")


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))} .. {fmt.format(max(values))}]"


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still deletes its throw-away home
    node, run = comfy_in_process()
    import torch
    from flowgrpo.example_specs import TINY_DEMO_TRAIN

    home = bench_home()
    try:
        demo = load_demo_models(run)
        train_cls = node["FlowGRPOTrain"]
        defaults, required = schema_inputs(train_cls)
        base = node_inputs((defaults, required), TINY_DEMO_TRAIN, OFF_WHEN_PRESENT, model=demo["diffusion_model"],
                           clip=demo["text_encoder"], vae=demo["vae"], iterations=args.iterations)
        configs = ["full", "window"] + [c for c in args.configs if c not in ("full", "window")]
        unknown = {k for c in configs for k in CONFIGS[c] if k not in defaults and k != "window_end"}
        if unknown:
            raise SystemExit(f"FlowGRPOTrain has no input(s) {sorted(unknown)}")

        logger = logging.getLogger("flowgrpo")
        clock = IterationClock()
        logger.addHandler(clock)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the node's per-iteration lines feed the clock; the runs print their own lines
        print(f"tiny demo (TINY_DEMO_TRAIN): {base['prompts_per_iteration']} prompts x {base['group_size']}, "
              f"{base['width']}x{base['height']}, {base['steps']} steps, {base['sde_kind']} {base['noise_level']}, "
              f"cfg {base['cfg']}, lr {base['learning_rate']}, reward {base['reward']}; {args.iterations} iterations "
              f"per run, k={args.k}, {args.repeats} repeats; torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}; load average {load()}")

        def train(**inputs):
            return run("FlowGRPOTrain", **{k: v for k, v in inputs.items() if k in defaults or k in required})

        results = {c: [] for c in configs}
        for r in range(args.repeats):
            seed = args.seed + r
            for c in configs:
                res = summarize(one_run(train, dict(base, seed=seed), {k: v for k, v in CONFIGS[c].items()
                                                                       if k in defaults},
                                        f"bench_window_{c}_{r}", clock, args.iterations), args.k)
                results[c].append(res)
                phases = ", ".join(f"{name} {sec:.2f}" for name, sec in res["phase_s"].items())
                print(f"repeat {r} seed {seed} {c:6s}: {res['s_per_it']:.2f} s/it ({phases}; update share "
                      f"{res['update_share']:.0%})"
                      f"  gain {res['gain']:+.4f}"
                      f"  in {res['total']:.0f} s = {res['gain_per_s'] * 1e3:+.3f} /1000 s", flush=True)
                print("    reward_mean per iteration: " + " ".join(f"{x:.3f}" for x in res["curve"]), flush=True)
        logger.removeHandler(clock)
        logger.propagate = True
        print(f"load average at the end {load()} (other processes on the machine slow every configuration; the "
              f"interleaving shares that out, the spread shows what is left)")
    finally:
        shutil.rmtree(home, ignore_errors=True)

    print(f"\nmedians over {args.repeats} repeats [min .. max]")
    print(f"| config | s / iteration | rollout s | update s | update share | reward gain (last {args.k} - first "
          f"{args.k}) | gain per 1000 wall-s | reward slope per 1000 wall-s |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        rs = results[c]
        rollout = [x["phase_s"].get("rollout", float("nan")) for x in rs]
        print(f"| {c} | {spread([x['s_per_it'] for x in rs], '{:.2f}')} | {spread(rollout, '{:.2f}')} | "
              f"{spread([x['phase_s']['update'] for x in rs], '{:.2f}')} | "
              f"{spread([x['update_share'] * 100 for x in rs], '{:.0f}')} % | "
              f"{spread([x['gain'] for x in rs], '{:+.4f}')} | "
              f"{spread([x['gain_per_s'] * 1e3 for x in rs], '{:+.3f}')} | "
              f"{spread([x['slope'] * 1e3 for x in rs], '{:+.3f}')} |")
    ratios = {}
    for c in configs[1:]:
        time_ratio = [w["s_per_it"] / f["s_per_it"] for w, f in zip(results[c], results["full"])]
        gain_ratio = ratio_of_medians(results[c], results["full"], "gain_per_s")
        slope_ratio = ratio_of_medians(results[c], results["full"], "slope")
        ratios[c] = (statistics.median(time_ratio), gain_ratio)
        per_repeat = [w["gain_per_s"] / f["gain_per_s"] if f["gain_per_s"] else float("nan")
                      for w, f in zip(results[c], results["full"])]
        print(f"{c}/full: s per iteration {spread(time_ratio, '{:.2f}')}x (per repeat); gain per wall-second "
              f"{gain_ratio:.2f}x, reward slope per wall-second {slope_ratio:.2f}x (ratios of the medians; gain per "
              f"wall-second repeat by repeat: {', '.join(f'{x:.2f}' for x in per_repeat)})")
    time_ratio, gain_ratio = ratios["window"]
    print(f"\nsummary: a 2-step random window takes {time_ratio:.2f}x the wall time per iteration of the full "
          f"trajectory and gives {gain_ratio:.2f}x its reward gain per wall-second (medians of {args.repeats} "
          f"repeats). The time ratio is a measurement; the reward gain is noisy (see the spread and the per-run "
          f"curves), so its ratio is an indication only.")


if __name__ == "__main__":
    main()
