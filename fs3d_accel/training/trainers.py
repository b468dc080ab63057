"""The four training stages of sam3d-mini, with time budgets, AdamW, warmup + cosine LR, EMA,
bf16 autocast on GPU, CSV loss logs and resumable checkpoints.

Stages (run in this order by ``benchmarks/train_mini.py``):

1. ``ss_vae``: :class:`SSEncoder` + the pipeline's ``ss.decoder`` on 32^3 occupancy (BCE + dice + KL).
2. ``slat_vae``: :class:`SLaTEncoder` + the pipeline's ``decode.decoder``; L1 (in 1/128 units) of
   the corner-SDF channels 0:8 minus the extractor's 1/res bias against the truncated GT SDF.
3. ``encode``: latents of every view; the SS latent's per-channel std is folded into the SS
   decoder's input conv (so the flow sees unit-scale latents and the pipeline needs no change);
   the SLaT latent's per-channel mean / std become the config's ``slat_mean`` / ``slat_std``.
4. ``ss_flow`` and ``slat_flow``: rectified flow (x_t = (1-t) x0 + t x1, target x1 - x0, t
   logit-normal(-1, 1)), time fed as t * 1000, 10 % condition dropout (tokens times 0, as the
   unconditional CFG branch), conditioned by the pipeline's own fusers trained jointly.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.mesh_extract import CUBE_CORNERS
from .data import SLAT_COND_KEYS, TrainSet
from .encoders import SLaTEncoder, SSEncoder, kl_divergence, reparameterize

TRUNC = 3 / 128          # SDF truncation (object units)
SUB = 4                  # 128 / 32 sub-cubes per voxel and axis
OUT_RES = 128


@dataclass
class StageConfig:
    seconds: float
    batch: int
    lr: float
    max_steps: int | None = None
    warmup: int = 100
    weight_decay: float = 0.0


class CSVLog:
    """Append rows (stage, step, seconds, loss, lr, extra...) to a CSV file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        new = not self.path.exists()
        self.f = open(self.path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(["stage", "step", "seconds", "loss", "lr", "aux"])

    def __call__(self, stage: str, step: int, seconds: float, loss: float, lr: float, aux: str = "") -> None:
        self.w.writerow([stage, step, f"{seconds:.2f}", f"{loss:.6g}", f"{lr:.3g}", aux])
        self.f.flush()


class EMA:
    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        self.steps = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        sd = module.state_dict()
        module.load_state_dict({k: self.shadow[k].to(sd[k].dtype) for k in sd})


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def run_stage(name: str, cfg: StageConfig, params: list[nn.Parameter], step_fn: Callable[[int], tuple[Tensor, str]],
              log: CSVLog, printer=print, emas: list[tuple[EMA, nn.Module]] = (), log_every: int = 25,
              optimizer_state: dict | None = None) -> torch.optim.Optimizer:
    """Optimise ``step_fn``'s loss until ``cfg.seconds`` (or ``cfg.max_steps``) are used up.

    LR: linear warmup over ``cfg.warmup`` steps, then cosine over the *time* budget to 10 %."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    t0 = time.perf_counter()
    step = 0
    smooth = None
    while True:
        el = time.perf_counter() - t0
        if el >= cfg.seconds or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        frac = min(1.0, el / max(cfg.seconds, 1e-9))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, aux = step_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, mod in emas:
            ema.update(mod)
        lv = float(loss.detach())
        smooth = lv if smooth is None else 0.95 * smooth + 0.05 * lv
        if step % log_every == 0:
            log(name, step, time.perf_counter() - t0, lv, lr, aux)
        if step % (log_every * 8) == 0:
            printer(f"[{name}] step {step} t={time.perf_counter() - t0:.0f}s loss={lv:.4f} (ema {smooth:.4f}) {aux}")
        step += 1
    log(name, step, time.perf_counter() - t0, smooth if smooth is not None else float("nan"), 0.0, "end")
    printer(f"[{name}] done: {step} steps in {time.perf_counter() - t0:.0f}s, loss ~ {smooth}")
    return opt


# ------------------------------------------------------------------------------------------- batches
def sparse_batch(ts: TrainSet, idx: list[int], crop: int | None = None, gen: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate views' surface voxels: coords (N,4) int32 [b,x,y,z], corner SDF (N,125) float, batch (N,).

    ``crop``: keep only the voxels in a crop^3 box centred on a random voxel of each view."""
    cs, sd, bs = [], [], []
    for b, i in enumerate(idx):
        c, s = ts.coords[i], ts.corner_sdf[i]
        if crop is not None and len(c) > 0:
            centre = c[int(torch.randint(0, len(c), (1,), generator=gen))]
            keep = ((c - centre).abs() < crop // 2).all(1)
            c, s = c[keep], s[keep]
        cs.append(torch.cat([torch.full_like(c[:, :1], b), c], 1))
        sd.append(s.float())
        bs.append(torch.full((len(c),), b, device=c.device, dtype=torch.long))
    return torch.cat(cs), torch.cat(sd), torch.cat(bs)


def corner_targets(out_coords: Tensor, corner_sdf: Tensor) -> Tensor:
    """(M,8) GT SDF at the 8 corners of every 128^3 output cube (rows: 64 per input voxel, in order)."""
    parent = torch.arange(out_coords.shape[0], device=out_coords.device) // (SUB ** 3)
    off = out_coords[:, 1:].long() % SUB                                           # (M,3)
    corners = off[:, None, :] + CUBE_CORNERS.to(out_coords.device)[None]            # (M,8,3)
    li = (corners[..., 0] * (SUB + 1) + corners[..., 1]) * (SUB + 1) + corners[..., 2]
    return corner_sdf[parent[:, None], li]


def logit_normal(n: int, device, mean: float = -1.0, std: float = 1.0) -> Tensor:
    return torch.sigmoid(torch.randn(n, device=device) * std + mean)


# ------------------------------------------------------------------------------------------- stages
class MiniTrainer:
    """Holds the pipeline under training, the encoders, the data and the per-stage steps."""

    def __init__(self, pipe, ts: TrainSet, out: Path, printer=print, seed: int = 0) -> None:
        self.pipe = pipe
        self.ts = ts
        self.dev = next(pipe.parameters()).device
        self.ss_encoder = SSEncoder(pipe.config.ss_decoder).to(self.dev)
        self.slat_encoder = SLaTEncoder(in_features=(SUB + 1) ** 3,
                                        latent_channels=pipe.config.mesh_decoder.latent_channels).to(self.dev)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = CSVLog(self.out / "train_log.csv")
        self.print = printer
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.stats: dict = {}
        self.shape_latents: Tensor | None = None
        self.slat_latents: list[Tensor] | None = None
        self.emas: dict[str, EMA] = {}

    def _idx(self, n: int) -> Tensor:
        return torch.randint(0, len(self.ts), (n,), generator=self.gen)

    # --------------------------------------------------------------- (a) SS VAE
    def ss_vae(self, cfg: StageConfig, kl_weight: float = 1e-3) -> None:
        enc, dec = self.ss_encoder, self.pipe.ss.decoder
        enc.train(), dec.train()

        def step(_: int):
            idx = self._idx(cfg.batch).to(self.dev)
            occ = self.ts.occupancy[idx].float()[:, None]
            with autocast(self.dev):
                mean, logvar = enc(occ)
                logits = dec(reparameterize(mean, logvar)).float()
            bce = F.binary_cross_entropy_with_logits(logits, occ)
            p = logits.sigmoid()
            dice = 1 - (2 * (p * occ).sum((1, 2, 3, 4)) + 1) / (p.sum((1, 2, 3, 4)) + occ.sum((1, 2, 3, 4)) + 1)
            kl = kl_divergence(mean, logvar)
            with torch.no_grad():
                iou = (((logits > 0) & (occ > 0)).sum() / ((logits > 0) | (occ > 0)).sum().clamp_min(1)).item()
            return bce + dice.mean() + kl_weight * kl, f"iou={iou:.3f} kl={kl.item():.3f}"

        run_stage("ss_vae", cfg, list(enc.parameters()) + list(dec.parameters()), step, self.log, self.print)

    # --------------------------------------------------------------- (b) SLaT VAE
    def slat_vae(self, cfg: StageConfig, kl_weight: float = 1e-4, color_weight: float = 1e-2,
                 crop: int | None = 16) -> None:
        """``crop``: train on the voxels inside a random crop^3 box per view (the decoder is local
        but for its absolute position embedding, which crops keep), 4-8x fewer rows per step."""
        enc, dec = self.slat_encoder, self.pipe.decode.decoder
        enc.train(), dec.train()

        def step(_: int):
            idx = self._idx(cfg.batch).tolist()
            coords, sdf, _ = sparse_batch(self.ts, idx, crop, self.gen)
            feats = (sdf / TRUNC).clamp(-1, 1)
            with autocast(self.dev):
                mean, logvar = enc(feats, coords)
                out = dec(reparameterize(mean.float(), logvar.float()), coords)
            pred = out.feats[:, 0:8].float() - 1.0 / OUT_RES
            tgt = corner_targets(out.coords, sdf).clamp(-TRUNC, TRUNC)
            l1 = (pred - tgt).abs().mean() * OUT_RES
            with torch.no_grad():
                sign_acc = ((pred > 0) == (tgt > 0)).float().mean().item()
            reg = out.feats[:, 8:].float().pow(2).mean()
            kl = kl_divergence(mean, logvar)
            return l1 + kl_weight * kl + color_weight * reg, f"sign_acc={sign_acc:.4f} kl={kl.item():.3f}"

        run_stage("slat_vae", cfg, list(enc.parameters()) + list(dec.parameters()), step, self.log, self.print)

    # --------------------------------------------------------------- encode latents
    @torch.no_grad()
    def encode(self, batch: int = 64, fold_ss_std: bool = True, slat: bool = True) -> dict:
        self.ss_encoder.eval(), self.slat_encoder.eval()
        means = []
        for i in range(0, len(self.ts), batch):
            occ = self.ts.occupancy[i:i + batch].float()[:, None]
            with autocast(self.dev):
                m, _ = self.ss_encoder(occ)
            means.append(m.float())
        z = torch.cat(means)                                        # (N, 8, r, r, r)
        if "mean_occupancy_u8" not in self.stats:  # for the mean-shape baseline of the evaluation
            mo = self.ts.occupancy.float().mean(0)
            self.stats["mean_occupancy_u8"] = (mo * 255).round().to(torch.uint8).flatten().tolist()
        std = z.transpose(0, 1).reshape(z.shape[1], -1).std(1)
        mu = z.transpose(0, 1).reshape(z.shape[1], -1).mean(1)
        if fold_ss_std and "ss_latent_std" not in self.stats:
            # decoder(z_n) == old_decoder(z_n * std): scale the input conv's weights per input channel
            w = self.pipe.ss.decoder.input_layer.weight
            w.data.mul_(std.to(w.dtype)[None, :, None, None, None])
            self.stats["ss_latent_std"] = std.tolist()
            self.stats["ss_latent_mean"] = mu.tolist()
        s = torch.tensor(self.stats["ss_latent_std"], device=self.dev)
        zn = z / s[None, :, None, None, None]
        self.shape_latents = zn.flatten(2).transpose(1, 2).contiguous()  # (N, r^3, 8), token = x*r^2+y*r+z
        if not slat:
            return self.stats
        lat = []
        for i in range(0, len(self.ts), 16):
            idx = list(range(i, min(i + 16, len(self.ts))))
            coords, sdf, b = sparse_batch(self.ts, idx)
            with autocast(self.dev):
                m, _ = self.slat_encoder((sdf / TRUNC).clamp(-1, 1), coords)
            m = m.float()
            lat.extend(m[b == j] for j in range(len(idx)))
        allz = torch.cat(lat)
        if "slat_mean" not in self.stats:
            self.stats["slat_mean"] = allz.mean(0).tolist()
            self.stats["slat_std"] = allz.std(0).tolist()
        sm = torch.tensor(self.stats["slat_mean"], device=self.dev)
        ss = torch.tensor(self.stats["slat_std"], device=self.dev)
        self.slat_latents = [(x - sm) / ss for x in lat]
        self.print(f"[encode] ss latent std {[round(x, 3) for x in std.tolist()]} mean {[round(x, 3) for x in mu.tolist()]}")
        self.print(f"[encode] slat mean {[round(x, 3) for x in self.stats['slat_mean']]} std "
                   f"{[round(x, 3) for x in self.stats['slat_std']]}")
        return self.stats

    # --------------------------------------------------------------- (c) SS flow
    def ss_flow(self, cfg: StageConfig, drop: float = 0.1) -> None:
        if self.shape_latents is None:
            raise RuntimeError("run encode() before the SS flow stage")
        cond_net, flow = self.pipe.ss.condition, self.pipe.ss.flow
        cond_net.train(), flow.train()
        ema_f = self.emas.setdefault("ss.flow", EMA(flow))
        ema_c = self.emas.setdefault("ss.condition", EMA(cond_net))

        def step(_: int):
            idx = self._idx(cfg.batch).to(self.dev)
            b = len(idx)
            x1 = {"shape": self.shape_latents[idx], **self.ts.layout(idx)}
            t = logit_normal(b, self.dev)
            x0 = {k: torch.randn_like(v) for k, v in x1.items()}
            xt = {k: (1 - t.view(-1, 1, 1)) * x0[k] + t.view(-1, 1, 1) * x1[k] for k in x1}
            keep = (torch.rand(b, device=self.dev) >= drop).float().view(-1, 1, 1)
            with autocast(self.dev):
                cond = cond_net(**self.ts.cond_batch(idx)) * keep
                d = torch.zeros(b, device=self.dev) if flow.cfg.is_shortcut_model else None
                pred = flow(xt, t * 1000.0, cond, d)
            losses = {k: F.mse_loss(pred[k].float(), x1[k] - x0[k]) for k in x1}
            loss = losses["shape"] + sum(v for k, v in losses.items() if k != "shape")
            aux = " ".join(f"{k[:5]}={v.item():.3f}" for k, v in losses.items())
            return loss, aux

        params = list(cond_net.parameters()) + list(flow.parameters())
        run_stage("ss_flow", cfg, params, step, self.log, self.print, emas=[(ema_f, flow), (ema_c, cond_net)])

    # --------------------------------------------------------------- (d) SLaT flow
    def slat_flow(self, cfg: StageConfig, drop: float = 0.1) -> None:
        if self.slat_latents is None:
            raise RuntimeError("run encode() before the SLaT flow stage")
        cond_net, flow = self.pipe.slat.condition, self.pipe.slat.flow
        cond_net.train(), flow.train()
        ema_f = self.emas.setdefault("slat.flow", EMA(flow))
        ema_c = self.emas.setdefault("slat.condition", EMA(cond_net))

        def step(_: int):
            idx = self._idx(cfg.batch).tolist()
            coords, _, bidx = sparse_batch(self.ts, idx)
            x1 = torch.cat([self.slat_latents[i] for i in idx])
            b = len(idx)
            t = logit_normal(b, self.dev)
            x0 = torch.randn_like(x1)
            tr = t[bidx][:, None]
            xt = (1 - tr) * x0 + tr * x1
            keep = (torch.rand(b, device=self.dev) >= drop).float().view(-1, 1, 1)
            it = torch.tensor(idx, device=self.dev)
            with autocast(self.dev):
                cond = cond_net(**self.ts.cond_batch(it, SLAT_COND_KEYS)) * keep
                pred = flow(xt, coords, t * 1000.0, cond)
            loss = F.mse_loss(pred.float(), x1 - x0)
            return loss, f"voxels={len(coords)}"

        params = list(cond_net.parameters()) + list(flow.parameters())
        run_stage("slat_flow", cfg, params, step, self.log, self.print, emas=[(ema_f, flow), (ema_c, cond_net)])

    # --------------------------------------------------------------- checkpoints
    COMPONENTS = ("ss.condition", "ss.flow", "ss.decoder", "slat.condition", "slat.flow", "decode.decoder")

    def module(self, name: str) -> nn.Module:
        if name == "ss_encoder":
            return self.ss_encoder
        if name == "slat_encoder":
            return self.slat_encoder
        return self.pipe.get_submodule(name)

    #: checkpoint files (at most 16 MiB each in fp16): file stem -> components
    GROUPS = {"ss_gen": ("ss.condition", "ss.flow"), "slat_gen": ("slat.condition", "slat.flow"),
              "vaes": ("ss.decoder", "decode.decoder", "ss_encoder", "slat_encoder")}

    def save(self, folder: Path, use_ema: bool = True, dtype: torch.dtype = torch.float16) -> None:
        """One torch file per group of components (EMA weights where kept) + stats.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stem, names in self.GROUPS.items():
            blob = {}
            for name in names:
                sd = self.module(name).state_dict()
                if use_ema and name in self.emas:
                    sd = {k: self.emas[name].shadow[k] for k in sd}
                blob[name] = {k: v.detach().to(dtype).cpu() if v.is_floating_point() else v.cpu()
                              for k, v in sd.items()}
            torch.save(blob, folder / f"{stem}.pt")
        (folder / "stats.json").write_text(json.dumps(self.stats, indent=1))

    def load(self, folder: Path) -> list[str]:
        """Load whatever group files exist in ``folder`` (and stats.json); returns the components loaded."""
        folder = Path(folder)
        loaded = []
        for stem in self.GROUPS:
            f = folder / f"{stem}.pt"
            if not f.is_file():
                continue
            blob = torch.load(f, map_location=self.dev, weights_only=True)
            for name, sd in blob.items():
                mod = self.module(name)
                ref = mod.state_dict()
                mod.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()})
                loaded.append(name)
        if (folder / "stats.json").is_file():
            self.stats = json.loads((folder / "stats.json").read_text())
        return loaded
