#!/usr/bin/env python3
"""IJB-C-size 1:1 scoring with numpy + scikit-learn, exactly as insightface's eval_ijbc.py.

Reads the arrays written by `cargo run --release -p fr-eval --example ijb_scoring -- DIR`
(features.npy f32 (T, D) unit rows, p1.npy / p2.npy int64 template ids, label.npy int64) and
times, median of N repetitions:

1. `verification()`: template features as float64 (the reference builds them with np.zeros and
   sklearn's normalize), batches of 100,000 pairs, `np.sum(feat1 * feat2, -1)`;
2. `sklearn.metrics.roc_curve(label, score)`;
3. TAR at FAR 1e-6 .. 1e-1 by the nearest-point rule (`min(zip(abs(fpr - far), range))` on the
   flipped curve).

Prints one JSON line. Usage: python benchmarks/ijb_scoring.py DIR [REPS]
"""

import json
import sys
import time

import numpy as np
from sklearn.metrics import roc_curve

X_LABELS = [10**-6, 10**-5, 10**-4, 10**-3, 10**-2, 10**-1]


def verification(template_norm_feats, unique_templates, p1, p2):
    """eval_ijbc.py's verification(): cosine of each template pair, batched."""
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    sublists = [total_pairs[i:i + batchsize] for i in range(0, len(p1), batchsize)]
    for s in sublists:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        similarity_score = np.sum(feat1 * feat2, -1)
        score[s] = similarity_score.flatten()
    return score


def tar_at_far(label, score):
    """eval_ijbc.py's ROC table row: nearest point on the flipped sklearn ROC."""
    fpr, tpr, _ = roc_curve(label, score)
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    row = []
    for far in X_LABELS:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        row.append(float(tpr[min_index]))
    return row


def main():
    d = sys.argv[1]
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    feats = np.load(f"{d}/features.npy").astype(np.float64)
    p1 = np.load(f"{d}/p1.npy")
    p2 = np.load(f"{d}/p2.npy")
    label = np.load(f"{d}/label.npy")
    unique_templates = np.arange(feats.shape[0])
    times, score_times = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        score = verification(feats, unique_templates, p1, p2)
        t1 = time.perf_counter()
        tars = tar_at_far(label, score)
        times.append(time.perf_counter() - t0)
        score_times.append(t1 - t0)
    print(json.dumps({
        "side": "numpy+sklearn",
        "pairs": int(len(p1)),
        "genuine": int(label.sum()),
        "median_s": round(float(np.median(times)), 4),
        "median_scoring_s": round(float(np.median(score_times)), 4),
        "times_s": times,
        "score_sum": round(float(score.sum()), 6),
        "tar_nearest": tars,
    }))


if __name__ == "__main__":
    main()
