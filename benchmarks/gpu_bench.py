"""PyTorch peer of `cargo xtask bench gpu`: IResNet training and inference images/s on one GPU.

Runs the configuration of insightface arcface_torch's `configs/ms1mv3_r50.py` the way its
`train_v2.py` does on one GPU, on synthetic inputs already on the device, and prints the same
Markdown rows (date, framework, device, model, mode, precision, batch, images/s) as the Rust
benchmark; `--json` writes them, `--fr-json` reads the Rust benchmark's JSON and prints the
fr / PyTorch ratio per model and mode:

    cargo run --release -p xtask --features cuda,cudnn -- bench gpu --json fr-gpu.json
    python3 benchmarks/gpu_bench.py --json pytorch-gpu.json --fr-json fr-gpu.json
    python3 benchmarks/gpu_bench.py --device cpu --models r18 --input-size 16 --batch 4 \
        --classes 10 --infer-batch 4 --steps 2 --warmup 1 --precision f32   # smoke test

Training step (train_v2.py with `fp16 = True`, PartialFC_V2 at sample rate 1 on one GPU):
the backbone forward under `torch.autocast` up to the flatten, `fc` and `features` in float32
(arcface_torch's backbones/iresnet.py); cosine logits of the normalised embeddings and class
centres under autocast, then in float32 clamped to [-1, 1]; ArcFace as arcface_torch's
`CombinedMarginLoss(64, 1.0, 0.5, 0.0)` (the margin edits the target angle under `no_grad`);
cross-entropy; backward; gradient-norm clip at 5 over the backbone; SGD (lr 0.1, momentum 0.9,
weight decay 5e-4); `loss.item()` each step, as the training loop logs it. With `--precision
f16` the loss is scaled by a `GradScaler(growth_interval=100)` (unscale, clip, step, update);
`bf16` needs no scaling; `f32` turns autocast off. `torch.backends.cudnn.benchmark` is on, as in
train_v2.py. Inference: eval mode, `torch.inference_mode()`, the same autocast forward, batch
`--infer-batch`. The device is synchronised before the clock is read at both ends.

The backbone is benchmarks/pytorch_iresnet.py's IResNet (arcface_torch's, imported from there).
Needs python3 with torch; `--device cpu` runs the same code on the CPU for smoke tests.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_iresnet import MODELS, IResNet  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": None}
PRECISION_ALIASES = {"fp16": "f16", "fp32": "f32", "bfloat16": "bf16"}


class AmpIResNet(IResNet):
    """pytorch_iresnet's IResNet with arcface_torch's mixed-precision forward: the layers up to
    the flatten under autocast, `fc` and `features` in float32."""

    def __init__(self, layers, widths, embedding_size, input_size, amp_dtype, device_type):
        super().__init__(layers, widths, embedding_size, input_size)
        self.amp_dtype = amp_dtype
        self.device_type = device_type

    def forward(self, x):
        with autocast(self.device_type, self.amp_dtype):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float()))


def autocast(device_type, amp_dtype):
    """`torch.autocast` in `amp_dtype`, or a disabled one for float32."""
    return torch.autocast(
        device_type=device_type,
        dtype=amp_dtype or torch.bfloat16,
        enabled=amp_dtype is not None,
    )


class ArcFaceHead(nn.Module):
    """PartialFC_V2 at sample rate 1 on one GPU with CombinedMarginLoss(s, 1.0, m, 0.0): class
    centres N(0, 0.01), cosine logits under autocast, the additive angular margin applied to the
    target angle under `no_grad` (gradients as for the plain cosine), scale, cross-entropy."""

    def __init__(self, embedding_size, num_classes, amp_dtype, device_type, s=64.0, m=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.s = s
        self.m = m

    def forward(self, embeddings, labels):
        with autocast(self.device_type, self.amp_dtype):
            logits = F.linear(F.normalize(embeddings), F.normalize(self.weight))
        logits = logits.float().clamp(-1, 1)
        rows = torch.arange(labels.size(0), device=labels.device)
        with torch.no_grad():
            target_angle = logits[rows, labels].arccos_()
            logits.arccos_()
            logits[rows, labels] = target_angle + self.m
            logits.cos_()
        return F.cross_entropy(logits * self.s, labels)


def device_name(device):
    """The GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def synchronize(device):
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(device, warmup, steps, step):
    """Seconds of `steps` calls `step(True)` after `warmup` untimed calls `step(False)`, with
    the device synchronised before each clock reading."""
    for _ in range(warmup):
        step(False)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(True)
    synchronize(device)
    return time.perf_counter() - start


def build_model(name, size, amp_dtype, device, channels_last):
    """The IResNet `name` at `size`x`size` on `device`."""
    layers, widths, emb_size, _ = MODELS[name]
    model = AmpIResNet(layers, widths, emb_size, size, amp_dtype, device.type).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, emb_size


