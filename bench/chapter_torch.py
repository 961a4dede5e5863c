#!/usr/bin/env python3
"""The chapter in PyTorch, as the book writes it: the Python peer of `examples/bench_train.rs`.

torchvision's ImageFolder and transforms, `resnet18`, SGD with the output layer at 10x the
learning rate and weight decay 0.001, the summed cross-entropy loss, d2l's `train_ch13` loop with
its Timer around the training step only (`nn.DataParallel` over the devices, as the book does).
Prints one JSON line with the same fields as the Rust side.

    chapter_torch.py e2e DATA_DIR --variant book|tuned [--crop 64 --resize 72 --batch 32 --epochs 2 --device cpu|cuda]
    chapter_torch.py step [--crop 64 --batch 32 --steps 20 --device cpu|cuda]

Variants: `book` is the book's DataLoader (num_workers=0); `tuned` uses one worker process per
core, pinned memory and persistent workers.
"""
import argparse
import json
import os
import resource
import time

import torch
import torchvision
from torch import nn
from torchvision import transforms

START = time.perf_counter()


# d2l's helpers, as in d2l/torch.py (0.17/1.0), reduced to what the chapter uses.
class Timer:
    def __init__(self):
        self.times = []

    def start(self):
        self.tik = time.time()

    def stop(self):
        self.times.append(time.time() - self.tik)
        return self.times[-1]

    def sum(self):
        return sum(self.times)


class Accumulator:
    def __init__(self, n):
        self.data = [0.0] * n

    def add(self, *args):
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self):
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def accuracy(y_hat, y):
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def evaluate_accuracy_gpu(net, data_iter, device=None):
    if isinstance(net, nn.Module):
        net.eval()
        if not device:
            device = next(iter(net.parameters())).device
    metric = Accumulator(2)
    with torch.no_grad():
        for X, y in data_iter:
            X = X.to(device)
            y = y.to(device)
            metric.add(accuracy(net(X), y), y.numel())
    return metric[0] / metric[1]


def train_batch_ch13(net, X, y, loss, trainer, devices):
    X = X.to(devices[0])
    y = y.to(devices[0])
    net.train()
    trainer.zero_grad()
    pred = net(X)
    l = loss(pred, y)
    l.sum().backward()
    trainer.step()
    return l.sum(), accuracy(pred, y)


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices, timing):
    # d2l's, plus `timing` (not in the book): seconds spent waiting for the training loader's
    # batches and evaluating, to set beside the Rust side's `History::timing`.
    timer, num_batches = Timer(), len(train_iter)
    net = nn.DataParallel(net, device_ids=devices).to(devices[0]) if devices[0].type == "cuda" else net
    for epoch in range(num_epochs):
        metric = Accumulator(4)
        waiting = time.perf_counter()
        for i, (features, labels) in enumerate(train_iter):
            timing["data_wait_s"] += time.perf_counter() - waiting
            timer.start()
            l, acc = train_batch_ch13(net, features, labels, loss, trainer, devices)
            metric.add(l, acc, labels.shape[0], labels.numel())
            timer.stop()
            waiting = time.perf_counter()
        evaluating = time.perf_counter()
        test_acc = evaluate_accuracy_gpu(net, test_iter)
        timing["eval_s"] += time.perf_counter() - evaluating
    timing["step_s"] = timer.sum()
    print(f'loss {metric[0] / metric[2]:.3f}, train acc {metric[1] / metric[3]:.3f}, test acc {test_acc:.3f}',
          file=os.sys.stderr)
    return metric[2] * num_epochs / timer.sum(), test_acc


def peak_rss_mib():
    # ru_maxrss of this process and, separately, of the largest finished child (Linux: kB).
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, workers


