"""One GPU run at real sizes (issue 22): FLUX.1-dev- and Qwen-Image-shaped models, and the CUDA-only paths, in one
process, each figure written as soon as it is measured.

Sections, in this order (each one's failure is recorded and the run goes on):

1. ``device``: the GPU, torch, ComfyUI's VRAM state and attention function, and the bf16 dense matrix rate measured
   here (8192^3 products, the MFU ceiling next to the 790 TFLOP/s seen on this kind and the 989 TFLOP/s datasheet).
2. ``flux-dev`` (comfy_bench's FLUX.1-dev shape: 19 double + 38 single blocks at width 3072, built on the GPU, bf16):
   * ``step_math``: bench_step_math's forward / sampling step / replay step (the SDE step's share of a forward);
   * ``rollout``: bench_rollout's FlowGRPOSDERollout vs stock SamplerCustomAdvanced + euler (``--rollout-steps``);
   * ``update``: bench_update's FlowGRPOUpdate vs a bare LoRA forward + backward per trained (sample, step)
     (``--update-steps``, ``--micro-batch`` samples per forward);
   * ``memory``: bench_memory's peak ``max_memory_allocated`` of one update and its budget terms, checkpointing off
     then on, on the update bench's trainer and rollout (in-process, so the second starts with the optimizer state);
   * every timed call's FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over one extra call) give its model
     FLOP utilisation: counted FLOPs / median seconds / the bf16 dense peak.
3. ``cuda_paths`` (small models): the interrupted-and-resumed ``FlowGRPOTrain`` run against the uninterrupted one
   (saved LoRA, live LoRA, EMA and optimizer moments compared bitwise) with the CUDA random state restored from the
   checkpoint; a reward model (the tiny aesthetic predictor of tests/support/rewardkit) loaded on the GPU to score,
   offloaded by an update, loaded again to score.
4. ``flux-dev-fp8``: the same model with float8_e4m3fn weights (bf16 compute through ComfyUI's manual cast): the
   rollout, the update and its memory, or the error where the pack cannot do it.
5. ``qwen-image`` (60 layers, 24 heads of 128, true CFG 4; ``--qwen-rollout-steps`` / ``--qwen-update-steps``), as
   2. while ``--time-budget`` allows: a section starts only if the time its FLUX counterpart took, times
   ``--qwen-factor``, is expected to end within the budget.

Output: one JSON object per line in ``--out`` (``{"section", "item", ...}``) and a readable line on stdout.

Run (GPU): ``python benchmarks/bench_gpu.py --device cuda --gpu-only --out bench_gpu.jsonl`` (without ``--gpu-only``
the rollout bench also times ComfyUI moving the weights when it switches between the model and its LoRA clone: about
23 s per call at 12 B parameters on an H200); on a machine without network, ``benchmarks/bench_gpu_device.sh``
carries what it needs. On a CPU at tiny size:
``.venv/bin/python benchmarks/bench_gpu.py --device cpu --heads 2 --flux-depth 1 --qwen-depth 1 --size 8
--tokens 8 --rollout-steps 3 --update-steps 3 --repeats 1``
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import bench_memory
import bench_rollout
import bench_step_math
import bench_update
from bench_window import OFF_WHEN_PRESENT, schema_inputs
from comfy_bench import (ROOT, bench_home, build_model, comfy_in_process, describe, load_demo_models, node_inputs,
                         pack_module, synchronize)

#: bf16 dense matrix rates (TFLOP/s) the MFU is also given against: seen on this kind here (KINDS.md), datasheet
PEAKS = {"kinds_md_790": 790.0, "datasheet_989": 989.0}
GIB = float(2 ** 30)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--models", default="flux-dev,qwen-image", help="comma-separated: flux-dev, qwen-image")
    p.add_argument("--heads", type=int, default=24, help="attention heads of 128 (24: the real widths)")
    p.add_argument("--flux-depth", type=int, default=19, help="FLUX double blocks (single: twice as many)")
    p.add_argument("--qwen-depth", type=int, default=60, help="Qwen-Image layers")
    p.add_argument("--size", type=int, default=128, help="latent side (128: 1024 x 1024 pixels)")
    p.add_argument("--tokens", type=int, default=512, help="text tokens of the conditioning")
    p.add_argument("--batch", type=int, default=2, help="samples per rollout (groups of 2)")
    p.add_argument("--rollout-steps", type=int, default=6)
    p.add_argument("--update-steps", type=int, default=4, help="rollout steps of the update bench (all but the "
                                                                "last trained)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per forward in the update (0: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qwen-repeats", type=int, default=2)
    p.add_argument("--qwen-rollout-steps", type=int, default=4)
    p.add_argument("--qwen-update-steps", type=int, default=3)
    p.add_argument("--step-math-repeats", type=int, default=5)
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--gpu-only", action="store_true",
                   help="the big models' offload device is the GPU (ComfyUI's --gpu-only for diffusion models): "
                        "the stock sampler on the model and the rollout on its LoRA clone do not move the weights")
    p.add_argument("--skip", default="", help="comma-separated items not to run: step_math, rollout, update, memory, each "
                                                  "optionally as SECTION:ITEM (e.g. flux-dev:update)")
    p.add_argument("--no-cuda-paths", action="store_true")
    p.add_argument("--time-budget", type=float, default=340.0,
                   help="seconds from the start within which a Qwen-Image section must be expected to end")
    p.add_argument("--qwen-factor", type=float, default=1.8,
                   help="a Qwen-Image section's expected time as a multiple of its FLUX counterpart's")
    p.add_argument("--out", default="bench_gpu.jsonl")
    return p.parse_args()


class Recorder:
    """Writes each measurement as a JSON line (flushed) and prints it."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", buffering=1)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, section: str, item: str, **values) -> None:
        row = {"section": section, "item": item, "t": round(self.elapsed(), 1), **plain(values)}
        self.file.write(json.dumps(row) + "\n")
        print(f"[{row['t']:7.1f}s] {section} / {item}: "
              + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k not in ("section", "item", "t")),
              flush=True)

    def failed(self, section: str, item: str, exc: BaseException) -> None:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self(section, item, error=f"{type(exc).__name__}: {exc}"[:2000], traceback="".join(lines)[-6000:])


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) < 300 else text[:300] + "..."


