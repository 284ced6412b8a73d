#!/usr/bin/env python3
"""Python peer of `cargo xtask bench loader`: images/s of an insightface-style RecordIO loader.

It does the work of arcface_torch's `MXFaceDataset` + `DataLoader(num_workers=W)` without
mxnet or torch (neither is needed here): a pure-Python `MXIndexedRecordIO` reader (the `.idx`
as a key -> offset dict, one seek + read per record, the IRHeader unpacked with `struct`),
decode (OpenCV `imdecode` + BGR->RGB as `mx.image.imdecode` does, or PIL with
`--decoder pil`), random horizontal flip, `ToTensor` + `Normalize(0.5, 0.5)` as
`(x / 255 - 0.5) / 0.5` into a float32 CHW array, batches of 128 collated by stacking. As
DataLoader does, each worker process builds whole batches and hands them over in shared
memory (`prefetch_factor` 2 batches per worker in flight); the main process only receives them.

    python3 benchmarks/python_loader.py DATA_DIR --batch 128 --workers 2 --epochs 3 --warmup 1

Prints one Markdown row with the median images/s of the timed epochs.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import struct
import time
from multiprocessing import shared_memory

import numpy as np

MAGIC = 0xCED7230A
IR_FORMAT = "IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)


class IndexedRecordIO:
    """Read-only `mx.recordio.MXIndexedRecordIO`: key -> offset from the `.idx`, chunks
    reassembled as dmlc's reader does."""

    def __init__(self, idx_path, rec_path):
        self.idx = {}
        with open(idx_path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2:
                    self.idx[int(fields[0])] = int(fields[1])
        self.keys = sorted(self.idx)
        self.rec_path = rec_path
        self.f = None

    def _file(self):
        # Opened lazily so that each worker process has its own handle (as mxnet reopens
        # the record file after a fork).
        if self.f is None:
            self.f = open(self.rec_path, "rb")
        return self.f

    def read_idx(self, key):
        f = self._file()
        f.seek(self.idx[key])
        parts = []
        while True:
            magic, lrec = struct.unpack("<II", f.read(8))
            if magic != MAGIC:
                raise ValueError(f"bad magic at key {key}")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            data = f.read(length)
            pad = (4 - length % 4) % 4
            if pad:
                f.read(pad)
            if parts:
                parts.append(struct.pack("<I", MAGIC))
            parts.append(data)
            if cflag in (0, 3):
                return b"".join(parts)


def unpack(s):
    """`mx.recordio.unpack`: (flag, label, id, id2) and the image bytes."""
    flag, label, id_, id2 = struct.unpack(IR_FORMAT, s[:IR_SIZE])
    s = s[IR_SIZE:]
    if flag > 0:
        label = np.frombuffer(s, np.float32, flag)
        s = s[flag * 4 :]
    return (flag, label, id_, id2), s


class MXFaceDataset:
    """arcface_torch's dataset: images are keys 1..header0.label[0] (layout A) or every key."""

    def __init__(self, root, decoder):
        self.rec = IndexedRecordIO(
            os.path.join(root, "train.idx"), os.path.join(root, "train.rec")
        )
        header, _ = unpack(self.rec.read_idx(0))
        if header[0] > 0:
            self.imgidx = np.arange(1, int(header[1][0]))
        else:
            self.imgidx = np.array(self.rec.keys)
        self.rec.f.close()
        self.rec.f = None
        self.decoder = decoder

    def __len__(self):
        return len(self.imgidx)

    def decode(self, buf):
        if self.decoder == "cv2":
            import cv2

            img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(buf)).convert("RGB"))

    def getitem_into(self, index, out, rng):
        """`__getitem__` + transform, written into `out` (3, H, W) float32; returns the label."""
        header, img = unpack(self.rec.read_idx(int(self.imgidx[index])))
        label = header[1]
        if not isinstance(label, float):
            label = label[0]
        sample = self.decode(img)
        if rng.random() < 0.5:  # RandomHorizontalFlip
            sample = sample[:, ::-1]
        # ToTensor (HWC uint8 -> CHW float in [0, 1]) then Normalize(0.5, 0.5).
        chw = sample.transpose(2, 0, 1).astype(np.float32)
        np.subtract(chw / np.float32(255.0), np.float32(0.5), out=out)
        out /= np.float32(0.5)
        return int(label)


