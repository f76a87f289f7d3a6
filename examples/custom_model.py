"""Search a model of your own from the command line.

    mpq search --model examples.custom_model:task --budget size=0.4 --out runs/custom

``task()`` returns what ``mpq search`` needs: the model, calibration batches ``(inputs, targets)``, an evaluator
(``model -> float``), the metric's name and direction. Here: a small MLP on scikit-learn's wine data, trained in a
few seconds.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def task():
    from sklearn.datasets import load_wine

    torch.manual_seed(0)
    d = load_wine()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y))
    test, train = perm[:48], perm[48:]
    model = nn.Sequential(nn.Linear(13, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(model(x[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    @torch.no_grad()
    def accuracy(m):
        return float((m(x[test]).argmax(-1) == y[test]).float().mean())

    return SimpleNamespace(name="wine-mlp", model=model, calib=[(x[train], y[train])], eval_fn=accuracy,
                           metric="top1", higher_is_better=True)