def plain(value: Any) -> Any:
    """JSON data of ``value``: numbers, strings, lists and dicts kept, everything else dropped."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if _keep(v)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value if _keep(v)]
    return value


def _keep(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), dict, list, tuple))


def free_memory() -> None:
    """Unload every model ComfyUI holds, collect garbage and return the allocator's cache."""
    import comfy.model_management
    import torch

    comfy.model_management.unload_all_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_flops(fn: Callable[[], Any], inference: bool = False) -> float:
    """FLOPs of one call of ``fn`` as ``FlopCounterMode`` counts them (matrix products and attention);
    ``inference``: call it in inference mode (bench_step_math's forward uses inference tensors)."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode() if inference else contextlib.nullcontext(), counter:
        fn()
    return float(counter.get_total_flops())


def lora_health(trainer) -> dict:
    """Whether the LoRA trained: every tensor finite, and how many ``lora_up`` weights (zero at init) moved."""
    import torch

    ups = [t for k, t in trainer.lora_params.items() if k.endswith("lora_up.weight")]
    return {"finite": all(bool(torch.isfinite(t).all()) for t in trainer.lora_params.values()),
            "lora_up_nonzero": sum(bool(t.abs().sum() > 0) for t in ups), "lora_up": len(ups)}


def mfu(flops: float, seconds: float, peak: dict) -> dict:
    """Achieved TFLOP/s and the utilisation against each bf16 dense peak of ``peak``."""
    achieved = flops / seconds / 1e12
    return {"tflop": flops / 1e12, "tflops_per_s": achieved, **{f"mfu_vs_{k}": achieved / v for k, v in peak.items()}}


def matmul_peak(device) -> Optional[float]:
    """bf16 dense TFLOP/s of 8192^3 products on ``device`` (mean of 10 after 3 warm-ups); None on a CPU."""
    import torch

    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


def model_args(args: argparse.Namespace, model: str, dtype: str, repeats: int) -> argparse.Namespace:
    """The comfy_bench namespace of one model, with its rollout and update bench step counts."""
    flux = model.startswith("flux")
    return argparse.Namespace(model=model, depth=args.flux_depth if flux else args.qwen_depth, heads=args.heads,
                              size=args.size, batch=args.batch, repeats=repeats, tokens=args.tokens,
                              device=args.device, dtype=dtype, gpu_only=args.gpu_only,
                              steps=args.rollout_steps if flux else args.qwen_rollout_steps,
                              update_steps=args.update_steps if flux else args.qwen_update_steps)


class Budget:
    """Decides whether a Qwen-Image section still fits: its FLUX counterpart's seconds times ``factor``."""

    def __init__(self, rec: Recorder, total: float, factor: float):
        self.rec, self.total, self.factor, self.took = rec, total, factor, {}

    def fits(self, section: str, item: str) -> bool:
        need = self.took.get(item, 0.0) * self.factor
        if self.rec.elapsed() + need <= self.total:
            return True
        self.rec(section, item, skipped=f"time budget: {self.rec.elapsed():.0f} s gone, about {need:.0f} s needed, "
                                        f"budget {self.total:.0f} s")
        return False


