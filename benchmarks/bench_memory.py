"""Peak memory of one GRPO update against its budget, with and without gradient checkpointing, in one run.

For each configuration (``FlowGRPOUpdate`` with ``gradient_checkpointing`` off, then on), a FRESH SUBPROCESS (this
script re-invoked with a hidden ``--worker`` flag) builds the ``--model`` (``comfy_bench.build_model``), puts a LoRA
on it with ``FlowGRPOLoRAInit`` (rank ``--rank`` 16, alpha = rank, targets ``attention``), samples a rollout with
``FlowGRPOSDERollout`` (flow_sde 0.7, every step but the last trained, ``--micro-batch`` samples per forward, 0 = the
whole batch) and measures its FIRST ``FlowGRPOUpdate`` call (one optimizer step). A fresh process per measurement
makes every run start from the same allocator state and makes the update allocate the optimizer state. Before the
update, one forward + backward of one trained step (gradients dropped after) takes the one-time costs of a process's
first backward (lazy initialisation, thread pools) out of the measurement.

Measured (``flowgrpo_core.profiling.PhaseTimer``, an empty phase right before the update gives the baseline):

* CUDA: the absolute peak of ``torch.cuda.max_memory_allocated`` during the update (tensor memory, not the
  allocator's cache), compared with the whole budget.
* CPU: there is no allocator counter; the peak resident-set INCREASE during the update: VmHWM (reset through
  ``/proc/self/clear_refs``) read after the update minus the RSS right before it (after ``gc.collect`` and glibc's
  ``malloc_trim``). The weights, the LoRA and the trajectory exist before the update, so the increase is compared with
  the terms allocated DURING it: activations + gradients + the optimizer state (created by a process's first update)
  + temporaries. glibc may serve the update from memory it kept after the rollout freed it (then RSS does not grow)
  and keeps small freed blocks, so the increase is a lower bound of what the update allocates.

The budget, computed from the objects (MiB = 2**20 bytes; tensors counted once per storage, so views are not
double counted):

* weights:     parameters and buffers of the diffusion model (``patcher.model.diffusion_model``), LoRA excluded;
* LoRA:        the trainer's ``lora_params`` (fp32 up / down / alpha);
* grads:       one gradient per trainable LoRA parameter;
* optimizer:   the AdamW state after the update (exp_avg, exp_avg_sq, step);
* trajectory:  the rollout's latents ``[N+1, B, ...]``, log-probs ``[N, B]`` and encoded conditioning;
* activations: one micro-batch's forward of the first trained step, replayed through the update's own
  ``ComfyFlowPolicy`` (same cfg / norm rescale / checkpointing, inside ``policy.training()``) with
  ``replay_step`` + the clipped surrogate loss, counting what autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``) whose storage did not exist before (weights, LoRA, trajectory and
  conditioning are excluded). With checkpointing this is what the checkpointed blocks keep (their inputs) plus what
  is saved outside them. Without it, saved tensors later modified in place (FLUX's ``x += ...``) are counted twice:
  ``allow_mutation_on_saved_tensors``, which the update uses then, copies them before the mutation. The line shows
  the share of LoRA-merged weights: ComfyUI's weight-wrapper LoRA computes ``W + alpha / r * up @ down`` per
  wrapped Linear in each forward, and ``F.linear`` saves that full-size weight for the input's gradient wherever
  the input requires grad (every wrapped Linear downstream of the first LoRA).

The sum assumes all terms coexist, as they do from the second update on; in the first update the optimizer state
(2 x the trainable LoRA) is created after the last backward, when the activations are gone. Backward-pass
temporaries are not in the budget: activation gradients, a recomputed block's activations (with checkpointing),
and a dense gradient of each LoRA-merged weight (full ``[out, in]``, then reduced to ``up`` / ``down``); they are
the ``rest`` = measured - budget.
Prints one line per configuration (medians of ``--repeats`` interleaved runs) and the checkpointing saving
(activations off/on, peak off/on).

Run: ``.venv/bin/python benchmarks/bench_memory.py [--model sd3|flux-width|flux-dev|qwen-image] [--depth 4] [--size 32] [--batch 4]
[--steps 10] [--micro-batch 0] [--rank 16] [--repeats 3] [--device cuda --dtype bf16]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Iterator

from comfy_bench import build_model, comfy_in_process, describe, pack_module, parse_sizes

MB = float(2 ** 20)
TERMS = ("weights", "lora", "grads", "optimizer", "trajectory", "activations")
DURING = ("grads", "optimizer", "activations")  # allocated by a process's first update (the CPU delta's budget)
MODES = {"off": False, "on": True}
RESULT = "BENCH_MEMORY_RESULT "


class _Parser(argparse.ArgumentParser):
    def parse_args(self, *args, **kwargs):
        self.set_defaults(repeats=3)  # this benchmark's default (comfy_bench's is 5); an explicit --repeats wins
        return super().parse_args(*args, **kwargs)


def parse_args() -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch", type=int, default=0, help="samples per forward (0: the whole batch)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--worker", choices=tuple(MODES), help=argparse.SUPPRESS)
    return parse_sizes(batch=4, parser=p)


# ----------------------------------------------------------------------------------------------- counting
def storages(tensors) -> dict[int, int]:
    """``{storage data_ptr: storage bytes}`` of ``tensors`` (each storage once, however many views)."""
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def tensors_in(value) -> list:
    """Every tensor inside nested dicts / lists / tuples."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def first_step_loss(pack, policy, rollout):
    """The update's loss of the first trained step on the first micro-batch (``replay_step`` + the clipped
    surrogate; the advantages' values do not change what is saved). Call inside ``policy.training()``."""
    import torch

    trajectory = rollout.trajectory
    spec, b = trajectory.spec, trajectory.batch_size
    j, chunk = spec.train_steps[0], spec.chunks(b)[0]
    out = pack.rollout.replay_step(policy, spec, j, trajectory.latents[j, chunk],
                                   pack.policy.index_cond(trajectory.cond, chunk),
                                   prev_sample=trajectory.latents[j + 1, chunk])
    advantages = torch.linspace(-1.0, 1.0, b, device=out.log_prob.device)[chunk]
    return pack.grpo.clipped_surrogate_loss(out.log_prob, trajectory.log_probs[j, chunk], advantages, 1e-4)


