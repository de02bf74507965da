"""Turn a prompt's websocket events into short terminal lines (used by ``python -m flowgrpo run``).

The pack's own events: ``flowgrpo.metrics`` (one GRPO iteration: ``iteration``, ``iterations``, ``reward_mean``,
``reward_std`` and other numbers), ``flowgrpo.checkpoint`` (``lora_path``, ``state_path``, ``iteration``) and
``flowgrpo.result`` (``lora_path``, ``reward_curve_path``; printed at the end).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

__all__ = ["METRICS_EVENT", "CHECKPOINT_EVENT", "RESULT_EVENT", "format_metrics", "Reporter"]

METRICS_EVENT = "flowgrpo.metrics"
CHECKPOINT_EVENT = "flowgrpo.checkpoint"
RESULT_EVENT = "flowgrpo.result"

#: the metrics a line shows, in order, with their number formats (the event carries more: see the node docs)
_SHOWN = {"approx_kl": "{:.2e}", "clipfrac": "{:.3f}", "loss": "{:+.2e}", "grad_norm": "{:.3g}",
          "zero_std_ratio": "{:.2f}", "seconds": "{:.1f}"}


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def format_metrics(data: dict) -> str:
    """``iter   3/20  reward 0.4123 ± 0.0510  approx_kl 1.00e-06  clipfrac 0.000 ...`` for a ``flowgrpo.metrics``
    event (the reward, then the main diagnostics of :data:`_SHOWN` that the event has)."""
    it, total = data.get("iteration"), data.get("iterations")
    width = len(str(total)) if total is not None else 1
    parts = [f"iter {it!s:>{max(width, 3)}}" + (f"/{total}" if total is not None else "")]
    mean, std = _number(data.get("reward_mean")), _number(data.get("reward_std"))
    if mean is not None:
        parts.append(f"reward {mean:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
    for name, fmt in _SHOWN.items():
        value = _number(data.get(name))
        if value is not None:
            parts.append(f"{name} {'nan' if math.isnan(value) else fmt.format(value)}")
    return "  ".join(parts)


class Reporter:
    """An ``on_event`` callback that prints progress to ``out``.

    titles:     node id -> display title (from the API prompt's ``_meta``).
    output_dir: where the server's ``output`` files are (a local server); paths are printed relative otherwise.
    """

    def __init__(self, out: TextIO, titles: Optional[dict] = None, output_dir: Optional[Path] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.titles, self.output_dir, self.clock = out, titles or {}, output_dir, clock
        self.result: dict = {}
        self.saved: list[str] = []
        self._last_progress = (None, -1.0)
        self._last_running = None
        self._training = False
        self._started = clock()

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _node(self, node_id) -> str:
        title = self.titles.get(str(node_id))
        return f"node {node_id}" + (f" {title}" if title else "")

    def __call__(self, kind: str, data: dict) -> None:
        handler = getattr(self, "_on_" + kind.replace(".", "_"), None)
        if handler is not None:
            handler(data)

    def _on_execution_start(self, data: dict) -> None:
        self._started = self.clock()

    def _on_execution_cached(self, data: dict) -> None:
        cached = data.get("nodes") or []
        if cached:
            self._print(f"cached: {len(cached)} node{'s' if len(cached) != 1 else ''} ({', '.join(map(str, cached))})")

    def _on_executing(self, data: dict) -> None:
        """One line per node; nodes a node expanded into (loops) count as the node that expanded them."""
        node = data.get("display_node") or data.get("node")
        if node is not None and node != self._last_running:
            self._last_running = node
            self._print(f"running {self._node(node)}")

    def _on_progress(self, data: dict) -> None:
        """One line at the first step, at the last, and at most once a second in between."""
        if self._training:
            return
        value, total, node = data.get("value"), data.get("max"), data.get("node")
        last_node, last_time = self._last_progress
        now = self.clock()
        if node == last_node and value != total and value != 1 and now - last_time < 1.0:
            return
        self._last_progress = (node, now)
        self._print(f"  progress {value}/{total}" + (f"  ({self._node(node)})" if node is not None else ""))

    def _on_executed(self, data: dict) -> None:
        """``saved <path>`` for every file a node reports (images, latents, audio, ...)."""
        lists = [v for v in (data.get("output") or {}).values() if isinstance(v, list)]
        for item in (item for items in lists for item in items):
            if not isinstance(item, dict) or "filename" not in item:
                continue
            rel = Path(item.get("subfolder") or "") / item["filename"]
            if item.get("type") == "output" and self.output_dir is not None:
                path = str(self.output_dir / rel)
            else:
                path = f"{rel} ({item.get('type', 'output')})"
            self.saved.append(path)
            self._print(f"  saved {path}")

    def _on_execution_success(self, data: dict) -> None:
        self._print(f"finished in {self.clock() - self._started:.1f} s")

    def _on_flowgrpo_metrics(self, data: dict) -> None:
        self._training = True  # from now on the metrics lines say how far it is: no more progress lines
        self._print(format_metrics(data))

    def _on_flowgrpo_checkpoint(self, data: dict) -> None:
        self._print(f"checkpoint at iteration {data.get('iteration')}: {data.get('lora_path')}"
                    + (f" (state {data['state_path']})" if data.get("state_path") else ""))

    def _on_flowgrpo_result(self, data: dict) -> None:
        self.result.update(data)

    def summary(self) -> list[str]:
        """The closing lines: ``LoRA: <path>`` and ``Reward curve: <path>`` when the run produced them."""
        lines = []
        if self.result.get("lora_path"):
            lines.append(f"LoRA: {self.result['lora_path']}")
        if self.result.get("reward_curve_path"):
            lines.append(f"Reward curve: {self.result['reward_curve_path']}")
        return lines