def proc_kib(pid, path, key):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_memory_mib(*loaders):
    """The live (persistent) DataLoader workers' memory: the sum of their peak RSS (VmHWM, which
    counts pages shared with this process once a worker) and of their proportional set size now
    (Pss: shared pages split between the processes that map them). RUSAGE_CHILDREN sees neither,
    as the workers have not exited yet."""
    pids = [w.pid for loader in loaders for w in getattr(getattr(loader, "_iterator", None), "_workers", [])]
    hwm = sum(proc_kib(pid, "status", "VmHWM") for pid in pids) / 1024
    pss = sum(proc_kib(pid, "smaps_rollup", "Pss") for pid in pids) / 1024
    return len(pids), hwm, pss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["e2e", "step"])
    ap.add_argument("data", nargs="?")
    ap.add_argument("--variant", choices=["book", "tuned"], default="book")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--resize", type=int, default=72)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    devices = [device]
    net = torchvision.models.resnet18()
    net.fc = nn.Linear(net.fc.in_features, 2)
    net = net.to(device)
    lr = 5e-5
    params_1x = [param for name, param in net.named_parameters() if name not in ["fc.weight", "fc.bias"]]
    trainer = torch.optim.SGD([{"params": params_1x}, {"params": net.fc.parameters(), "lr": lr * 10}],
                              lr=lr, weight_decay=0.001)
    loss = nn.CrossEntropyLoss(reduction="none")

    if args.mode == "step":
        X = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
        y = torch.randint(0, 2, (args.batch,), device=device)
        for _ in range(3):
            train_batch_ch13(net, X, y, loss, trainer, devices)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            train_batch_ch13(net, X, y, loss, trainer, devices)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        print(json.dumps({"impl": "torch", "mode": "step", "batch": args.batch, "crop": args.crop,
                          "steps": args.steps, "images_per_s": args.steps * args.batch / secs,
                          "peak_rss_mib": peak_rss_mib()[0]}))
        return

    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_augs = transforms.Compose([transforms.RandomResizedCrop(args.crop), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), normalize])
    test_augs = transforms.Compose([transforms.Resize([args.resize, args.resize]), transforms.CenterCrop(args.crop),
                                    transforms.ToTensor(), normalize])
    train_set = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=train_augs)
    test_set = torchvision.datasets.ImageFolder(os.path.join(args.data, "test"), transform=test_augs)
    if args.variant == "book":
        extra = {}
    else:
        extra = {"num_workers": args.workers, "pin_memory": device.type == "cuda", "persistent_workers": True}
    train_iter = torch.utils.data.DataLoader(train_set, batch_size=args.batch, shuffle=True, **extra)
    test_iter = torch.utils.data.DataLoader(test_set, batch_size=args.batch, **extra)
    t = time.perf_counter()
    first = next(iter(train_iter))
    first_batch_s = time.perf_counter() - t
    del first
    t = time.perf_counter()
    timing = {"data_wait_s": 0.0, "eval_s": 0.0}
    examples_per_s, test_acc = train_ch13(net, train_iter, test_iter, loss, trainer, args.epochs, devices, timing)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    timing["wall_s"] = wall
    own, workers = peak_rss_mib()
    n_workers, workers_hwm, workers_pss = worker_memory_mib(train_iter, test_iter)
    if n_workers:
        workers = workers_pss
    print(json.dumps({
        "impl": f"torch-{args.variant}", "mode": "e2e", "batch": args.batch, "crop": args.crop,
        "epochs": args.epochs, "workers": extra.get("num_workers", 0), "train_images": len(train_set),
        "test_images": len(test_set), "d2l_examples_per_s": examples_per_s,
        "epoch_wall_s": wall / args.epochs, "e2e_images_per_s": len(train_set) * args.epochs / wall,
        "first_batch_s": first_batch_s, "peak_rss_mib": own, "peak_rss_worker_mib": workers,
        "worker_processes": n_workers, "workers_peak_rss_sum_mib": workers_hwm, "workers_pss_mib": workers_pss,
        "process_s": time.perf_counter() - START, "test_acc": test_acc, "timing": timing,
    }))


if __name__ == "__main__":
    main()
