"""PyTorch peer of `cargo xtask bench train|infer`: IResNet throughput and peak memory on CPU.

Runs the same model, inputs and step as the Rust benchmark (xtask/src/bench.rs) so the two
can be compared side by side, and prints the same Markdown table (one row), preceded by a
`# peer: PyTorch <version>` line:

    python3 benchmarks/pytorch_iresnet.py train --model r18 --batch 32 --steps 3
    python3 benchmarks/pytorch_iresnet.py infer --model r50 --batch 32 --steps 3
    python3 benchmarks/pytorch_iresnet.py train --model default --batch 64

Models: r18, r34, r50, r100 at 112x112 (`--input-size 56` for the half-size variant) and
`default`, the narrow IResNet of configs/lh2face.toml (layers [1,1,1,1], widths
[8,16,32,64], embedding 128, 56x56). The backbone is insightface arcface_torch's IResNet
(recognition/arcface_torch/backbones/iresnet.py). `train` = forward, ArcFace (s 64, m 0.5,
classic th/mm fallback) over 1000 classes, backward, global grad-norm clip at 5 and an SGD
step (lr 0.1, momentum 0.9, weight decay 5e-4); `infer` = eval-mode forward. Run one model
per process so the peak RSS is that model's alone. Needs only python3 with torch.
"""

import argparse
import math
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

MODELS = {
    # name: (layers, widths, embedding size, default input size)
    "r18": ([2, 2, 2, 2], [64, 128, 256, 512], 512, 112),
    "r34": ([3, 4, 6, 3], [64, 128, 256, 512], 512, 112),
    "r50": ([3, 4, 14, 3], [64, 128, 256, 512], 512, 112),
    "r100": ([3, 13, 30, 3], [64, 128, 256, 512], 512, 112),
    "default": ([1, 1, 1, 1], [8, 16, 32, 64], 128, 56),
}
N_CLASSES = 1000
BN_EPS = 1e-5


def conv3x3(cin, cout, stride=1):
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """IR unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3/s -> BN, plus the (projected) input."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=BN_EPS),
            )

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """insightface arcface_torch IResNet with output block E (BN-Dropout-FC-BN)."""

    def __init__(self, layers, widths, embedding_size, input_size):
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        stages, inplanes = [], widths[0]
        for n_blocks, planes in zip(layers, widths):
            blocks = [IBasicBlock(inplanes, planes, 2)]
            blocks += [IBasicBlock(planes, planes, 1) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(widths[3], eps=BN_EPS)
        self.dropout = nn.Dropout(p=0.0)
        side = input_size
        for _ in range(4):
            side = math.ceil(side / 2)
        self.fc = nn.Linear(widths[3] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def arcface_loss(emb, centres, labels, scale=64.0, margin=0.5, cos_eps=1e-7):
    """ArcFace cross-entropy with the classic th/mm fallback, mean over the batch."""
    cos = F.normalize(emb) @ F.normalize(centres).t()
    c = cos.gather(1, labels[:, None]).clamp(-1 + cos_eps, 1 - cos_eps)
    with_margin = c * math.cos(margin) - torch.sqrt(1 - c * c) * math.sin(margin)
    fallback = c - math.sin(math.pi - margin) * margin
    target = torch.where(c > math.cos(math.pi - margin), with_margin, fallback)
    logits = cos.scatter(1, labels[:, None], target) * scale
    return F.cross_entropy(logits, labels)


def main():
    """Parse the options, run the warm-up and timed steps, print the Markdown row."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["train", "infer"])
    p.add_argument("--model", choices=list(MODELS), default="default")
    p.add_argument("--input-size", type=int, help="default: 112, or 56 for `default`")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    args = p.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    layers, widths, emb_size, default_size = MODELS[args.model]
    size = args.input_size or default_size
    model = IResNet(layers, widths, emb_size, size)
    images = torch.rand(args.batch, 3, size, size) * 2 - 1
    labels = torch.randint(0, N_CLASSES, (args.batch,))

    if args.mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(images).numpy()

    else:
        model.train()
        centres = nn.Parameter(torch.randn(N_CLASSES, emb_size))
        params = [q for q in model.parameters() if q.requires_grad] + [centres]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)

        def step():
            loss = arcface_loss(model(images), centres, labels)
            loss.backward()
            nn.utils.clip_grad_norm_(params, max_norm=5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start

    ips = args.batch * args.steps / max(elapsed, 1e-9)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# peer: PyTorch {torch.__version__}")
    print("| model | input | batch | mode | threads | images/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {size} | {args.batch} | {args.mode.capitalize()} "
        f"| {torch.get_num_threads()} | {ips:.2f} | {rss_mib:.0f} |"
    )


if __name__ == "__main__":
    main()
