"""Deterministic DDIM (eta = 0) with every step's coefficients made before the loop.

diffusers' `DDIMScheduler.step` indexes a CPU table with the device timestep, which
reads the timestep back to the host each step; this form keeps the loop free of
host-device syncs (and capturable in a CUDA graph). It computes the same update.
"""

from __future__ import annotations

import torch

__all__ = ["ddim_coefficients", "ddim_step", "supports_fast_ddim"]


def supports_fast_ddim(scheduler) -> bool:
    c = scheduler.config
    return (not c.get("clip_sample", False) and not c.get("thresholding", False)
            and c.get("prediction_type", "epsilon") in ("epsilon", "v_prediction", "sample"))


def ddim_coefficients(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """(steps, 4) float32: sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev),
    with a = alphas_cumprod, as DDIMScheduler.step takes them (after set_timesteps)."""
    alphas = scheduler.alphas_cumprod.float().cpu()
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    rows = []
    for t in timesteps.cpu().tolist():
        prev = t - stride
        a_t = alphas[t]
        a_prev = alphas[prev] if prev >= 0 else torch.as_tensor(
            scheduler.final_alpha_cumprod, dtype=torch.float32)
        rows.append(torch.stack([a_t**0.5, (1 - a_t) ** 0.5, a_prev**0.5, (1 - a_prev) ** 0.5]))
    return torch.stack(rows)


def ddim_step(sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor,
              prediction_type: str = "epsilon") -> torch.Tensor:
    """x_{t-1} from x_t and the model output; `coef` is one row of ddim_coefficients."""
    a_t, b_t, a_prev, b_prev = coef[0], coef[1], coef[2], coef[3]
    if prediction_type == "epsilon":
        x0 = (sample - b_t * model_output) / a_t
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = a_t * sample - b_t * model_output
        eps = a_t * model_output + b_t * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t * x0) / b_t
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return a_prev * x0 + b_prev * eps