# ----------------------------------------------------------------------------------------------- model sections
def model_section(rec: Recorder, node: dict, run, args: argparse.Namespace, name: str, margs: argparse.Namespace,
                  peak: dict, budget: Budget, timing: bool = True, record_times: bool = False) -> None:
    """Build ``margs``' model and measure step math, rollout, update, memory (see the module doc)."""
    import torch

    section = name
    is_qwen = margs.model == "qwen-image"
    mods = bench_update.pack_modules(node)
    pack = bench_memory._Pack(node)

    def step(item: str, fn: Callable[[], None]) -> bool:
        skips = args.skip.split(",")
        if item in skips or f"{section}:{item}" in skips:
            rec(section, item, skipped="--skip")
            return False
        if is_qwen and not budget.fits(section, item):
            return False
        t = time.perf_counter()
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001  (recorded; the run goes on)
            rec.failed(section, item, exc)
            return False
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if record_times:
                budget.took[item] = time.perf_counter() - t

    box = SimpleNamespace(model=None, update=None)

    def build():
        synchronize(torch.device(args.device))
        t = time.perf_counter()
        box.model = build_model(margs)
        synchronize(torch.device(args.device))
        weights = sum(p.numel() * p.element_size() for p in box.model.patcher.model.diffusion_model.parameters())
        rec(section, "build", seconds=time.perf_counter() - t, describe=describe(margs, box.model),
            parameters=box.model.parameters, weights_gib=weights / GIB,
            allocated_gib=torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None)

    if not step("build", build):
        return
    model = box.model

    def step_math():
        ns = argparse.Namespace(**vars(margs))
        ns.repeats = args.step_math_repeats
        res = bench_step_math.measure(node, model, ns)
        flops = count_flops(res["fns"]["forward"], inference=True)
        rec(section, "step_math", forward_ms=res["forward"] * 1e3, sample_ms=res["sample"] * 1e3,
            replay_ms=res["replay"] * 1e3, share_sample=res["share_sample"], share_replay=res["share_replay"],
            rows=res["rows"], repeats=ns.repeats, forward_mfu=mfu(flops, res["forward"], peak))

    def rollout():
        ns = argparse.Namespace(**vars(margs))
        res = bench_rollout.compare(run, mods, model, ns)
        flops = {k: count_flops(fn) for k, fn in res["fns"].items()} if timing else {}
        rec(section, "rollout", stock_ms=res["stock"] * 1e3, ours_ms=res["ours"] * 1e3, ratio=res["ratio"],
            per_repeat=[o / s for o, s in res["rows"]], steps=ns.steps, batch=ns.batch, repeats=ns.repeats,
            mfu={k: mfu(f, res[k], peak) for k, f in flops.items()})

    def update():
        ns = argparse.Namespace(**vars(margs))
        ns.steps = margs.update_steps
        res = bench_update.compare(run, mods, model, ns, args.micro_batch)
        flops = {k: count_flops(fn) for k, fn in res["fns"].items()} if timing else {}
        n = res["trained"]
        rec(section, "update", ours_ms_per_pair=res["ours"] * 1e3 / n, bare_ms_per_pair=res["bare"] * 1e3 / n,
            ratio=res["ratio"], per_repeat=[o / b for o, b in res["rows"]], trained_pairs=n, steps=ns.steps,
            micro_batch=args.micro_batch or ns.batch, repeats=ns.repeats, lora=lora_health(res["trainer"]),
            mfu={k: mfu(f, res[k], peak) for k, f in flops.items()})
        box.update = res

    def memory():
        res = box.update
        if res is None:  # the update bench did not run: a trainer and rollout of its settings
            ns = argparse.Namespace(**vars(margs))
            ns.steps = margs.update_steps
            trainer, train_model = run("FlowGRPOLoRAInit", model=model.patcher, rank=16, alpha=16.0,
                                       targets="attention", learning_rate=1e-4, seed=0, run_name="bench_gpu_memory",
                                       resume="none")
            res = dict(trainer=trainer, rewards=mods["nodes.state"].Rewards(values=torch.linspace(0, 1, ns.batch)),
                       rollout=bench_update.sample_rollout(run, mods, model, ns, train_model, args.micro_batch))
        # on first: the off pass's activation count (bench_memory.saved_activation_bytes) left its saved tensors
        # allocated in the first device run, which raised the next measurement's baseline
        for mode, on in (("on", True), ("off", False)):
            try:
                row = bench_memory.measure_update(pack, run, res["trainer"], res["rollout"], res["rewards"], on)
            except torch.OutOfMemoryError as exc:
                rec.failed(section, f"memory_checkpointing_{mode}", exc)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            budget_mib = sum(row[t] for t in bench_memory.TERMS)
            rec(section, f"memory_checkpointing_{mode}", **row, budget=budget_mib,
                measured_over_budget=row["peak"] / budget_mib if row["device"] == "cuda" else None,
                mib="MiB = 2**20 bytes; peak = max_memory_allocated during the update (CUDA)")

    step("step_math", step_math)
    step("rollout", rollout)
    step("update", update)
    step("memory", memory)
    box.update = box.model = model = None
    free_memory()


