"""Align a from-scratch vision tower and projector with the language model's word embeddings before LLaVA training.

Why: a LLaVA learns to read images through its language model, and on our CPU the language model costs about a second
per image and step. Trained end to end from random weights, the tower never got a useful signal in the budget
(measured: 240 steps, loss flat at the answer priors, 34 % held-out accuracy, no better than always answering
"shirt" / "no"). Real LLaVA starts from a pretrained CLIP tower and first aligns its projector to the word embeddings
(stage 1, Liu et al. 2023, arXiv 2304.08485); no pretrained tower can be downloaded here, so this stage does both at
once, without running the language model, which makes it ~30x cheaper per image.

Objective (CLIP-style, Radford et al. 2021, arXiv 2103.00020, with the language model's frozen input-embedding table as
the text side): every visual token, as the language model will see it (tower -> feature layer -> projector), is
classified as the item of the grid cell it lies in, by cosine similarity with the embeddings of the ten class words
(first token of " boot", " bag", ...) and a learned temperature. Each token then reads like the word of its item, as
in "Frozen" (Tsimpoukelli et al. 2021, arXiv 2106.13884), so the language model can learn to use them in few steps.
Cosine similarity ignores scale, and the language model expects embedding-sized inputs, so at the end the
projector's last linear is rescaled: the tokens' mean norm becomes the word embeddings' mean norm.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["align_vision", "class_word_ids", "token_cell_labels", "visual_tokens"]


def class_word_ids(tokenizer: Any) -> list[int]:
    """The first token of each class word as the answers spell it (``" boot"``, ...)."""
    from owlore.data.fashion_vqa import CLASSES

    return [tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in CLASSES]


def token_cell_labels(cell_labels: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """``[B, grid²]`` cell labels -> ``[B, (grid·side)²]`` labels of the visual tokens in raster order (each cell is
    ``side × side`` patches)."""
    b = cell_labels.shape[0]
    lab = cell_labels.view(b, grid, 1, grid, 1).expand(b, grid, side, grid, side)
    return lab.reshape(b, (grid * side) ** 2)


def visual_tokens(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, N, d]`` the tokens the language model sees for each image (the model's own feature layer, strategy
    and projector)."""
    feats = model.model.get_image_features(pixel_values=pixel_values)
    feats = getattr(feats, "pooler_output", feats)
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def align_vision(model: Any, tokenizer: Any, images: np.ndarray, labels: np.ndarray, *, grid: int, steps: int,
                 batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                 heldout: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model``'s vision tower and projector in place (the language model is not touched).

    ``images``/``labels``: the split's 28×28 items and classes; each step draws ``batch_size`` random grids.
    ``heldout``: items to measure token accuracy on afterwards (256 grids). Returns the loss curve, the token
    accuracy, the rescale factor and the time taken.
    """
    from owlore.data.fashion_vqa import random_grids
    from owlore.vision.llava import pixel_values

    patch = model.config.vision_config.patch_size
    if 28 % patch:
        raise ValueError(f"patch_size {patch} must divide the 28-pixel Fashion-MNIST item (7, 14 or 28)")
    side = 28 // patch
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    device = next(tower.parameters()).device  # runs where the model is: move it to the accelerator first
    ids = class_word_ids(tokenizer)
    if len(set(ids)) < len(ids):
        logger.warning("class words share first tokens %s: those classes cannot be told apart by alignment", ids)
    words = F.normalize(model.get_input_embeddings().weight[ids].detach().float(), dim=-1)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = [*tower.parameters(), *projector.parameters(), log_scale]
    was = [p.requires_grad for p in params[:-1]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    rng = np.random.default_rng([seed, 7])
    training = model.training
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = _progress(steps, progress)
    for _ in range(steps):
        mosaics, cells = random_grids(images, labels, batch_size, grid=grid, rng=rng)
        z = visual_tokens(model, pixel_values(mosaics, tower=tower))
        target = token_cell_labels(torch.as_tensor(cells), grid, side).to(device)
        logits = log_scale.exp() * F.normalize(z.float(), dim=-1) @ words.T
        loss = F.cross_entropy(logits.reshape(-1, words.shape[0]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if bar is not None and len(losses) % 10 == 0:  # a host read every 10 steps, not every step
            bar.update(10)
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}")
    if bar is not None:
        bar.update(steps - bar.n)
        bar.close()
    losses = torch.stack(losses).tolist() if losses else []
    for p, r in zip(params[:-1], was):
        p.requires_grad_(r)
    result: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr,
                              "seconds": time.perf_counter() - start, "losses": losses[:: max(1, steps // 50)]}
    with torch.no_grad():
        model.eval()
        rescale = _match_embedding_norm(model, images, grid, rng)
        result["rescale"] = rescale
        if heldout is not None:
            mosaics, cells = random_grids(*heldout, 256, grid=grid, rng=np.random.default_rng([seed, 8]))
            pred = (visual_tokens(model, pixel_values(mosaics, tower=tower)).float() @ words.T).argmax(-1)
            truth = token_cell_labels(torch.as_tensor(cells), grid, side).to(device)
            result["heldout_token_accuracy"] = float((pred == truth).float().mean())
    model.train(training)
    logger.info("vision alignment: %d steps in %.0f s, final loss %.3f, held-out token accuracy %s", steps,
                result["seconds"], losses[-1] if losses else float("nan"), result.get("heldout_token_accuracy"))
    return result


def _match_embedding_norm(model: Any, images: np.ndarray, grid: int, rng: np.random.Generator) -> float:
    """Scale the projector's last linear so the visual tokens' mean norm equals the word embeddings' mean norm."""
    from owlore.data.fashion_vqa import random_grids
    from owlore.vision.llava import pixel_values

    mosaics, _ = random_grids(images, np.zeros(len(images), np.int64), 64, grid=grid, rng=rng)
    z = visual_tokens(model, pixel_values(mosaics, tower=model.model.vision_tower)).float()
    target = model.get_input_embeddings().weight.float().norm(dim=-1).mean()
    factor = float(target / z.norm(dim=-1).mean())
    last = model.model.multi_modal_projector.linear_2
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)
    return factor


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vision alignment", unit="step")