_DS = None
_SLOTS = None


def _worker_init(root, decoder, shm_names, shape):
    global _DS, _SLOTS
    _DS = MXFaceDataset(root, decoder)
    _SLOTS = []
    for name in shm_names:
        shm = shared_memory.SharedMemory(name=name)
        _SLOTS.append((shm, np.ndarray(shape, np.float32, buffer=shm.buf)))


def _fetch(job):
    """A worker's batch: decode `indices` into shared-memory slot `slot`."""
    slot, indices, seed = job
    rng = np.random.default_rng(seed)
    out = _SLOTS[slot][1]
    labels = [_DS.getitem_into(i, out[j], rng) for j, i in enumerate(indices)]
    return slot, labels


def decode_only(ds, args):
    """Microseconds per image of the decode step alone (`imdecode` + BGR->RGB, or PIL), on
    one thread over payloads held in memory: median of the timed passes."""
    n = min(args.decode_images, len(ds))
    payloads = [unpack(ds.rec.read_idx(int(ds.imgidx[i])))[1] for i in range(n)]
    times = []
    for p in range(args.warmup + max(args.epochs, 1)):
        start = time.perf_counter()
        for buf in payloads:
            ds.decode(buf)
        us = (time.perf_counter() - start) * 1e6 / n
        if p >= args.warmup:
            times.append(us)
    us = statistics.median(times)
    print("| decoder | images | threads | µs/image | images/s |")
    print("|---|---|---|---|---|")
    print(f"| Python {args.decoder} | {n} | 1 | {us:.1f} | {1e6 / us:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="folder holding train.rec, train.idx")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs")
    ap.add_argument("--decoder", choices=["cv2", "pil"], default="cv2")
    ap.add_argument("--prefetch-factor", type=int, default=2)
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="time decoding alone: the first --decode-images payloads in memory, one process",
    )
    ap.add_argument("--decode-images", type=int, default=3000)
    args = ap.parse_args()
    if args.decoder == "cv2":
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            args.decoder = "pil"

    ds = MXFaceDataset(args.data, args.decoder)
    if args.decode_only:
        decode_only(ds, args)
        return
    shape = (args.batch, 3, 112, 112)
    n_slots = args.workers * args.prefetch_factor
    shms = [
        shared_memory.SharedMemory(create=True, size=int(np.prod(shape)) * 4)
        for _ in range(n_slots)
    ]
    views = [np.ndarray(shape, np.float32, buffer=s.buf) for s in shms]
    ctx = mp.get_context("fork")
    rates = []
    try:
        with ctx.Pool(
            args.workers,
            initializer=_worker_init,
            initargs=(args.data, args.decoder, [s.name for s in shms], shape),
        ) as pool:
            for epoch in range(args.warmup + args.epochs):
                start = time.perf_counter()
                order = np.random.default_rng(epoch).permutation(len(ds))
                n_batches = len(ds) // args.batch  # drop_last
                jobs = (
                    (b % n_slots, order[b * args.batch : (b + 1) * args.batch], (epoch, b))
                    for b in range(n_batches)
                )
                # Batches come back in order, at most n_slots in flight; slot b % n_slots is
                # reused only after batch b - n_slots was received.
                images, checksum = 0, 0.0
                pending = []
                for job in jobs:
                    pending.append(pool.apply_async(_fetch, (job,)))
                    if len(pending) >= n_slots:
                        slot, labels = pending.pop(0).get()
                        images += len(labels)
                        checksum += float(views[slot][0, 0, 0, 0])
                for p in pending:
                    slot, labels = p.get()
                    images += len(labels)
                    checksum += float(views[slot][0, 0, 0, 0])
                secs = time.perf_counter() - start
                if epoch >= args.warmup:
                    rates.append(images / secs)
    finally:
        for s in shms:
            s.close()
            s.unlink()
    ips = statistics.median(rates)
    print("| loader | images | batch | workers | images/s |")
    print("|---|---|---|---|---|")
    print(f"| python {args.decoder} | {len(ds)} | {args.batch} | {args.workers} | {ips:.1f} |")


if __name__ == "__main__":
    main()