# ----------------------------------------------------------------------------------------------- CUDA paths
def resume_section(rec: Recorder, node: dict, run) -> None:
    """An interrupted-and-resumed GRPO Train run vs the uninterrupted one on the demo models, compared bitwise,
    with the CUDA random state restored from the interrupted run's checkpoint."""
    import torch
    from flowgrpo.example_specs import TINY_DEMO_TRAIN

    section = "cuda_paths"
    ckpt = pack_module(node, "flowgrpo_core.checkpoint")
    rng = pack_module(node, "flowgrpo_core.rng")
    from safetensors.torch import load_file

    demo = load_demo_models(run)
    schema = schema_inputs(node["FlowGRPOTrain"])
    small = dict(prompts_per_iteration=1, group_size=2, width=64, height=64, steps=4, ema_decay=0.5, ema_every=1)
    base = node_inputs(schema, TINY_DEMO_TRAIN, OFF_WHEN_PRESENT, small, model=demo["diffusion_model"],
                       clip=demo["text_encoder"], vae=demo["vae"])
    cuda = torch.cuda.is_available()

    def train(run_name: str, iterations: int, resume: str = "none"):
        torch.manual_seed(0)
        if cuda:
            torch.cuda.manual_seed_all(0)
        inputs = dict(base, run_name=run_name, iterations=iterations, resume=resume)
        return run("FlowGRPOTrain", **{k: v for k, v in inputs.items() if k in schema[0] or k in schema[1]})[1]

    tag = f"{int(time.time()) % 100000}"
    first = train(f"gpu_broken_{tag}", 2)
    after_save = torch.randn(4096, device="cuda") if cuda else None  # the CUDA stream right after the checkpoint
    stopped = ckpt.load_training_state(Path(first.checkpoint).with_suffix(".flowgrpo-state"))
    saved_rng = stopped.extra["rng"]
    straight = train(f"gpu_straight_{tag}", 4)
    if cuda:
        torch.cuda.manual_seed_all(12345)  # move the stream elsewhere, then restore it from the checkpoint
        rng.restore_rng_state(saved_rng)
        restored_state = torch.equal(torch.cuda.get_rng_state().cpu(), saved_rng["cuda"][0].to(torch.uint8).cpu())
        restored_draw = torch.equal(torch.randn(4096, device="cuda"), after_save)
    else:
        restored_state = restored_draw = None
    resumed = train(f"gpu_broken_{tag}", 4, resume="latest")
    a, b = Path(resumed.checkpoint), Path(straight.checkpoint)
    sa, sb = ckpt.load_training_state(a.with_suffix(".flowgrpo-state")), \
        ckpt.load_training_state(b.with_suffix(".flowgrpo-state"))

    def same(x: dict, y: dict) -> dict:
        differ = [k for k in x if k not in y or not torch.equal(x[k], y[k])]
        return {"tensors": len(x), "differ": len(differ) + len(set(y) - set(x)), "examples": differ[:3]}

    moments = {k: t["exp_avg_sq"] for k, t in sa.optimizer_state["state"].items()}
    moments_b = {k: t["exp_avg_sq"] for k, t in sb.optimizer_state["state"].items()}
    rec(section, "bitwise_resume", device=str(demo["diffusion_model"].load_device),
        interrupted_at=stopped.iteration, iterations=(sa.iteration, sb.iteration),
        saved_lora=same(load_file(str(a)), load_file(str(b))), live_lora=same(sa.extra["live_lora"],
                                                                             sb.extra["live_lora"]),
        ema=same(sa.extra["ema"]["shadow"], sb.extra["ema"]["shadow"]), exp_avg_sq=same(moments, moments_b),
        rewards_equal=[m["reward_mean"] for m in sa.history] == [m["reward_mean"] for m in sb.history],
        checkpoint_cuda_states=len(saved_rng.get("cuda") or []), cuda_state_restored=restored_state,
        cuda_draw_after_restore_equals_draw_after_save=restored_draw,
        dtype=str(demo["diffusion_model"].model.get_dtype()))


