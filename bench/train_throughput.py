"""Training throughput: tunesmith against TRL's SFTTrainer, the seed's recipe and a plain loop, on one workload.

Workload (the same for every system): SmolLM2-135M-Instruct (the default model), 64 seeded examples of
examples/data/alpaca_en_demo.json as user/assistant messages (~13k tokens), one pass, LoRA r=16
alpha=32 on q/k/v/o, dropout 0, lr 2e-4, max length 512, 8 rows (packing) or 8 examples (padding) per
micro-batch, no gradient accumulation. Systems:

- tunesmith: ``tunesmith.finetune`` with these settings and its own defaults for the rest (packing,
  assistant-only loss, bf16 where the CPU has it).
- trl_default: TRL's SFTTrainer with peft, messages in, every other option at TRL's default.
- trl_best: TRL at its best here: prompt-completion data (completion-only loss: SmolLM2's template has no
  ``{% generation %}`` markers, so TRL's ``assistant_only_loss`` refuses it), packing with bfd (padding-free),
  bf16, no gradient checkpointing (TRL's default turns it on; it costs time, not needed at this size).
- seed: the seed's recipe: HF Trainer, ``tokenizer(padding=True)`` inside a batched ``map`` (every row padded
  to the longest of the 64), ``labels = input_ids``, fp32 (its fp16 does not exist on CPU).
- plain: a ~40-line loop (below): bf16 autocast, padded per batch, assistant-only loss.

Each training runs in its own subprocess, the systems interleaved within each round. Tokens/s is
non-padding tokens over training time, both measured inside the child (model load, tokenization and
evaluation excluded). Peak RSS is the child's own (``os.wait4``). Every saved adapter is then scored by one
shared evaluator in a fresh process: fp32, mean NLL over the 32 held-out examples' response tokens.

Run: ``python bench/train_throughput.py [--rounds R] [--json OUT]``; ``--profile`` prints where
tunesmith's training step spends its time (torch.profiler over the workload's micro-batches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "alpaca_en_demo.json"
SYSTEMS = ("tunesmith", "trl_default", "trl_best", "seed", "plain")
R, ALPHA, TARGETS, LR, SEED = 16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], 2e-4, 0


@dataclass
class Workload:
    """What every system trains on; the CPU defaults here, bench/gpu.sh sets a CUDA one."""

    model: str = "smollm2-135m-instruct"  # an alias or a model directory
    device: str = "cpu"
    train: int = 64
    heldout: int = 32
    max_length: int = 512
    batch: int = 8  # rows (packing) or examples (padding) per micro-batch
    threads: int = 0  # torch threads in every child; 0: torch's default (one per core)
    attn: str | None = None  # attn_implementation for every system (flash_attention_2 on CUDA when installed)
    liger: bool = False  # liger-kernel's RMSNorm/RoPE/SwiGLU for every system (CUDA)

    def save(self, work: Path) -> None:
        (work / "workload.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, work: Path) -> Workload:
        return cls(**json.loads((work / "workload.json").read_text()))

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def write_data(work: Path, w: Workload) -> None:
    """train.jsonl and heldout.jsonl as OpenAI messages: a seeded sample, disjoint."""
    rows = json.loads(DATA.read_text())
    picked = random.Random(SEED).sample(range(len(rows)), w.train + w.heldout)

    def messages(row: dict) -> dict:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}

    for name, part in (("train", picked[:w.train]), ("heldout", picked[w.train:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(messages(rows[i])) + "\n" for i in part))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def model_path(w: Workload) -> str:
    from tunesmith.models.resolve import resolve

    return str(resolve(w.model))


def prepare_child(w: Workload) -> None:
    """Threads and kernels, the same for every system."""
    import torch

    if w.threads:
        torch.set_num_threads(w.threads)
    if w.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # The layer kernels only: every system keeps its own loss (tunesmith's skips unsupervised positions).
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def peak_memory(w: Workload) -> dict:
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if w.cuda else {}


def bf16(w: Workload) -> bool:
    import torch

    return torch.cuda.is_bf16_supported() if w.cuda else torch.cpu._is_avx512_bf16_supported()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def prompt_and_response_ids(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The rendered prompt (with the generation prefix) and the response ending in <|im_end|>, as the
    template renders them; shared by the plain loop and the evaluator."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    response = messages[-1]["content"] + tok.eos_token
    return (tok(prompt, add_special_tokens=False)["input_ids"], tok(response, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- the systems (each in its own process)


def tunesmith_overrides(work: Path, w: Workload, out: Path) -> list[str]:
    """The workload's settings, passed explicitly; everything else is tunesmith's default."""
    return [f"model.name={w.model}", f"data.path={work / 'train.jsonl'}", f"data.max_length={w.max_length}",
            f"method.r={R}", f"method.alpha={ALPHA}", "method.dropout=0", f"method.target_modules={','.join(TARGETS)}",
            f"train.lr={LR}", f"train.batch_size={w.batch}", "train.grad_accum=1", "train.epochs=1",
            f"output.output_dir={out}", "output.overwrite=true"] + ([f"model.attn_implementation={w.attn}"] if w.attn else [])


def run_tunesmith(work: Path, w: Workload, out: Path, precision: str | None = None) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train.loop import finetune

    extra = [f"train.precision={precision}"] if precision else []
    result = finetune(load_config(None, tunesmith_overrides(work, w, out / "run") + extra))
    # metrics.jsonl's elapsed_s counts from the first training step: no model load, no tokenization.
    last = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    return {"tokens": result.tokens, "train_s": last["elapsed_s"], "steps": result.steps, "adapter": str(out / "run")}


def _trainer_timer():
    """A TrainerCallback that times train() from on_train_begin to on_train_end."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started

    return Timer()


