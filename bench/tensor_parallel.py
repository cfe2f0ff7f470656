"""Tensor parallelism: W1 on the Llama-3.1-8B shape (dummy weights) with one rank and with two
at equal max_num_seqs, on one and two GPUs.

First, a parity check: a small random Llama checkpoint, greedy, one rank against the largest
size (CUDA graphs on). Then for each size: output tokens/s (CUDA graphs on, as served), start-up time, KV blocks, and per
GPU the power and temperature NVML reads during the run (mean and max power, max
temperature, energy from the energy counter; read-only). Then the scaling: speedup and
efficiency (speedup / ranks). Then, for the largest size, a shorter eager leg (no graphs, so
each collective can be timed with CUDA events on rank 0): all-reduce and logits-gather time
per step and their share of the step. Prints a table and one JSON line; `--out` writes the
JSON to a file (bench/results/).

    python3 bench/tensor_parallel.py --out bench/results/tensor-parallel-h200-llama3.1-8b.json
    python3 bench/tensor_parallel.py --smoke      # the CPU, gloo, a tiny Llama: seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import torch

from ondo.bench.shapes import SHAPES, shape_folder
from ondo.bench.throughput import run_ondo
from ondo.bench.workloads import make_workload
from ondo.distributed.collective_timer import CollectiveTimer
from ondo.distributed.group import current_group

log = logging.getLogger("bench.tensor_parallel")


class GpuReadings:
    """Power, temperature and the energy counter of the engine's GPUs, polled by NVML on a
    thread of its own while a run lasts; nothing is ever set."""

    def __init__(self, num_gpus: int, hz: float = 10.0) -> None:
        from ondo.telemetry.gpu_selection import visible_gpu_indices
        from ondo.telemetry.nvml_source import open_nvml

        self.nvml = open_nvml()
        count = self.nvml.nvmlDeviceGetCount()
        uuids = [self.nvml.nvmlDeviceGetUUID(self.nvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(count)]
        uuids = [u.decode() if isinstance(u, bytes) else u for u in uuids]
        indices = visible_gpu_indices(os.environ, uuids) or list(range(count))
        self.indices = indices[:num_gpus]
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        self.period_s = 1.0 / hz
        self._stop = threading.Event()
        self._samples: list[list[tuple[float, float]]] = [[] for _ in self.handles]
        self._energy_mj: list[tuple[int, int] | None] = [None] * len(self.handles)

    def _energy(self, handle) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:  # not supported on this GPU
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, h in enumerate(self.handles):
                power_w = self.nvml.nvmlDeviceGetPowerUsage(h) / 1e3
                temp_c = float(self.nvml.nvmlDeviceGetTemperature(h, self.nvml.NVML_TEMPERATURE_GPU))
                self._samples[i].append((power_w, temp_c))
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuReadings:
        self._start_mj = [self._energy(h) for h in self.handles]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end_mj = [self._energy(h) for h in self.handles]
        self.energy_j = [None if a is None or b is None else (b - a) / 1e3
                         for a, b in zip(self._start_mj, end_mj)]

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for index, samples, energy_j in zip(self.indices, self._samples, self.energy_j):
            power = [p for p, _ in samples]
            rows.append({"nvml_index": index, "samples": len(samples),
                         "power_mean_w": sum(power) / max(len(power), 1),
                         "power_max_w": max(power, default=float("nan")),
                         "temp_max_c": max((t for _, t in samples), default=float("nan")),
                         "energy_j": energy_j})
        return rows


def make_llm(folder: str, size: int, args: argparse.Namespace, eager: bool):
    from ondo import LLM

    return LLM(folder, load_format="dummy", dtype=args.dtype, device=args.device,
               tensor_parallel_size=size, max_model_len=args.max_model_len,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=eager, seed=0)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_leg(folder: str, size: int, args: argparse.Namespace, vocab: int, eager: bool,
            scale: float, seed: int) -> dict[str, Any]:
    """One engine of `size` ranks: start it, warm it up, run W1 (with NVML readings on a GPU,
    with the collectives timed when `eager`); the engine is closed after."""
    t0 = time.perf_counter()
    llm = make_llm(folder, size, args, eager)
    row: dict[str, Any] = {"tensor_parallel_size": size, "cuda_graphs": not eager and args.device != "cpu",
                           "startup_s": time.perf_counter() - t0,
                           "kv_blocks": llm.stats()["num_total_blocks"]}
    try:
        if args.warmup_scale > 0:  # compiles the fused regions' shapes outside the timed run
            run_ondo(llm, make_workload("W1", vocab, seed=999, scale=args.warmup_scale), None)
        workload = make_workload("W1", vocab, seed=seed, scale=scale)
        timer = None
        if eager and size > 1:
            timer = current_group().timer = CollectiveTimer()
        readings = None
        if args.device != "cpu" and not args.no_nvml:
            try:
                readings = GpuReadings(size)
            except Exception as e:  # no pynvml, no driver: the run goes on without readings
                row["nvml"] = f"unavailable: {e}"
        if readings is not None:
            with readings:
                result = run_ondo(llm, workload, None)
            row["gpus"] = readings.summary()
        else:
            result = run_ondo(llm, workload, None)
        row.update({k: result[k] for k in ("elapsed_s", "output_tokens", "input_tokens",
                                           "output_tokens_per_s", "steps", "mean_step_ms",
                                           "preemptions", "host_ms_per_step")})
        row["num_requests"] = len(workload.requests)
        if timer is not None:
            seconds, counts = timer.take()
            steps = max(result["steps"], 1)
            row["collectives"] = {kind: {"ms_per_step": 1e3 * s / steps,
                                         "per_step": counts.get(kind, 0) / steps,
                                         "share_of_step": 1e3 * s / steps / result["mean_step_ms"]}
                                  for kind, s in seconds.items()}
            current_group().timer = None
        if "gpus" in row:
            energy = [g["energy_j"] for g in row["gpus"]]
            if all(e is not None for e in energy):
                row["energy_per_output_token_j"] = sum(energy) / row["output_tokens"]
    finally:
        llm.close()
        del llm
        free_memory()
    return row


def parity_check(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same weights with one rank and with `size`: greedy outputs compared, with CUDA
    graphs as served. Dummy weights cannot show it (each rank draws its own), so a small
    random Llama checkpoint is written first (weights scaled so that logits are O(1) and
    ties rare; bf16 on a GPU still breaks a few near-ties differently)."""
    import math
    import tempfile

    import transformers

    from ondo import LLM, SamplingParams

    folder = tempfile.mkdtemp(prefix="ondo-tp-check-")
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                std = 1.0 if "embed" in name else 1 / math.sqrt(p.shape[-1])
                p.copy_(std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    prompts = [[int(t) for t in torch.randint(0, 1024, (8 + 17 * i,), generator=gen)] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    outputs = {}
    for n in (1, size):
        llm = LLM(folder, tensor_parallel_size=n, dtype=args.dtype, device=args.device,
                  max_model_len=512, max_num_seqs=16, max_num_batched_tokens=512, num_kv_blocks=1024)
        try:
            outputs[n] = [o.outputs[0] for o in llm.generate(prompts, params)]
        finally:
            llm.close()
            del llm
            free_memory()
    prefixes, first_diffs = [], []
    for a, b in zip(outputs[1], outputs[size]):
        prefix = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                      len(a.token_ids))
        prefixes.append(prefix)
        if a.token_ids[0] == b.token_ids[0]:
            t = a.token_ids[0]
            first_diffs.append(abs(a.logprobs[0][t] - b.logprobs[0][t]))
    return {"tensor_parallel_size": size, "prompts": len(prompts), "max_tokens": 32,
            "identical_sequences": sum(p == 32 for p in prefixes),
            "mean_matching_prefix": sum(prefixes) / len(prefixes),
            "first_token_matches": len(first_diffs),
            "first_token_logprob_max_abs_diff": max(first_diffs, default=float("nan"))}


def table(rows: list[dict[str, Any]], scaling: dict[str, float]) -> str:
    lines = [f"{'ranks':>5} {'graphs':>6} {'start s':>8} {'KV blocks':>9} {'out tok/s':>10} "
             f"{'step ms':>8} {'all-reduce ms/step':>18} {'GPU W (mean/max), max °C':>30}"]
    for r in rows:
        ar = r.get("collectives", {}).get("all_reduce")
        reduce_ms = "-" if ar is None else f"{ar['ms_per_step']:.2f} ({100 * ar['share_of_step']:.0f}%)"
        gpus = " ".join(f"[{g['power_mean_w']:.0f}/{g['power_max_w']:.0f} W {g['temp_max_c']:.0f}°C]"
                        for g in r.get("gpus", [])) or "-"
        lines.append(f"{r['tensor_parallel_size']:>5} {str(r['cuda_graphs']):>6} {r['startup_s']:>8.1f} "
                     f"{r['kv_blocks']:>9} {r['output_tokens_per_s']:>10.1f} {r['mean_step_ms']:>8.2f} "
                     f"{reduce_ms:>18} {gpus:>30}")
    for key, value in scaling.items():
        lines.append(f"{key}: {value:.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--sizes", default="1,2", help="tensor-parallel sizes to compare")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--scale", type=float, default=1.0, help="W1's request count, as a fraction of 256")
    ap.add_argument("--timing-scale", type=float, default=0.25,
                    help="the eager leg's W1 fraction (0: no eager leg)")
    ap.add_argument("--warmup-scale", type=float, default=0.0625)
    ap.add_argument("--no-nvml", action="store_true")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the greedy comparison of one rank and the largest size first")
    ap.add_argument("--smoke", action="store_true",
                    help="the CPU (gloo), the tiny-llama shape, four requests: checks the script")
    ap.add_argument("--out", default=None, help="write the JSON here (e.g. bench/results/...)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.device, args.dtype = "cuda", "bfloat16"
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny-llama", "cpu", "float32"
        args.scale = args.timing_scale = 4 / 256
        args.warmup_scale = 0.0
        args.max_num_seqs, args.max_model_len = 8, 2048
        torch.set_num_threads(1)
    elif not torch.cuda.is_available() or torch.cuda.device_count() < max(sizes):
        print(f"error: needs {max(sizes)} CUDA GPUs (or --smoke on the CPU)", file=sys.stderr)
        return 2
    vocab = SHAPES[args.shape]["vocab_size"]
    check = None if args.no_check or max(sizes) == 1 else parity_check(max(sizes), args)
    if check is not None:
        print("parity, one rank against " + str(max(sizes)) + ": " + json.dumps(check), flush=True)
    folder = shape_folder(args.shape)
    rows = [run_leg(folder, size, args, vocab, eager=False, scale=args.scale, seed=0) for size in sizes]
    by_size = {r["tensor_parallel_size"]: r["output_tokens_per_s"] for r in rows}
    scaling: dict[str, float] = {}
    for size in sizes:
        if size > 1 and 1 in by_size:
            scaling[f"speedup_tp{size}"] = by_size[size] / by_size[1]
            scaling[f"efficiency_tp{size}"] = by_size[size] / by_size[1] / size
    if args.timing_scale > 0 and max(sizes) > 1:
        rows.append(run_leg(folder, max(sizes), args, vocab, eager=True, scale=args.timing_scale, seed=1))
    result = {"bench": "tensor_parallel", "shape": args.shape, "workload": "W1",
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
              "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
              "date": time.strftime("%Y-%m-%d"), "parity": check, "runs": rows, "scaling": scaling}
    print(table(rows, scaling))
    print(json.dumps(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