def warm_up(pack, policy, rollout, params: list) -> None:
    """One forward + backward of :func:`first_step_loss`, gradients dropped after: the one-time costs of a
    process's first backward (lazy imports, autograd threads, allocator pools) stay out of the measured update."""
    with policy.training():
        first_step_loss(pack, policy, rollout).backward()
    for p in params:
        p.grad = None


@contextlib.contextmanager
def recording_merged_weights(policy) -> Iterator[weakref.WeakValueDictionary]:
    """Within the context, every weight the policy's LoRA adapters return (``W + alpha / r * up @ down``) is
    recorded, weakly, as ``{id(tensor): tensor}`` (the adapter class's ``__call__`` is wrapped, then restored)."""
    cls = type(policy.adapters[0])
    own = cls.__dict__.get("__call__")
    plain = cls.__call__
    merged = weakref.WeakValueDictionary()

    def recording(self, w):
        out = plain(self, w)
        merged[id(out)] = out
        return out

    cls.__call__ = recording
    try:
        yield merged
    finally:
        if own is None:
            del cls.__call__
        else:
            cls.__call__ = own


def saved_activation_bytes(pack, policy, rollout, exclude: set) -> tuple[int, int, int]:
    """``(saved, copies, merged)`` bytes autograd keeps for backward during :func:`first_step_loss` (storages in
    ``exclude`` skipped, each storage once); ``copies``: saved tensors modified in place later, which
    ``allow_mutation_on_saved_tensors`` copies (without checkpointing); ``merged``: the part of ``saved`` that is
    LoRA-merged weights (:func:`recording_merged_weights`; ``F.linear`` saves them, transposed, as views)."""
    import torch

    saved, packed, merged = {}, {}, {}

    def hook(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            saved[s.data_ptr()] = s.nbytes()
            packed.setdefault((id(t), t.data_ptr(), t._version), t)
            base = t if t._base is None else t._base
            if weights.get(id(base)) is base:
                merged[s.data_ptr()] = s.nbytes()
        return t.detach()  # not t itself: a saved output packed as itself makes a reference cycle (tensor -> graph -> tensor) that gc cannot see, and its graph leaked

    # inside training(): these hooks replace the mutation context's own (no backward is run on this graph)
    with recording_merged_weights(policy) as weights, policy.training(), \
            torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
        loss = first_step_loss(pack, policy, rollout)
    copies = 0 if policy.checkpointing else sum(t.numel() * t.element_size() for (_, _, version), t in packed.items()
                                                if t._version != version)
    # the hook stays referenced after this function returns (seen with FLUX's mutation guard: the first GPU run kept
    # this pass's 35 GiB of activations allocated), so drop what it holds
    packed.clear()
    del loss
    return sum(saved.values()), copies, sum(merged.values())


def release_freed_memory(device) -> None:
    """Collect garbage and, on CPU, hand glibc's freed heap back to the OS (so the RSS baseline is what is live)."""
    gc.collect()
    if device.type == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the baseline keeps the freed memory
            pass


# ----------------------------------------------------------------------------------------------- one measurement
class _Pack:
    """The pack's modules (ComfyUI imports the pack from its path, under a name of its own)."""

    def __init__(self, node: dict):
        for attr, name in (("state", "nodes.state"), ("comfy_policy", "nodes.comfy_policy"),
                           ("rollout", "flowgrpo_core.rollout"), ("policy", "flowgrpo_core.policy"),
                           ("grpo", "flowgrpo_core.grpo"), ("profiling", "flowgrpo_core.profiling")):
            setattr(self, attr, pack_module(node, name))


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    """One fresh-process measurement: the update's peak (and baseline) in MiB and the budget terms in MiB."""
    node, run = comfy_in_process(args.device)
    import torch

    model = build_model(args)
    pack = _Pack(node)
    b = args.batch
    trainer, train_model = run("FlowGRPOLoRAInit", model=model.patcher, rank=args.rank, alpha=float(args.rank),
                               targets="attention", learning_rate=1e-4, seed=0, run_name="bench_memory",
                               resume="none")
    groups = pack.state.PromptBatch(texts=("p",) * b, group_ids=torch.arange(b) // 2, prompt_indices=(0,) * b,
                                    iteration=0, group_size=2)
    rollout = run("FlowGRPOSDERollout", model=train_model, positive=model.positive, negative=model.negative,
                  groups=groups, width=args.size * 8, height=args.size * 8, steps=args.steps, scheduler="simple",
                  shift=0.0, sde_kind="flow_sde", noise_level=0.7, cfg=model.cfg, norm_rescale=False,
                  step_mode="fraction", train_fraction=0.99, window_size=2, window_start=0, window_shift_every=25,
                  micro_batch_size=args.micro_batch, seed=0, iteration=0)[1]
    rewards = pack.state.Rewards(values=torch.linspace(0.0, 1.0, b))
    return dict(measure_update(pack, run, trainer, rollout, rewards, checkpointing), describe=describe(args, model))


def measure_update(pack: "_Pack", run, trainer, rollout, rewards, checkpointing: bool) -> dict:
    """Peak (and baseline) in MiB of one ``FlowGRPOUpdate`` of ``trainer`` on ``rollout`` (after a warm-up forward
    + backward) and the budget terms in MiB (see the module doc). bench_gpu calls it in-process, twice on one
    trainer: the second call then starts with the optimizer state of the first."""
    import torch

    train_model = rollout.model
    device = train_model.load_device
    extras = dict(rollout.trajectory.spec.extras)
    policy = pack.comfy_policy.ComfyFlowPolicy(rollout.model, cfg=extras.get("cfg", 1.0),
                                               norm_rescale=extras.get("norm_rescale", False),
                                               checkpointing=checkpointing)  # as grpo_update builds it
    lora = list(trainer.lora_params.values())
    warm_up(pack, policy, rollout, lora)

    timer = pack.profiling.PhaseTimer(device)
    release_freed_memory(device)
    with timer.phase("before"):  # an empty phase: its peak is the memory in use right now
        pass
    with timer.phase("update"):
        run("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=rewards, clip_range=1e-4, kl_beta=0.0,
            adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1,
            gradient_checkpointing=checkpointing)
    if timer.peak_mb["update"] is None or timer.peak_mb["before"] is None:
        raise SystemExit("no peak-memory counter here (CUDA allocator stats, or /proc/self/clear_refs + VmHWM)")

    lora_ptrs = storages(lora)
    base = train_model.model
    weights = {p: n for p, n in storages([*base.diffusion_model.parameters(), *base.diffusion_model.buffers()]).items()
               if p not in lora_ptrs}
    trajectory = storages([rollout.trajectory.latents, rollout.trajectory.log_probs,
                           *tensors_in(rollout.trajectory.cond)])
    optimizer = storages([t for s in trainer.optimizer.state.values() for t in s.values()
                          if isinstance(t, torch.Tensor)])
    exclude = {*storages([*base.parameters(), *base.buffers()]), *lora_ptrs, *trajectory, *optimizer}
    saved, copies, merged = saved_activation_bytes(pack, policy, rollout, exclude)
    b = rollout.trajectory.batch_size
    return dict(
        device=device.type, before=timer.peak_mb["before"], seconds=timer.seconds["update"],
        peak=timer.peak_mb["update"], weights=sum(weights.values()) / MB, lora=sum(lora_ptrs.values()) / MB,
        grads=sum(p.numel() * p.element_size() for p in lora if p.requires_grad) / MB,
        optimizer=sum(optimizer.values()) / MB, trajectory=sum(trajectory.values()) / MB,
        activations=(saved + copies) / MB, copies=copies / MB, merged=merged / MB,
        trained_steps=len(rollout.trajectory.spec.train_steps), micro_batch=rollout.trajectory.spec.chunks(b)[0].stop)


# ----------------------------------------------------------------------------------------------- the driver
def run_worker(mode: str) -> dict:
    """Run this script in a fresh process for one configuration; its result dict."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", mode],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the checkpointing-{mode} worker failed (exit code {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):])


def budget(row: dict) -> float:
    """The budget the measurement is compared with: every term on CUDA, the terms created by the update on CPU."""
    return sum(row[t] for t in (TERMS if row["device"] == "cuda" else DURING))


def measured(row: dict) -> float:
    return row["peak"] if row["device"] == "cuda" else row["peak"] - row["before"]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    args = parse_args()
    if args.worker:
        print(RESULT + json.dumps(measure(args, MODES[args.worker])), flush=True)
        return
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: off, on, off, on, ...
            rows[mode].append(run_worker(mode))
    first = rows["off"][0]
    cuda = first["device"] == "cuda"
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in (*TERMS, "copies", "merged", "before", "peak")}
           for mode, rs in rows.items()}
    print(first["describe"])
    print(f"LoRA rank {args.rank} on attention, micro-batch {first['micro_batch']} of {args.batch}, "
          f"trained steps {first['trained_steps']}, first update of a fresh process, medians of {args.repeats} "
          f"(MiB = 2**20 bytes)")
    if cuda:
        print("measured: peak torch.cuda.max_memory_allocated during the update; budget: all terms")
    else:
        print("measured: peak RSS increase during the update (VmHWM - RSS before); budget: grads + optimizer + "
              "activations (weights, LoRA, trajectory exist before the update; glibc may reuse memory it kept)")
    for mode, rs in rows.items():
        m = med[mode]
        fit = statistics.median(ratio(measured(r), budget(r)) for r in rs)
        what = (f"peak {m['peak']:9.1f} (allocated before {m['before']:.1f})" if cuda else
                f"peak increase {m['peak'] - m['before']:9.1f} (RSS before {m['before']:.1f})")
        terms = " + ".join(f"{t} {m[t]:.1f}" for t in TERMS)
        parts = [f"merged LoRA weights {m['merged']:.1f}"]
        parts += [f"in-place copies {m['copies']:.1f}"] if m["copies"] else []
        rest = statistics.median(measured(r) - budget(r) for r in rs)
        print(f"checkpointing {mode:>3}: {what} | budget {statistics.median(budget(r) for r in rs):9.1f} | "
              f"{terms} (incl. {', '.join(parts)}) | rest {rest:.1f} | measured/budget {fit:.2f}")
    act = statistics.median(ratio(a["activations"], b["activations"]) for a, b in zip(rows["off"], rows["on"]))
    peak = statistics.median(ratio(measured(a), measured(b)) for a, b in zip(rows["off"], rows["on"]))
    saved = statistics.median(measured(a) - measured(b) for a, b in zip(rows["off"], rows["on"]))
    print(f"summary: gradient checkpointing cuts one micro-batch's activations {act:.2f}x "
          f"({med['off']['activations']:.1f} -> {med['on']['activations']:.1f} MiB) and the update's "
          f"{'peak' if cuda else 'peak RSS increase'} {peak:.2f}x (saves {saved:.1f} MiB; off/on ratios, medians "
          f"of {args.repeats})")


if __name__ == "__main__":
    main()