def images_on(device, n, size, channels_last):
    """`n` images uniform in [-1, 1) on `device`."""
    x = torch.rand(n, 3, size, size, device=device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_seconds(args, name, size, device):
    """Timed seconds of the training steps of model `name`, and how many of them the f16
    GradScaler skipped (inf/NaN gradients: no optimiser step)."""
    amp_dtype = AMP_DTYPES[args.precision]
    model, emb_size = build_model(name, size, amp_dtype, device, args.channels_last)
    head = ArcFaceHead(emb_size, args.classes, amp_dtype, device.type).to(device)
    model.train()
    head.train()
    opt = torch.optim.SGD(
        params=[{"params": model.parameters()}, {"params": head.parameters()}],
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
    )
    scaler = None
    if args.precision == "f16":
        try:
            scaler = torch.amp.GradScaler(device.type, growth_interval=100)
        except AttributeError:  # torch < 2.3
            scaler = torch.cuda.amp.GradScaler(growth_interval=100)
    images = images_on(device, args.batch, size, args.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    skipped = 0

    def step(timed):
        nonlocal skipped
        loss = head(model(images), labels)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 5)
            scaler.step(opt)
            scaler.update()
            skipped += int(timed and scaler.get_scale() < scale)
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5)
            opt.step()
        opt.zero_grad()
        loss.item()

    seconds = time_steps(device, args.warmup, args.steps, step)
    return seconds, skipped


def infer_seconds(args, name, size, device):
    """Timed seconds of the eval-mode forwards of model `name`."""
    model, _ = build_model(name, size, AMP_DTYPES[args.precision], device, args.channels_last)
    model.eval()
    images = images_on(device, args.infer_batch, size, args.channels_last)

    def step(_timed):
        with torch.inference_mode():
            model(images)

    return time_steps(device, args.warmup, args.steps, step), None


def print_ratios(rows, fr_path):
    """Print fr / PyTorch images/s per model and mode from the Rust benchmark's JSON."""
    with open(fr_path) as f:
        fr_rows = json.load(f)["rows"]
    fr = {(r["model"], r["mode"]): r for r in fr_rows}
    print()
    print(f"# fr / PyTorch ({fr_path})")
    print("| model | mode | precision | batch | fr images/s | PyTorch images/s | fr / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        other = fr.get((row["model"], row["mode"]))
        if other is None:
            print(f"| {row['model']} | {row['mode']} | {row['precision']} | {row['batch']} "
                  f"| – | {row['images_per_s']:.1f} | – |")
            continue
        for key in ("precision", "batch", "input_size", "device"):
            if other.get(key) != row.get(key):
                print(f"warning: {row['model']} {row['mode']}: {key} differs "
                      f"(fr {other.get(key)!r}, PyTorch {row.get(key)!r})", file=sys.stderr)
        ratio = other["images_per_s"] / max(row["images_per_s"], 1e-9)
        print(f"| {row['model']} | {row['mode']} | {row['precision']} | {row['batch']} "
              f"| {other['images_per_s']:.1f} | {row['images_per_s']:.1f} | {ratio:.2f}x |")


def main():
    """Parse the options, measure every model and phase, print the rows (and ratios)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="r50,r100",
                   help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--phases", default="train,infer", help="comma-separated: train, infer")
    p.add_argument("--batch", type=int, default=128, help="training images per step")
    p.add_argument("--infer-batch", type=int, default=512, help="images per inference forward")
    p.add_argument("--classes", type=int, default=93431, help="head classes (MS1MV3: 93,431)")
    p.add_argument("--input-size", type=int, help="input side (default: the model's, 112)")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps")
    p.add_argument("--precision", default="bf16",
                   choices=list(AMP_DTYPES) + list(PRECISION_ALIASES))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for the model and inputs")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--fr-json", help="JSON of `cargo xtask bench gpu --json`: print fr / PyTorch")
    args = p.parse_args()
    args.precision = PRECISION_ALIASES.get(args.precision, args.precision)
    models = [m for m in args.models.split(",") if m]
    phases = [m for m in args.phases.split(",") if m]
    if any(m not in MODELS for m in models) or not models:
        p.error(f"--models: choose from {', '.join(MODELS)}")
    if any(ph not in ("train", "infer") for ph in phases) or not phases:
        p.error("--phases: choose from train, infer")
    if min(args.batch, args.infer_batch, args.classes, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --infer-batch, --classes and --steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device visible to torch; `--device cpu` runs a smoke test on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    name = device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    framework = "pytorch"
    layout = ", channels_last" if args.channels_last else ""
    print(f"# peer: PyTorch {torch.__version__}{layout}")
    print("| date | framework | device | model | mode | precision | batch | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for model in models:
        size = args.input_size or MODELS[model][3]
        for phase in phases:
            if phase == "train":
                batch, (seconds, skipped) = args.batch, train_seconds(args, model, size, device)
            else:
                batch, (seconds, skipped) = (args.infer_batch,
                                             infer_seconds(args, model, size, device))
            if skipped:
                print(f"warning: {model} train: {skipped} of {args.steps} timed steps were "
                      "skipped by the GradScaler (no optimiser step); raise --warmup",
                      file=sys.stderr)
            row = {
                "date": date,
                "framework": framework,
                "device": name,
                "model": model,
                "mode": phase,
                "precision": args.precision,
                "batch": batch,
                "input_size": size,
                "classes": args.classes if phase == "train" else None,
                "warmup": args.warmup,
                "steps": args.steps,
                "seconds": seconds,
                "skipped_steps": skipped,
                "images_per_s": batch * args.steps / max(seconds, 1e-9),
                "channels_last": args.channels_last,
            }
            if device.type == "cuda":
                row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                torch.cuda.reset_peak_memory_stats(device)
            print(f"| {date} | {framework} | {name} | {model} | {phase} | {args.precision} "
                  f"| {batch} | {row['images_per_s']:.1f} |", flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        report = {"framework": framework, "version": torch.__version__, "date": date,
                  "device": name, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.fr_json:
        print_ratios(rows, args.fr_json)


if __name__ == "__main__":
    main()