def reward_section(rec: Recorder, node: dict, run, args: argparse.Namespace) -> None:
    """The tiny aesthetic predictor (tests/support/rewardkit) under ComfyUI's model management: on the GPU to
    score, offloaded by a GRPO update, back on the GPU for the next score."""
    import comfy.model_management
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from rewardkit.hf_clip_tiny import build_tiny_aesthetic

    section = "cuda_paths"
    build_tiny_aesthetic(bench_home() / "models")
    (reward,) = run("FlowGRPOLoadRewardModel", backend="aesthetic", weights="(default)", device="auto", dtype="auto")
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def where() -> dict:
        params = list(reward.patcher.model.parameters())
        return {"loaded": reward.loaded, "param_devices": sorted({str(p.device) for p in params}),
                "allocated_mib": torch.cuda.memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None}

    state = {"built": where()}
    first = run("FlowGRPOScoreImages", reward_model=reward, images=images, scale=1.0)[0]
    state["after_score"] = where()
    mods = bench_update.pack_modules(node)
    ns = argparse.Namespace(model="sd3", depth=2, heads=24, size=8, batch=2, steps=3, repeats=1, tokens=8,
                            device=args.device, dtype="bf16" if args.device == "cuda" else "fp32")
    model = build_model(ns)
    trainer, train_model = run("FlowGRPOLoRAInit", model=model.patcher, rank=4, alpha=4.0, targets="attention",
                               learning_rate=1e-4, seed=0, run_name="bench_gpu_reward", resume="none")
    rollout = bench_update.sample_rollout(run, mods, model, ns, train_model)
    state["after_rollout"] = where()
    run("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=first, clip_range=1e-4, kl_beta=0.0,
        adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1, gradient_checkpointing=False)
    state["after_update"] = where()
    again = run("FlowGRPOScoreImages", reward_model=reward, images=images, scale=1.0)[0]
    state["after_second_score"] = where()
    rec(section, "reward_offload", reward_device=str(reward.device), **state,
        same_scores=torch.equal(first.values, again.values), scores=first.values.tolist(),
        loaded_models=[type(m.model).__name__ for m in comfy.model_management.current_loaded_models])
    free_memory()


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    rec = Recorder(args.out)
    node, run = comfy_in_process(args.device)
    import comfy.model_management
    import torch

    home = bench_home()
    try:
        device = comfy.model_management.get_torch_device()
        measured = matmul_peak(device)
        peak = dict(PEAKS, **({"measured_here": measured} if measured else {}))
        attention = None
        try:
            import comfy.ldm.modules.attention as attn

            attention = attn.optimized_attention.__name__
        except Exception:  # noqa: BLE001
            pass
        rec("device", "info", device=str(device), name=torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", torch=torch.__version__, cuda=torch.version.cuda,
            total_gib=torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None,
            vram_state=comfy.model_management.vram_state.name, attention=attention,
            bf16_matmul_tflops_measured=measured, peaks_tflops=peak, argv=sys.argv[1:])
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        budget = Budget(rec, args.time_budget, args.qwen_factor)
        if "flux-dev" in models:
            model_section(rec, node, run, args, "flux-dev", model_args(args, "flux-dev", "bf16", args.repeats), peak,
                          budget, record_times=True)
        if not args.no_cuda_paths:
            for fn in (resume_section, reward_section):
                try:
                    fn(rec, node, run) if fn is resume_section else fn(rec, node, run, args)
                except Exception as exc:  # noqa: BLE001
                    rec.failed("cuda_paths", fn.__name__, exc)
                free_memory()
        if "flux-dev" in models and not args.no_fp8:
            model_section(rec, node, run, args, "flux-dev-fp8", model_args(args, "flux-dev", "fp8", 1), peak,
                          budget, timing=False)
        if "qwen-image" in models:
            model_section(rec, node, run, args, "qwen-image",
                          model_args(args, "qwen-image", "bf16", args.qwen_repeats), peak, budget)
        rec("done", "end", seconds=rec.elapsed())
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
