"""``digits-cnn``: a small CNN on scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "digits-cnn"
SPLIT_SEED = 0
N_TEST = 360
CALIB_BATCHES, CALIB_BATCH_SIZE = 4, 64  # held out from training: damage measured on it predicts unseen data


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 2 * 2, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4 -> 2x2
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def load_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic split: ``test`` (360 images), ``calib`` (256, never trained on), ``train`` (the rest, 1,181);
    pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_calib = CALIB_BATCHES * CALIB_BATCH_SIZE
    test, calib, train = perm[:N_TEST], perm[N_TEST:N_TEST + n_calib], perm[N_TEST + n_calib:]
    return {"train": (x[train], y[train]), "calib": (x[calib], y[calib]), "test": (x[test], y[test])}


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(-1) == y).float().mean())


def calibration_batches(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration split as ``CALIB_BATCHES`` batches of ``CALIB_BATCH_SIZE`` (labels included, for the loss)."""
    x, y = data["calib"]
    n = CALIB_BATCH_SIZE
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(CALIB_BATCHES)]


def train(epochs: int = 40, lr: float = 2e-3, batch_size: int = 64, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    data = load_data()
    x, y = data["train"]
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            # one-pixel random shifts: cheap augmentation that keeps 8x8 digits readable
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    meta = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "test_top1": accuracy(model, data["test"]), "train_top1": accuracy(model, data["train"])}
    return model, meta


def load_task():
    from mpq.models import ReferenceTask, load_checkpoint

    model = DigitsCNN()
    meta = load_checkpoint(model, NAME)
    model.eval()
    data = load_data()
    test = data["test"]
    return ReferenceTask(
        name=NAME, model=model, calib=calibration_batches(data), eval_fn=lambda m: accuracy(m, test),
        metric="top1", higher_is_better=True,
        description=f"5-layer CNN on sklearn digits (8x8), top-1 on {N_TEST} held-out images", info=meta,
        heldout=[(test[0][i:i + 120], test[1][i:i + 120]) for i in range(0, N_TEST, 120)])