def run_trl(work: Path, w: Workload, out: Path, best: bool) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = read_rows(work / "train.jsonl")
    extra = {"use_cpu": not w.cuda}
    if w.attn:
        extra["model_init_kwargs"] = {"attn_implementation": w.attn}
    if best:  # prompt-completion: TRL's completion-only loss, i.e. the assistant's tokens only
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
        extra.update(packing=True, packing_strategy="bfd", bf16=bf16(w), gradient_checkpointing=False)
    args = SFTConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=w.batch,
                     gradient_accumulation_steps=1, learning_rate=LR, num_train_epochs=1, max_length=w.max_length,
                     report_to="none", save_strategy="no", logging_steps=1, seed=SEED, **extra)
    timer = _trainer_timer()
    trainer = SFTTrainer(model=model_path(w), args=args, train_dataset=Dataset.from_list(rows),
                         peft_config=lora_config(), callbacks=[timer])
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # packed rows hold no padding
    return {"tokens": tokens, "train_s": timer.seconds, "steps": trainer.state.global_step,
            "adapter": str(out / "adapter")}


def run_seed(work: Path, w: Workload, out: Path) -> dict:
    """The seed's LoRAFineTuner, with this workload's LoRA and batch settings (its fp16=True on CUDA only)."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_path(w))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in read_rows(work / "train.jsonl")]

    def tokenize_function(examples):
        tokenized = tok(examples["text"], truncation=True, padding=True, max_length=w.max_length, return_tensors="pt")
        tokenized["labels"] = tokenized["input_ids"].clone()
        return tokenized

    dataset = Dataset.from_list([{"text": t} for t in texts]).map(tokenize_function, batched=True,
                                                                    remove_columns=["text"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path(w), dtype=torch.float32,
                                                                **({"attn_implementation": w.attn} if w.attn else {})),
                           lora_config())
    timer = _trainer_timer()
    args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=1, per_device_train_batch_size=w.batch,
                             gradient_accumulation_steps=1, learning_rate=LR, logging_steps=10, save_strategy="no",
                             report_to="none", seed=SEED, use_cpu=not w.cuda, fp16=w.cuda)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    trainer.train()
    model.save_pretrained(str(out / "adapter"))
    tokens = sum(sum(mask) for mask in dataset["attention_mask"])
    return {"tokens": tokens, "train_s": timer.seconds, "steps": trainer.state.global_step,
            "adapter": str(out / "adapter")}


def run_plain(work: Path, w: Workload, out: Path) -> dict:
    """What a user writes from the peft docs."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(w))
    kwargs = {"attn_implementation": w.attn} if w.attn else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path(w), dtype=torch.float32, **kwargs),
                           lora_config()).to(w.device)
    examples = []
    for row in read_rows(work / "train.jsonl"):
        prompt, response = prompt_and_response_ids(tok, row["messages"])
        ids = (prompt + response)[:w.max_length]
        examples.append((ids, ([-100] * len(prompt) + response)[:w.max_length]))
    random.Random(SEED).shuffle(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    started = time.perf_counter()
    for i in range(0, len(examples), w.batch):
        batch = examples[i:i + w.batch]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch], device=w.device)
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch], device=w.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=w.device)
        with torch.autocast(w.device, dtype=torch.bfloat16, enabled=bf16(w)):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if w.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    model.save_pretrained(str(out / "adapter"))
    return {"tokens": sum(len(x) for x, _ in examples), "train_s": seconds, "steps": -(-len(examples) // w.batch),
            "adapter": str(out / "adapter")}


def evaluate(work: Path, w: Workload, adapter: str) -> dict:
    """Mean NLL per response token over the held-out set, fp32, from the saved adapter; one example at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(w))
    base = AutoModelForCausalLM.from_pretrained(model_path(w), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).to(w.device).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in read_rows(work / "heldout.jsonl"):
            prompt, response = prompt_and_response_ids(tok, row["messages"])
            ids = torch.tensor([(prompt + response)[:w.max_length]], device=w.device)
            targets = torch.tensor(response[:w.max_length - len(prompt)], device=w.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
    return {"eval_loss": total / count, "eval_tokens": count}


def child(system: str, work: Path, out: Path, adapter: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    w = Workload.load(work)
    prepare_child(w)
    if system == "eval":
        result = evaluate(work, w, adapter)
    else:
        runner = {"tunesmith": run_tunesmith, "tunesmith_fp32": lambda *a: run_tunesmith(*a, precision="fp32"),
                  "trl_default": lambda *a: run_trl(*a, best=False),
                  "trl_best": lambda *a: run_trl(*a, best=True), "seed": run_seed, "plain": run_plain}[system]
        result = {**runner(work, w, out), **peak_memory(w)}
    (out / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def spawn(system: str, work: Path, out: Path, *extra: str) -> dict:
    """Run one child; its result plus its own peak RSS and CPU seconds (os.wait4: this child only)."""
    log = Path(f"{out}.log")
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, __file__, "--child", system, "--work", str(work), "--out", str(out),
                                 *extra], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    return {**result, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "trl", "accelerate")}


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a part of the device name; GPU_PEAK_TFLOPS overrides.
GPU_PEAK_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                   "L4": 121, "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 3090": 71}


def gpu_peak_flops() -> float | None:
    import torch

    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for part, tflops in GPU_PEAK_TFLOPS.items() if part in name), None)


def flops_per_token(w: Workload) -> float:
    """LoRA training: 2N for the forward and 2N for the input gradients (frozen weights get no weight
    gradient; the adapters' own work is under 1% of it); attention's L^2 terms are left out."""
    from tunesmith.models.resolve import resolve
    from tunesmith.train.plan import ModelFacts

    return 4.0 * ModelFacts.read(resolve(w.model)).params


def summarise(runs: dict, w: Workload) -> dict:
    def median(system, key):
        values = [r[key] for r in runs[system] if key in r]
        return statistics.median(values) if values else None

    speed = {s: median(s, "tokens_per_s") for s in runs}
    summary = {"tokens_per_s": speed,
               "ratios": {s: speed["tunesmith"] / speed[s] for s in runs if s != "tunesmith" and "tunesmith" in runs},
               "eval_loss": {s: median(s, "eval_loss") for s in runs},
               "peak_rss_mb": {s: median(s, "peak_rss_mb") for s in runs},
               "tokens": {s: median(s, "tokens") for s in runs},
               "train_s": {s: median(s, "train_s") for s in runs},
               "cpu_s": {s: median(s, "cpu_s") for s in runs}}
    if w.cuda:
        import torch

        summary["peak_gpu_mb"] = {s: median(s, "peak_gpu_mb") for s in runs}
        peak = gpu_peak_flops()
        summary["gpu"] = {"name": torch.cuda.get_device_name(), "peak_bf16_tflops": peak / 1e12 if peak else None}
        if peak:
            summary["mfu"] = {s: speed[s] * flops_per_token(w) / peak for s in runs}
    return summary


def print_table(summary: dict, w: Workload, rounds: int) -> None:
    print(f"\n{w.model} on {w.device}, {w.train} examples, medians over {rounds} round(s); "
          "ratio = tunesmith's tokens/s over the system's")
    gpu = "peak_gpu_mb" in summary
    print(f"{'system':<12} {'tokens/s':>9} {'ratio':>7} {'train s':>8} {'tokens':>7} {'peak RSS MB':>12} "
          f"{'held-out loss':>14}" + (f" {'peak GPU MB':>12} {'MFU':>6}" if gpu else ""))
    for s in summary["tokens_per_s"]:
        ratio = summary["ratios"].get(s)
        line = (f"{s:<12} {summary['tokens_per_s'][s]:>9.1f} {f'{ratio:.2f}x' if ratio else '':>7} "
                f"{summary['train_s'][s]:>8.1f} {summary['tokens'][s]:>7.0f} {summary['peak_rss_mb'][s]:>12.0f} "
                f"{summary['eval_loss'][s]:>14.4f}")
        if gpu:
            mfu = summary.get("mfu", {}).get(s)
            line += f" {summary['peak_gpu_mb'][s]:>12.0f} {f'{100 * mfu:.1f}%' if mfu else '?':>6}"
        print(line)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))


def profile(work: Path, w: Workload, steps: int) -> None:
    """Operator breakdown of tunesmith's training steps on this workload, after one warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity

    from tunesmith.config import load_config
    from tunesmith.train import loop

    prepare_child(w)
    config = load_config(None, tunesmith_overrides(work, w, work / "profile-run") + [f"train.max_steps={steps + 1}"])
    session = loop._start(loop.prepare_run(config))
    total = session.run.plan.total_steps
    session.run.plan.total_steps = 1
    loop._train(session)  # warm-up: the first step pays for allocations and kernel selection
    session.run.plan.total_steps = total
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        loop._train(session)
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if w.cuda else "self_cpu_time_total",
                                    row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the summary and every run here")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma separated, from " + ", ".join(SYSTEMS) + " and tunesmith_fp32 (train.precision fp32: "
                             "the loss-parity reference)")
    parser.add_argument("--profile", type=int, metavar="STEPS", help="profile tunesmith's training steps instead")
    w = Workload()
    parser.add_argument("--threads", type=int, default=w.threads, help="torch threads per child; 0: one per core")
    parser.add_argument("--model", default=w.model, help="alias or model directory (bench/gpu.sh: a random 1B)")
    parser.add_argument("--device", default=w.device, choices=["cpu", "cuda"])
    parser.add_argument("--train", type=int, default=w.train, help="training examples")
    parser.add_argument("--heldout", type=int, default=w.heldout, help="held-out examples")
    parser.add_argument("--max-length", type=int, default=w.max_length)
    parser.add_argument("--batch", type=int, default=w.batch, help="rows (packing) or examples per micro-batch")
    parser.add_argument("--attn", help="attn_implementation for every system, e.g. flash_attention_2")
    parser.add_argument("--liger", action="store_true", help="liger-kernel's layer kernels for every system")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.work, args.out, args.adapter)
    w = Workload(**{name: getattr(args, name) for name in asdict(Workload())})
    systems = args.systems.split(",")
    with tempfile.TemporaryDirectory(prefix="tunesmith-throughput-") as tmp:
        work = Path(tmp)
        w.save(work)
        write_data(work, w)
        if args.profile:
            return profile(work, w, args.profile)
        runs = {s: [] for s in systems}
        for r in range(args.rounds):
            for s in systems:
                out = work / f"round{r}-{s}"
                run = spawn(s, work, out)
                scored = spawn("eval", work, work / f"round{r}-{s}-eval", "--adapter", run["adapter"])
                run.update(eval_loss=scored["eval_loss"], eval_tokens=scored["eval_tokens"])
                run["tokens_per_s"] = run["tokens"] / run["train_s"]
                runs[s].append(run)
                print(f"round {r + 1} {s}: {run['tokens_per_s']:.1f} tokens/s ({run['tokens']} tokens in "
                      f"{run['train_s']:.1f} s, {run['cpu_s']:.0f} CPU s in all), peak RSS {run['peak_rss_mb']:.0f} MB, "
                      f"held-out loss {run['eval_loss']:.4f}"
                      + (f", peak GPU {run['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in run else ""), flush=True)
        summary = summarise(runs, w)
        print_table(summary, w, args.rounds)
        if args.json:
            args.json.write_text(json.dumps({**summary, "workload": asdict(w), "versions": versions(),
                                             "rounds": args.rounds, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
